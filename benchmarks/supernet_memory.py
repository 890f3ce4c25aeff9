#!/usr/bin/env python
"""Bytes saved for backward per sample, for the three supernet edges (docs/method.md section 8).

Counts, each storage once, what one training forward (logits and cross-entropy) of the
search supernet keeps for backward, parameters and buffers excluded
(``adarts_kernels.profiling.saved_activation_bytes``). Deterministic: no timing involved.

    python benchmarks/supernet_memory.py                       # C=16, 8 cells, 32x32, batch 8 and 16
    python benchmarks/supernet_memory.py --batch 8 16 32 --json benchmarks/results/supernet_memory.json
    python benchmarks/supernet_memory.py --impl reference      # the fused ops on their reference backend
"""
import argparse
import datetime
import json
import os
import platform
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from adarts_kernels.backend import IMPLS, resolve  # noqa: E402
from adarts_kernels.profiling import saved_activation_bytes  # noqa: E402
from adarts_kernels.profiling.report import VARIANTS, build_supernet  # noqa: E402

PCDARTS_SPEC_MB = 39.9   # docs/method.md section 8, PC-DARTS official code


def commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                       cwd=os.path.dirname(os.path.abspath(__file__)),
                                       stderr=subprocess.DEVNULL).strip()
    except Exception:
        return "unknown"


def measure(variant: str, C: int, layers: int, size: int, batch: int, k: int, seed: int = 0,
            impl=None) -> dict:
    net = build_supernet(variant, C, layers, k, seed=seed, impl=impl)
    backends = net.backends("cpu")
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, 10, (batch,))
    nbytes = saved_activation_bytes(lambda: net.loss(x, y), module=net)
    return {"edge": variant, "impl": backends["mixed_sum"] if backends else None, "C": C, "layers": layers, "size": size, "k": k, "batch": batch,
            "saved_bytes": nbytes, "mb_per_sample": nbytes / batch / 1e6}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--C", type=int, default=16)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--batch", type=int, nargs="+", default=[8, 16])
    p.add_argument("--edges", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--impl", default=None, choices=list(IMPLS),
                   help="backend of the fused ops (default: $ADARTS_KERNELS_IMPL, else auto)")
    p.add_argument("--json", default=None, help="also write the rows (with device, torch, commit) here")
    a = p.parse_args(argv)

    try:
        resolve(a.impl, torch.device("cpu"))     # an explicit --impl that cannot run on CPU: fail now
    except RuntimeError as e:
        p.error(str(e))
    rows = [measure(e, a.C, a.layers, a.size, b, a.k, impl=a.impl) for e in a.edges for b in a.batch]
    print(f"bytes saved for backward per sample (MB = 1e6 bytes), C={a.C}, {a.layers} cells, "
          f"{a.size}x{a.size}, float32, k={a.k}")
    print("| edge | " + " | ".join(f"batch {b}" for b in a.batch) + " | vs PC-DARTS |")
    print("|---|" + "---|" * len(a.batch) + "---|")
    pc = {r["batch"]: r["mb_per_sample"] for r in rows if r["edge"] == "pcdarts"}
    for e in a.edges:
        rs = [r for r in rows if r["edge"] == e]
        ratio = (f"{rs[-1]['mb_per_sample'] / pc[rs[-1]['batch']]:.2f}x" if pc else "-")
        print(f"| {e} | " + " | ".join(f"{r['mb_per_sample']:.2f} MB" for r in rs) + f" | {ratio} |")
    if pc and (a.C, a.layers, a.size, a.k) == (16, 8, 32, 4):
        worst = max(abs(v - PCDARTS_SPEC_MB) / PCDARTS_SPEC_MB for v in pc.values())
        print(f"PC-DARTS vs docs/method.md section 8 ({PCDARTS_SPEC_MB} MB): off by at most {100 * worst:.2f}%")
    if a.json:
        meta = {"date": datetime.date.today().isoformat(), "device": "cpu", "machine": platform.machine(),
                "torch": torch.__version__, "commit": commit()}
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
        print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
