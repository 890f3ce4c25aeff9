#!/usr/bin/env python
"""Eager against CUDA-graph search steps (``--cuda-graphs``, ``adarts_kernels.nas.graphs``).

Per variant and batch: the median time of a full search step (architecture step + weight
step, both optimizers), eager (``search_step``, as ``benchmarks/supernet.py`` times it) and
replayed from CUDA graphs (``GraphedSearchStep``: forward and backward replayed, the
optimizer steps eager), on two copies of the same network; after the warm-up (2 eager steps;
the graphed step's first call warms up and captures) the two steps alternate round by round,
so that machine drift hits both alike. Also the peak memory of each (``max_memory_allocated``
over two steps after the first; the graphed one includes its graph pool) and the capture time.

    python benchmarks/graphs_step.py --out /tmp/graphs_step_cuda.json     # GPU: pcdarts, adarts-fused, batch 64, 256
    python benchmarks/graphs_step.py --dry-run --out /tmp/dry.json          # CPU: the code path, stand-in graphs

A GPU is needed for numbers; on a CPU the script refuses, unless ``--dry-run``, which runs the
same code at a tiny configuration with the CPU stand-in graph API
(``adarts_kernels.nas.graphs.ReplayGraphAPI``): its times mean nothing. Writes one JSON file
(``--out``), rewritten after each row (batch by batch, the variants in turn).
"""
import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from _harness import meta  # noqa: E402
from supernet import make_step  # noqa: E402

from adarts_kernels.nas.architect import Architect  # noqa: E402
from adarts_kernels.nas.graphs import GraphedSearchStep, ReplayGraphAPI  # noqa: E402
from adarts_kernels.profiling.report import VARIANTS, build_supernet  # noqa: E402

DEFAULT_VARIANTS = ["pcdarts", "adarts-fused"]


def make_graphed_step(variant, batch, device, C, layers, size, graph_api=None):
    """The graphed twin of ``supernet.make_step``: the same network, optimizers and batch."""
    net = build_supernet(variant, C, layers).to(device)
    w = list(net.weight_parameters())
    opt = torch.optim.SGD(w, lr=0.01, momentum=0.9, weight_decay=3e-4)
    graphed = GraphedSearchStep(net, Architect(net), opt, w, graph_api=graph_api)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, net.classifier.out_features, (batch,), device=device)

    def step():
        graphed(x, y, x, y, 0.01, 5.0)
    step.graphed = graphed
    return step


def sync(device):
    if device.type == "cuda":  # GPU-only: timing and peak memory, exercised by benchmarks/device_suite.sh
        torch.cuda.synchronize(device)


def timed(step, device) -> float:
    sync(device)
    t0 = time.perf_counter()
    step()
    sync(device)
    return (time.perf_counter() - t0) * 1e3


def peak_mb(step, device):
    """Peak memory over two steps (after earlier ones), in MB; ``None`` on CPU."""
    if device.type != "cuda":
        return None
    # GPU-only: peak memory, exercised by benchmarks/device_suite.sh
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    step()
    sync(device)
    return torch.cuda.max_memory_allocated(device) / 1e6


def measure(variant, batch, device, C, layers, size, reps, graph_api=None) -> dict:
    eager = make_step(variant, batch, device, C, layers, size)
    graphed = make_graphed_step(variant, batch, device, C, layers, size, graph_api)
    for _ in range(2):
        eager()
    capture_ms = timed(graphed, device)      # warm-up and capture, then the first replay
    graphed()
    times = {"eager": [], "graphed": []}
    for _ in range(reps):                    # alternating: drift hits both alike
        times["eager"].append(timed(eager, device))
        times["graphed"].append(timed(graphed, device))
    row = {"variant": variant, "batch": batch,
           "eager_ms": statistics.median(times["eager"]), "graphed_ms": statistics.median(times["graphed"]),
           "first_graphed_call_ms": capture_ms, "captures": graphed.graphed.captures,
           "eager_fallbacks": graphed.graphed.eager_steps,
           "eager_peak_mb": peak_mb(eager, device), "graphed_peak_mb": peak_mb(graphed, device)}
    row["speedup"] = row["eager_ms"] / row["graphed_ms"]
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=list(VARIANTS))
    p.add_argument("--batch", type=int, nargs="+", default=None, help="batches (default: 64 256; dry run: 4)")
    p.add_argument("--C", type=int, default=None, help="initial channels (default: 16; dry run: 4)")
    p.add_argument("--layers", type=int, default=None, help="cells (default: 8; dry run: 3)")
    p.add_argument("--size", type=int, default=None, help="input size (default: 32; dry run: 8)")
    p.add_argument("--reps", type=int, default=None, help="timed rounds (default: 5; dry run: 2)")
    p.add_argument("--dry-run", action="store_true",
                   help="run the code path on CPU with the stand-in graph API at a tiny configuration (times "
                        "meaningless)")
    p.add_argument("--out", required=True, help="the JSON file to write")
    a = p.parse_args(argv)
    dry = a.dry_run
    device = torch.device("cpu" if dry else a.device)
    if not dry and (device.type != "cuda" or not torch.cuda.is_available()):
        p.error(f"CUDA graphs need a CUDA device (got {device}{'' if torch.cuda.is_available() else ', none seen'}); "
                "--dry-run runs the code path on CPU with the stand-in graph API")
    C, layers, size = a.C or (4 if dry else 16), a.layers or (3 if dry else 8), a.size or (8 if dry else 32)
    batches, reps = a.batch or ([4] if dry else [64, 256]), a.reps or (2 if dry else 5)
    doc = {"meta": {**meta(device), "dry_run": dry,
                    "config": {"C": C, "layers": layers, "size": size, "batches": batches, "reps": reps,
                               "threads": torch.get_num_threads()},
                    "method": "median of alternating eager / graphed search steps after warm-up; peak: "
                              "max_memory_allocated over two steps (the graphed one includes its graph pool)"},
           "rows": []}
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    for b in batches:               # batch by batch, the file rewritten after each row: a run cut
        for v in a.variants:        # short by a timeout keeps what it measured
            api = ReplayGraphAPI() if dry else None
            row = measure(v, b, device, C, layers, size, reps, api)
            doc["rows"].append(row)
            with open(a.out, "w") as f:
                json.dump(doc, f, indent=1)
            print({k: (round(x, 3) if isinstance(x, float) else x) for k, x in row.items()}, flush=True)
            if device.type == "cuda":    # GPU-only: the next pair starts from an empty cache
                torch.cuda.empty_cache()
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
