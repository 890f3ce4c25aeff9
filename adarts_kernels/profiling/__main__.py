"""``python -m adarts_kernels.profiling``: the supernet memory report.

Prints, for a supernet configuration, the bytes saved for backward per sample by DARTS,
PC-DARTS, ADARTS on the plain-PyTorch modules, ADARTS fused and fused + edge recomputation
(the fused ops on the backend ``--impl``), the largest
batch each could fit in ``--gib`` GiB, and with ``--plot PATH`` a plot of memory against
batch size. ``--dataset imagenet`` measures PC-DARTS's ImageNet supernet (two stride-2 stems;
defaults 224x224, k=2, 1000 classes, batch 2) instead of the CIFAR one (32x32, k=4, batch 4).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from ..backend import IMPLS, resolve
from ..utils.cli import HelpFormatter
from .report import DATASETS, VARIANTS, format_report, memory_report, plot_memory, rss_crosscheck


def _prog() -> str:
    """``adarts-memory`` (the console command) or ``python -m adarts_kernels.profiling``."""
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return "python -m adarts_kernels.profiling" if name in ("", "__main__.py", "-c") else name


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=_prog(), description=__doc__,
                                formatter_class=HelpFormatter)
    p.add_argument("--dataset", default="cifar", choices=list(DATASETS),
                   help="the supernet's stem and the defaults of --k, --size, --batch and the classes")
    p.add_argument("--C", type=int, default=16, help="initial channels")
    p.add_argument("--layers", type=int, default=8, help="cells")
    p.add_argument("--k", type=int, default=None, help="1/k of the channels through the candidates "
                                                        "(default: 4 for cifar, 2 for imagenet)")
    p.add_argument("--size", type=int, default=None, help="input height and width (default: 32 for cifar, "
                                                           "224 for imagenet)")
    p.add_argument("--batch", type=int, default=None, help="batch of the measuring forward (default: 4 for cifar, "
                                                            "2 for imagenet)")
    p.add_argument("--gib", type=float, default=11.0, help="memory budget, GiB, for the largest-batch column")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                   help="the supernets to measure")
    p.add_argument("--impl", default=None, choices=list(IMPLS),
                   help="backend of the fused ops (default: $ADARTS_KERNELS_IMPL, else auto)")
    p.add_argument("--plot", default=None, metavar="PNG",
                   help="also write a plot of memory against batch size here (default: no plot)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the rows here (default: not written)")
    p.add_argument("--rss-check", type=int, default=0, metavar="BATCH",
                   help="also compare with RSS growth at this batch (fused variants; Linux; default 0: off)")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """The parsed command line, ``--k``, ``--size`` and ``--batch`` filled in from ``--dataset``."""
    a = build_parser().parse_args(argv)
    for key in ("k", "size", "batch"):
        if getattr(a, key) is None:
            setattr(a, key, DATASETS[a.dataset][key])
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    div = 32 if a.dataset == "imagenet" else 4
    if a.k < 1 or a.C % a.k or a.size % div or a.batch < 1:
        print(f"error: C must be divisible by k, size by {div} ({a.dataset}) and batch positive, got C={a.C}, "
              f"k={a.k}, size={a.size}, batch={a.batch}", file=sys.stderr)
        return 2
    try:
        resolve(a.impl, torch.device("cpu"))     # an explicit --impl that cannot run on CPU: fail now
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rows = memory_report(a.variants, a.C, a.layers, a.k, a.size, a.batch, a.gib, impl=a.impl, dataset=a.dataset)
    fused = sorted({b for r in rows if r["backends"] for b in r["backends"].values()})
    print(format_report(rows, a.gib, f"{'ImageNet' if a.dataset == 'imagenet' else 'CIFAR'} supernet C={a.C}, "
                                     f"{a.layers} cells, {a.size}x{a.size}, k={a.k}, float32 "
                                     f"(MB = 1e6 bytes; largest batch estimated from saved bytes + model state)"
                                     + (f"; fused ops on the {', '.join(fused)} backend" if fused else "")))
    if a.rss_check:
        for v in [v for v in a.variants if v.startswith("adarts-fused")]:
            r = rss_crosscheck(v, a.rss_check, a.C, a.layers, a.k, a.size, impl=a.impl, dataset=a.dataset)
            print(f"{v}: saved_activation_bytes {r['saved_bytes'] / 1e6:.1f} MB, RSS growth "
                  f"{r['rss_growth'] / 1e6:.1f} MB at batch {a.rss_check} (ratio {r['ratio']:.3f})")
    if a.plot:
        print(f"plot: {plot_memory(rows, a.gib, a.plot)}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
