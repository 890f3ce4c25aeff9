"""Memory report, largest-batch probe and the RSS cross-check of the saved-bytes count."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from adarts_kernels.profiling import find_max_batch, is_oom, safe_batch
from adarts_kernels.profiling.report import (cuda_workspace_bytes, cuda_workspace_peak, format_report,
                                             fused_edge_shapes, max_batch_estimate, memory_report)

REPO = Path(__file__).resolve().parents[1]


def fake_device(capacity: int):
    """A try_batch that 'runs out of memory' above ``capacity``, like CUDA would."""
    seen = []

    def try_batch(b):
        seen.append(b)
        if b > capacity:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
    return try_batch, seen


@pytest.mark.parametrize("capacity", [16, 23, 100, 777, 5000])
def test_find_max_batch_finds_the_capacity(capacity):
    try_batch, seen = fake_device(capacity)
    best, tried = find_max_batch(try_batch, start=16, limit=4096, granularity=8)
    assert best <= capacity and (best == 4096 or capacity - best < 8 or best == capacity), (best, tried)
    assert [b for b, _ in tried] == seen
    assert all(ok == (b <= capacity) for b, ok in tried)


def test_find_max_batch_other_errors_propagate_and_start_must_fit():
    def broken(b):
        raise ValueError("shape mismatch")
    with pytest.raises(ValueError, match="shape mismatch"):
        find_max_batch(broken)
    with pytest.raises(RuntimeError, match="even batch 16 does not fit"):
        find_max_batch(fake_device(8)[0], start=16)
    assert is_oom(RuntimeError("CUDA out of memory")) and not is_oom(RuntimeError("other"))


def test_safe_batch_margin():
    assert safe_batch(1000) == 896
    assert safe_batch(20) == 16
    assert safe_batch(5) == 5


def test_memory_report_orders_variants():
    rows = memory_report(C=8, layers=3, size=16, batch=2, gib=1.0)
    by = {r["variant"]: r for r in rows}
    assert by["pcdarts"]["vs_pcdarts"] == 1.0
    assert by["adarts-fused-recompute"]["mb_per_sample"] < by["adarts-fused"]["mb_per_sample"] \
        < by["pcdarts"]["mb_per_sample"] < by["darts"]["mb_per_sample"]
    assert by["adarts-fused"]["max_batch"] > 2 * by["pcdarts"]["max_batch"]
    assert max_batch_estimate(1e6, 10**6, 11e6) == 10
    text = format_report(rows, 1.0, "t")
    assert "adarts-fused-recompute" in text and "| darts |" in text


def test_memory_report_cuda_workspace():
    """The fused variants report their transient CUDA workspace (largest call, forward and
    backward, at the estimated largest batch); the plain-PyTorch variants none."""
    rows = memory_report(["pcdarts", "adarts-fused"], C=8, layers=3, size=16, batch=2, gib=1.0)
    by = {r["variant"]: r for r in rows}
    assert by["pcdarts"]["cuda_workspace_mb"] is None
    ws = by["adarts-fused"]["cuda_workspace_mb"]
    assert ws["fwd"] > 0 and ws["bwd"] > ws["fwd"]
    text = format_report(rows, 1.0, "t")
    assert "CUDA workspace, transient" in text
    assert f"{ws['fwd']:.2f} / {ws['bwd']:.2f}" in text


def test_fused_edge_shapes_and_peak():
    from adarts_kernels.profiling.report import build_supernet
    net = build_supernet("adarts-fused", C=8, layers=3)
    before = [t.clone() for t in net.buffers()]
    shapes = fused_edge_shapes(net, 16)
    assert all(torch.equal(a, b) for a, b in zip(before, net.buffers()))   # no running statistic moved
    assert net.training
    assert len(shapes) == 3 * 14   # 3 cells of 14 edges
    assert {s["stride"] for s in shapes} == {1, 2} and {s["k"] for s in shapes} == {4}
    assert max(s["H"] for s in shapes) == 16 and min(s["H"] for s in shapes) == 4
    assert fused_edge_shapes(build_supernet("pcdarts", C=8, layers=3), 16) == []
    fwd, bwd = cuda_workspace_peak(shapes, 64)
    per = [cuda_workspace_bytes(64, s["C"], s["H"], s["W"], s["stride"], s["k"], s["P"]) for s in shapes]
    assert fwd == max(v for d in per for key, v in d.items() if key.endswith("_fwd"))
    assert bwd == max(v for d in per for key, v in d.items() if key.endswith("_bwd"))
    assert cuda_workspace_peak(shapes, 128)[1] > bwd


def test_mixed_sum_bwd_workspace_per_output():
    """The mixed_sum backward keeps one accumulation-type value per output element (du_1),
    about 67 MB at B=1024, n=16, 32x32 in float (it was 12 bytes, about 201 MB)."""
    B, C, k, H = 1024, 64, 4, 32
    ws = cuda_workspace_bytes(B, C, H, H, 1, k, P=4)["mixed_sum_bwd"]
    outs = B * (C // k) * H * H
    assert 4 * outs <= ws < 4 * outs + 2 ** 20
    ws2 = cuda_workspace_bytes(B, C, 2 * H, 2 * H, 2, k, P=4, acc_size=8)["mixed_sum_bwd"]
    assert 8 * outs <= ws2 < 8 * outs + 2 ** 21


def test_cli_writes_table_plot_and_json(tmp_path):
    from adarts_kernels.profiling.__main__ import main
    png, js = tmp_path / "m.png", tmp_path / "m.json"
    assert main(["--C", "8", "--layers", "3", "--size", "16", "--batch", "2", "--plot", str(png),
                 "--json", str(js), "--variants", "pcdarts", "adarts-fused"]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = json.loads(js.read_text())
    assert [r["variant"] for r in rows] == ["pcdarts", "adarts-fused"]
    assert main(["--C", "10", "--k", "4"]) == 2


def test_cli_writes_no_plot_unless_asked(tmp_path, monkeypatch, capsys):
    from adarts_kernels.profiling.__main__ import main
    monkeypatch.chdir(tmp_path)
    assert main(["--C", "8", "--layers", "3", "--size", "16", "--batch", "2", "--variants", "pcdarts"]) == 0
    assert os.listdir(tmp_path) == [] and "plot:" not in capsys.readouterr().out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_saved_bytes_agree_with_rss_growth():
    """Honest accounting: what saved_activation_bytes counts is what stays resident after
    the forward (fresh process, malloc returning large blocks to the system), within 10%."""
    code = ("import json; from adarts_kernels.profiling.report import rss_crosscheck as r; "
            "print(json.dumps([r(v, batch=32, C=8, layers=5, size=32) for v in "
            "('adarts-fused', 'adarts-fused-recompute')]))")
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr
    for row in json.loads(out.stdout.strip().splitlines()[-1]):
        assert row["saved_bytes"] > 10e6, row
        assert 0.9 <= row["ratio"] <= 1.1, row


FUSED_OPS = ("attention_score", "attention_gather", "attention_writeback", "mixed_sum")


def test_memory_report_and_benchmarks_take_impl(tmp_path, capsys):
    """``--impl`` reaches the fused ops of the memory report and of the supernet benchmarks;
    an explicit backend that cannot run is refused before any measurement."""
    from adarts_kernels.profiling.__main__ import main
    from adarts_kernels.profiling.report import VARIANTS
    assert {kernels for _, kernels, _ in VARIANTS.values()} == {"modules", "fused"}
    js = tmp_path / "m.json"
    assert main(["--C", "8", "--layers", "3", "--size", "16", "--batch", "2", "--plot", "", "--json", str(js),
                 "--variants", "pcdarts", "adarts-fused", "--impl", "reference"]) == 0
    rows = json.loads(js.read_text())
    assert rows[0]["backends"] is None
    assert rows[1]["backends"] == {op: "reference" for op in FUSED_OPS}
    assert "fused ops on the reference backend" in capsys.readouterr().out
    assert main(["--C", "8", "--layers", "3", "--impl", "cuda", "--plot", ""]) == 2
    assert "backend 'cuda' cannot run here" in capsys.readouterr().err

    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import supernet_memory
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    out = tmp_path / "sm.json"
    supernet_memory.main(["--C", "4", "--layers", "3", "--size", "8", "--batch", "2", "--edges", "adarts",
                          "adarts-fused", "--impl", "reference", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [r["impl"] for r in rows] == [None, "reference"]
    with pytest.raises(SystemExit):
        supernet_memory.main(["--impl", "cuda"])
    assert "cannot run here" in capsys.readouterr().err
