#!/usr/bin/env python
"""What a missing compiled extension costs: a full search step (architecture step + weight
step) of the fused ADARTS supernet with its ops on the plain-PyTorch reference backend against
the same step on the compiled C++ kernels, interleaved, one run, CPU.

adarts_kernels._ext quotes the ratio in its fallback warning (REFERENCE_SLOWDOWN).

    python benchmarks/reference_vs_cpp.py            # C=16, 8 cells, 32x32, batch 16
Writes ``reference_vs_cpp_cpu.json`` into ``--out`` (default benchmarks/results).
"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from _harness import print_table, write_results  # noqa: E402
from supernet import make_step  # noqa: E402

from adarts_kernels.backend import resolve  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--C", type=int, default=16)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    a = p.parse_args(argv)
    device = torch.device("cpu")
    resolve("cpp", device)                       # the compiled kernels must be there: fail now
    impls = ("reference", "cpp")
    steps = {i: make_step("adarts-fused", a.batch, device, a.C, a.layers, a.size, impl=i) for i in impls}
    for step in steps.values():
        for _ in range(2):
            step()
    times = {i: [] for i in impls}
    for _ in range(a.reps):                      # interleaved: machine drift hits both alike
        for i, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[i].append((time.perf_counter() - t0) * 1e3)
    rows = [{"impl": i, "C": a.C, "layers": a.layers, "size": a.size, "batch": a.batch, "threads":
             torch.get_num_threads(), "step_ms": statistics.median(times[i]), "reps": a.reps} for i in impls]
    for r in rows:
        r["step_vs_cpp"] = r["step_ms"] / rows[-1]["step_ms"]
    path = write_results("reference_vs_cpp", rows, device, a.out)
    print_table(rows, ["impl", "step_ms", "step_vs_cpp"])
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
