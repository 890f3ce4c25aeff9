"""Host cost of one supernet edge: time and aten ops per forward + backward at negligible size.

On a GPU a CIFAR search step spends microseconds per kernel, so what it costs per edge is
set by the host: Python, dispatch, autograd bookkeeping and launches. This benchmark makes
the arithmetic vanish (a few channels, 8x8 planes, batch 2, one thread) and measures, for
every edge variant, per edge forward + backward:

- host time (median over interleaved rounds: every variant runs once per round, so a
  noisy neighbour hits all of them alike; ratios are taken against PC-DARTS in one run);
- the part of that time spent inside convolution calls (``torch.profiler``: forward and
  backward convolutions; their count at stride 1 in brackets), and the rest;
- non-view aten ops (a proxy for GPU launches), counted by a dispatch mode: every op the
  dispatcher sees, a fused ``adarts::`` op as one, views (``aten.view``, ``unsqueeze``,
  ``select``...) apart. The counts are exact and do not depend on the machine. Counted twice:
  on the CPU path (channels_last copies, and below 8192 input values the depthwise
  convolutions merged: fewer oneDNN calls for more small copies) and, the proxy proper, on
  the path a GPU runs (its device choices injected: :class:`gpu_choices`).

Variants: ``pcdarts`` (PartialMixedOp), ``adarts`` (the plain-PyTorch AttentionMixedOp),
``adarts-fused`` (FusedAttentionMixedOp), ``adarts-fused-recompute`` (the fused edge under
``recompute_edge``, which re-runs it in backward), ``pcdarts-ckpt-edge`` (PartialMixedOp under
``torch.utils.checkpoint``). Each is timed at stride 1 and stride 2; ``per edge`` weighs them
as an 8-cell supernet does (96 stride-1 and 16 stride-2 edges of 112).

A second table times a whole supernet's loss forward + backward at negligible size (C=4,
8 cells, 8x8, batch 2) per edge, stem, preprocessing and classifier included.

    python benchmarks/host_overhead.py [--rounds 30] [--out benchmarks/results/host_overhead_cpu.json]
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from adarts_kernels.nn import AttentionMixedOp, FusedAttentionMixedOp, PartialMixedOp  # noqa: E402
from adarts_kernels.nn.recompute import recompute_edge  # noqa: E402

VARIANTS = ("pcdarts", "pcdarts-ckpt-edge", "adarts", "adarts-fused", "adarts-fused-recompute")
#: stride-1 and stride-2 edges of an 8-cell, 4-step supernet (6 normal + 2 reduction cells)
EDGE_MIX = {1: 96, 2: 16}


def make_edge(variant: str, C: int, stride: int, k: int, impl=None):
    """``(edge module, run(x, w, ew) -> out)`` of ``variant``."""
    torch.manual_seed(0)
    if variant.startswith("pcdarts"):
        edge = PartialMixedOp(C, stride, k)
    elif variant == "adarts":
        edge = AttentionMixedOp(C, stride, k)
    else:
        edge = FusedAttentionMixedOp(C, stride, k, impl=impl)
    edge.train()
    if variant == "adarts-fused-recompute":
        return edge, lambda x, w, ew: recompute_edge(edge, x, w, ew)
    if variant == "pcdarts-ckpt-edge":
        from torch.utils.checkpoint import checkpoint
        return edge, lambda x, w, ew: checkpoint(edge, x, w, ew, use_reentrant=False)
    return edge, edge


def make_case(variant: str, C: int, stride: int, k: int, B: int, size: int, impl=None, device="cpu"):
    """A closure running one forward + backward of the edge on fixed random inputs."""
    edge, run = make_edge(variant, C, stride, k, impl)
    edge.to(device)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, C, size, size, generator=g).to(device).requires_grad_()
    alpha = (1e-3 * torch.randn(8, generator=g)).to(device).requires_grad_()
    beta = torch.randn(1, generator=g).to(device).requires_grad_()
    gout = torch.randn(B, C, size // stride, size // stride, generator=g).to(device)
    leaves = [x, alpha, beta, *edge.parameters()]

    def step():
        for t in leaves:      # as a training step's zero_grad(set_to_none=True): no accumulation
            t.grad = None
        w = torch.softmax(alpha, 0)
        out = run(x, w, beta[0])
        out.backward(gout)
    return step


class OpCounter(TorchDispatchMode):
    """Counts every op the dispatcher hands to Python, views apart (an aliasing op whose
    output is a copy, as ``contiguous`` into another layout, counts as an operation). ``adarts_C::edge_fwd`` and
    ``edge_bwd`` (the fused edge's host sequence in C++) are not counted themselves: the
    operations they issue are (the mode is re-entered while they run)."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()
        self.views = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket).replace("aten::", "").replace("aten.", "")
        if name.startswith("adarts_C.edge_"):
            # the fused edge's host sequence in one call: run its kernel with this mode on the
            # stack, so that the operations it issues are counted instead
            with self:
                return func._op_dk(torch._C.DispatchKey.CompositeExplicitAutograd, *args, **(kwargs or {}))
        out = func(*args, **(kwargs or {}))
        view = getattr(func, "is_view", False)
        if view and isinstance(out, torch.Tensor) and args and isinstance(args[0], torch.Tensor):
            # ops that alias or copy (contiguous, reshape): a copy is an operation
            view = out.untyped_storage().data_ptr() == args[0].untyped_storage().data_ptr()
        (self.views if view else self.ops)[name] += 1
        return out


