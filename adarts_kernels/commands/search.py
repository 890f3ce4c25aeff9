"""Architecture search driver: ADARTS (default), PC-DARTS or DARTS.

    python python/search.py                                   # digits, embedded, no download
    python python/search.py --dataset cifar10 --data ~/data   # docs/method.md section 4 defaults
    python python/search.py --dataset cifar10 --data ~/data --preset pcdarts --edge pcdarts
    python python/search.py ... --resume                      # continue an interrupted run
    python python/search.py --dataset cifar10 --data ~/data --batch-size auto --recompute edge   # GPU

The adarts edge runs on the fused kernels by default (``--kernels modules`` for the plain-PyTorch
modules); ``--impl`` picks the backend of the fused ops (``auto``, ``reference``, ``cpp``,
``cuda``, ``triton``; default ``$ADARTS_KERNELS_IMPL`` or ``auto``); ``--recompute edge``
trades about a third more step time for a quarter of the memory.
"""
from __future__ import annotations

import argparse
import os

from ..backend import IMPLS
from ..distributed import is_main_process
from ..nas.config import SEARCH_PRESETS, SearchConfig
from ..nas.search_loop import run_search
from ..nas.search_model import KERNELS
from ..utils.cli import (HelpFormatter, add_data_options, add_imagenet_options, add_run_options, imagenet_settings,
                         shared_settings)
from . import REPORTED, report

__all__ = ["build_parser", "main"]


def _batch_size(text: str):
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', got {text!r}")
    return value


def _kernels(text: str):
    if text == "reference":
        raise argparse.ArgumentTypeError("'reference' is now called 'modules' (the plain-PyTorch modules); "
                                          "the reference backend of the fused ops is --impl reference")
    if text not in KERNELS:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(KERNELS)}, got {text!r}")
    return text


def build_parser() -> argparse.ArgumentParser:
    d = SearchConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_data_options(p, dataset=d.dataset)
    p.add_argument("--out", default=None, help="run directory (default: runs/search-<dataset>-<edge>)")
    p.add_argument("--preset", default=None, choices=sorted(SEARCH_PRESETS),
                   help="adarts: the authors' defaults (batch 64, lr 0.025, 80 epochs, 15 warm-up); pcdarts: "
                        "batch 256, lr 0.1, 50 epochs; digits: C=8, 5 cells, batch 64, lr 0.05, 10 epochs, 3 "
                        "warm-up, for the embedded data set; imagenet: PC-DARTS's ImageNet search, batch 1024, lr "
                        "0.5 (5 warm-up epochs), 50 epochs, architecture (Adam 6e-3) from epoch 35 (default: digits "
                        "for digits, adarts for CIFAR, imagenet for ImageNet)")
    p.add_argument("--edge", default=d.edge, choices=["adarts", "pcdarts", "darts"],
                   help="edge of the supernet: ADARTS or one of the baselines")
    p.add_argument("--k", type=int, default=None,
                   help="1/k of the channels go through the candidates (default: 2 on ImageNet, 4 otherwise)")
    p.add_argument("--kernels", default=d.kernels, type=_kernels, metavar="{" + ",".join(KERNELS) + "}",
                   help="auto: the fused kernels for the adarts edge, the plain-PyTorch modules otherwise; "
                        "fused; modules")
    p.add_argument("--impl", default=None, choices=list(IMPLS),
                   help="backend of the fused ops (default: $ADARTS_KERNELS_IMPL, else auto: cuda > triton > "
                        "reference on GPU, cpp > reference on CPU); an explicit one that cannot run is an error")
    p.add_argument("--recompute", default=d.recompute, choices=["none", "edge"],
                   help="edge: keep only each edge's input and recompute the edge in backward")
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast (float32 without it)")
    p.add_argument("--channels-last", action="store_true", help="channels_last memory format (GPU only)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="replay each step's forward and backward from CUDA graphs, the optimizer steps eager; a "
                        "batch of another shape (the last of an epoch) runs eagerly (one GPU, first order, not "
                        "with torchrun, --unrolled or --batch-size auto)")
    p.add_argument("--C", type=int, default=None, help="initial channels (default: the preset's)")
    p.add_argument("--layers", type=int, default=None, help="cells (default: the preset's)")
    p.add_argument("--batch-size", type=_batch_size, default=None,
                   help="an integer, or 'auto': the largest batch that fits the GPU (probed with real steps, "
                        "10%% margin), with the lr scaled linearly (default: the preset's)")
    p.add_argument("--lr", type=float, default=None, help="weight lr (default: the preset's, scaled linearly "
                                                          "with the batch size)")
    p.add_argument("--epochs", type=int, default=None, help="epochs (default: the preset's)")
    p.add_argument("--warmup-epochs", type=int, default=None,
                   help="first epochs without architecture updates (default: the preset's)")
    p.add_argument("--unrolled", action="store_true", help="second-order architecture gradient")
    add_imagenet_options(p, search=True)
    add_run_options(p, seed=d.seed, device=d.device)
    return p


def main(argv=None) -> int:
    """``adarts-search``: parse ``argv`` (default ``sys.argv[1:]``), run the search; returns
    the exit code (0 done, 2 refused or failed: one ``error:`` line on stderr)."""
    p = build_parser()
    a = p.parse_args(argv)
    cfg = SearchConfig(
        out=a.out or os.path.join("runs", f"search-{a.dataset}-{a.edge}"), preset=a.preset, edge=a.edge, k=a.k,
        kernels=a.kernels, impl=a.impl, recompute=a.recompute, amp=a.amp, channels_last=a.channels_last,
        cuda_graphs=a.cuda_graphs,
        C=a.C, layers=a.layers, batch_size=a.batch_size, lr=a.lr, epochs=a.epochs,
        warmup_epochs=a.warmup_epochs, unrolled=a.unrolled, **shared_settings(a),
        **imagenet_settings(p, a, SearchConfig.image_size))
    try:
        result = run_search(cfg)
    except REPORTED as e:
        return report(e, cfg)
    if is_main_process():
        print(f"genotype written to {os.path.join(result['out'], 'genotype.json')}")
    return 0

