"""benchmarks/host_overhead.py: the op counts are exact (machine-independent), so the goal on
them is asserted; the timing code runs once on tiny settings (never asserted)."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import host_overhead as H  # noqa: E402

from adarts_kernels.backend import why_unavailable  # noqa: E402

HAS_CPP = why_unavailable("cpp", "cpu") is None


CONVS = ("conv2d", "convolution", "convolution_backward")


@pytest.mark.parametrize("stride", [1, 2])
def test_fused_edge_dispatches_fewer_operations_than_pcdarts(stride):
    """Non-view operations per edge forward + backward on the path a GPU runs (a proxy for its
    launches), the fused edge's C++ host sequence counted op by op: fewer than PC-DARTS's, with
    and without recomputation, at either stride. On the CPU path the merged depthwise
    convolutions make fewer convolution calls than on the GPU path."""
    variants = ("pcdarts", "adarts-fused", "adarts-fused-recompute")
    gpu = {v: H.count_gpu_ops(v, 8, stride, 4, 2, 8) for v in variants}
    cpu = {v: H.count_ops(H.make_case(v, 8, stride, 4, 2, 8)) for v in variants}
    pc = sum(gpu["pcdarts"].ops.values())
    assert pc == sum(cpu["pcdarts"].ops.values())      # PC-DARTS makes no device choices
    for v in variants[1:]:
        assert sum(gpu[v].ops.values()) < pc, (v, gpu[v].ops, gpu["pcdarts"].ops)
    fused = gpu["adarts-fused"]
    # the C++ sequence is looked into, not counted as one op
    assert not any(k.startswith("adarts_C.edge") for k in fused.ops)
    if HAS_CPP:
        convs = sum(fused.ops[k] for k in CONVS)
        assert convs >= 12 + 12, fused.ops      # forward, recomputed and backward convolutions
        cpu_convs = sum(cpu["adarts-fused"].ops[k] for k in CONVS)
        assert cpu_convs < convs and cpu_convs <= sum(cpu["pcdarts"].ops[k] for k in CONVS), (cpu_convs, convs)


def test_counter_counts_copies_but_not_views():
    c = H.OpCounter()
    x = torch.randn(2, 3, 4, 4)
    with c:
        x.view(6, 16)
        x.contiguous()                                        # no copy: not even dispatched
        x.contiguous(memory_format=torch.channels_last)       # a copy: an operation
        x + 1
    assert sum(c.views.values()) == 1 and sum(c.ops.values()) == 2, (c.ops, c.views)


def test_measure_runs_and_reports_every_variant():
    res = H.measure(("pcdarts", "adarts-fused", "adarts-fused-recompute"), rounds=1, reps=1)
    rows = {r["variant"]: r for r in res["rows"]}
    assert set(rows) == {"pcdarts", "adarts-fused", "adarts-fused-recompute"}
    for r in rows.values():
        assert r["ms_per_edge"] > 0 and 0 <= r["conv_ms_per_edge"] <= r["ms_per_edge"]
    assert rows["pcdarts"]["time_vs_pcdarts"] == 1.0
    table = H.table(res)
    assert table.count("\n") == 1 + len(rows)
    net = H.measure_network(("pcdarts", "adarts-fused"), layers=2, rounds=1, reps=1)
    assert [r["variant"] for r in net["rows"]] == ["pcdarts", "adarts-fused"]
    assert "supernet fwd+bwd" in H.network_table(net)