def conv_share(step, n: int = 20) -> float:
    """Fraction of a step's host time spent inside convolution calls (forward and backward;
    ``torch.profiler``'s total time of the outermost ``aten::convolution`` and
    ``aten::convolution_backward`` calls over the profiled time of the step)."""
    from torch.profiler import ProfilerActivity, profile, record_function
    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with record_function("host_overhead_step"):
            for _ in range(n):
                step()
    ev = {e.key: e for e in prof.key_averages()}
    total = ev["host_overhead_step"].cpu_time_total
    conv = sum(ev[k].cpu_time_total for k in ("aten::convolution", "aten::convolution_backward") if k in ev)
    return conv / total


def count_ops(step) -> OpCounter:
    step()                                 # first call: lazy initialisation out of the count
    with OpCounter() as c:
        step()
    return c


class gpu_choices:
    """Within it, the fused edge makes the choices it makes with CUDA tensors whatever the
    device (NCHW operands, no flipped depthwise input gradient, no merged depthwise
    convolutions: the device checks of ``adarts_kernels.nn.units`` replaced), so that its
    operations on CPU are the ones it would launch on a GPU."""

    NAMES = ("_channels_last_pays", "_flip_pays", "_merge_pays")

    def __enter__(self):
        from adarts_kernels.nn import units
        self.saved = {k: getattr(units, k) for k in self.NAMES}
        units._channels_last_pays = lambda t: False
        units._flip_pays = lambda t: False
        units._merge_pays = lambda t, channels: False
        return self

    def __exit__(self, *exc):
        from adarts_kernels.nn import units
        for k, v in self.saved.items():
            setattr(units, k, v)
        return False


def count_gpu_ops(variant: str, C: int, stride: int, k: int, B: int, size: int, impl=None,
                  device="cpu") -> OpCounter:
    """:func:`count_ops` of a fresh case under :class:`gpu_choices`: the operations per edge a GPU
    would launch (on CPU tensors the same: the fused kernels' CPU and CUDA paths issue the same
    ops; with CUDA tensors the injected choices are the ones made anyway)."""
    with gpu_choices():
        return count_ops(make_case(variant, C, stride, k, B, size, impl, device))


def _sync(device) -> None:
    if torch.device(device).type == "cuda":   # GPU-only: run by benchmarks/device_suite.sh
        torch.cuda.synchronize(device)


def time_rounds(cases: dict, rounds: int, reps: int, device="cpu") -> dict:
    """Median seconds per call of each case, interleaved: each round runs every case ``reps``
    times (on a GPU the device is synchronised before and after: what is timed is the longer
    of the host's and the device's work)."""
    for f in cases.values():
        for _ in range(3):
            f()
    samples = {k: [] for k in cases}
    order = list(cases)
    for r in range(rounds):
        for key in (order if r % 2 == 0 else order[::-1]):
            f = cases[key]
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(reps):
                f()
            _sync(device)
            samples[key].append((time.perf_counter() - t0) / reps)
    return {k: statistics.median(v) for k, v in samples.items()}


def measure(variants=VARIANTS, C: int = 8, k: int = 4, B: int = 2, size: int = 8, rounds: int = 30, reps: int = 5,
            impl=None, device="cpu") -> dict:
    """Per-variant host time (ms) and op counts per edge forward + backward; see the module docstring."""
    cases = {(v, s): make_case(v, C, s, k, B, size, impl, device) for v in variants for s in EDGE_MIX}
    counts = {key: count_ops(f) for key, f in cases.items()}
    gpu_counts = {key: count_gpu_ops(key[0], C, key[1], k, B, size, impl, device) for key in cases}
    share = {key: conv_share(f) for key, f in cases.items()}
    med = time_rounds(cases, rounds, reps, device)
    total = sum(EDGE_MIX.values())
    rows = []
    for v in variants:
        ms = {s: 1e3 * med[(v, s)] for s in EDGE_MIX}
        ops = {s: sum(counts[(v, s)].ops.values()) for s in EDGE_MIX}
        gpu_ops = {s: sum(gpu_counts[(v, s)].ops.values()) for s in EDGE_MIX}
        views = {s: sum(counts[(v, s)].views.values()) for s in EDGE_MIX}
        conv_ms = {s: ms[s] * share[(v, s)] for s in EDGE_MIX}
        rows.append({
            "variant": v,
            "ms_per_edge": sum(ms[s] * n for s, n in EDGE_MIX.items()) / total,
            "conv_ms_per_edge": sum(conv_ms[s] * n for s, n in EDGE_MIX.items()) / total,
            "conv_calls_stride1": sum(counts[(v, 1)].ops[k] for k in ("convolution", "conv2d", "convolution_backward")),
            "ms_stride1": ms[1], "ms_stride2": ms[2],
            "ops_per_edge": sum(ops[s] * n for s, n in EDGE_MIX.items()) / total,
            "ops_stride1": ops[1], "ops_stride2": ops[2],
            "gpu_ops_per_edge": sum(gpu_ops[s] * n for s, n in EDGE_MIX.items()) / total,
            "gpu_ops_stride1": gpu_ops[1], "gpu_ops_stride2": gpu_ops[2],
            "views_stride1": views[1], "views_stride2": views[2],
            "top_ops_stride1": dict(counts[(v, 1)].ops.most_common(12)),
        })
    base = next((r for r in rows if r["variant"] == "pcdarts"), None)
    for r in rows:
        r["time_vs_pcdarts"] = None if base is None else r["ms_per_edge"] / base["ms_per_edge"]
        r["ops_vs_pcdarts"] = None if base is None else r["ops_per_edge"] / base["ops_per_edge"]
        r["gpu_ops_vs_pcdarts"] = None if base is None else r["gpu_ops_per_edge"] / base["gpu_ops_per_edge"]
    return {"config": {"C": C, "k": k, "batch": B, "size": size, "rounds": rounds, "reps": reps,
                       "threads": torch.get_num_threads(), "edge_mix": EDGE_MIX, "impl": impl, "device": str(device)},
            "rows": rows}


def measure_network(variants=VARIANTS, C: int = 4, layers: int = 8, B: int = 2, size: int = 8, rounds: int = 6,
                    reps: int = 2, impl=None, device="cpu") -> dict:
    """Host time of a whole supernet's loss forward + backward (C=4, 8 cells, 8x8, batch 2: the
    arithmetic vanishes) divided by its 112 edges: what the edges cost where they really run,
    stem, preprocessing and classifier included."""
    from adarts_kernels.nas.search_model import num_edges
    from adarts_kernels.profiling.report import build_supernet
    cases = {}
    for v in variants:
        net = build_supernet(v, C, layers, impl=impl).to(device)
        g = torch.Generator().manual_seed(3)
        x = torch.randn(B, 3, size, size, generator=g).to(device)
        y = torch.randint(0, 10, (B,), generator=g).to(device)

        params = tuple(net.parameters())

        def step(net=net, x=x, y=y, params=params):
            for p in params:
                p.grad = None
            net.loss(x, y).backward()
        cases[v] = step
    med = time_rounds(cases, rounds, reps, device)
    edges = layers * num_edges(4)
    base = med.get("pcdarts")
    rows = [{"variant": v, "ms_per_edge": 1e3 * med[v] / edges,
             "time_vs_pcdarts": None if base is None else med[v] / base} for v in variants]
    return {"config": {"C": C, "layers": layers, "batch": B, "size": size, "edges": edges, "rounds": rounds,
                       "reps": reps}, "rows": rows}


def network_table(result: dict) -> str:
    lines = ["| variant | supernet fwd+bwd host ms per edge | vs PC-DARTS |", "|---|---|---|"]
    for r in result["rows"]:
        tv = "" if r["time_vs_pcdarts"] is None else f"{r['time_vs_pcdarts']:.2f}"
        lines.append(f"| {r['variant']} | {r['ms_per_edge']:.3f} | {tv} |")
    return "\n".join(lines)


def table(result: dict) -> str:
    lines = ["| variant | host ms per edge fwd+bwd | vs PC-DARTS | of which in convolutions (calls) | "
             "the rest, ms | non-view ops per edge, CPU path | ops, GPU path | vs PC-DARTS |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        tv = "" if r["time_vs_pcdarts"] is None else f"{r['time_vs_pcdarts']:.2f}"
        ov = "" if r["gpu_ops_vs_pcdarts"] is None else f"{r['gpu_ops_vs_pcdarts']:.2f}"
        rest = r["ms_per_edge"] - r["conv_ms_per_edge"]
        lines.append(f"| {r['variant']} | {r['ms_per_edge']:.3f} | {tv} | {r['conv_ms_per_edge']:.3f} "
                     f"({r['conv_calls_stride1']}) | {rest:.3f} | {r['ops_per_edge']:.0f} | "
                     f"{r['gpu_ops_per_edge']:.0f} | {ov} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--C", type=int, default=8)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--size", type=int, default=8)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--impl", default=None)
    p.add_argument("--device", default="cpu", help="cpu or cuda (on a GPU: host time of tiny edges, launches included)")
    p.add_argument("--no-network", action="store_true", help="skip the whole-supernet measurement")
    p.add_argument("--out", default=None, help="write the result as JSON here")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    from _harness import commit
    res = measure(a.variants, a.C, a.k, a.batch, a.size, a.rounds, a.reps, a.impl, a.device)
    if not a.no_network:
        res["network"] = measure_network(a.variants, rounds=max(2, a.rounds // 4), impl=a.impl, device=a.device)
    on_gpu = torch.device(a.device).type == "cuda"
    res["machine"] = {"torch": torch.__version__, "cpus": os.cpu_count(), "commit": commit(),
                      "date": time.strftime("%Y-%m-%d"),
                      # GPU-only: the device's name, run by benchmarks/device_suite.sh
                      "gpu": torch.cuda.get_device_name() if on_gpu else None}
    print(table(res))
    if "network" in res:
        print()
        print(network_table(res["network"]))
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)
        print(f"wrote {a.out}")
    return res


if __name__ == "__main__":
    main()
