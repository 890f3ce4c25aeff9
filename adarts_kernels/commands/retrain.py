"""Retrain driver: train the network of a genotype from scratch and report test accuracy.

    python python/retrain.py --genotype runs/search-digits-adarts/genotype.json
    python python/retrain.py --dataset cifar10 --data ~/data --genotype ADARTS_V1   # docs/method.md section 1
"""
from __future__ import annotations

import argparse
import os

from ..nas.config import RETRAIN_PRESETS, RetrainConfig
from ..nas.genotypes import PUBLISHED
from ..nas.retrain_loop import run_retrain
from ..utils.cli import (HelpFormatter, add_data_options, add_imagenet_options, add_run_options, imagenet_settings,
                         shared_settings)
from . import REPORTED, report

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    d = RetrainConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--genotype", default=d.genotype,
                   help=f"a published cell ({', '.join(sorted(PUBLISHED))}) or the path of a genotype.json")
    add_data_options(p, dataset=d.dataset)
    p.add_argument("--out", default=None, help="run directory (default: runs/retrain-<dataset>)")
    p.add_argument("--preset", default=None, choices=sorted(RETRAIN_PRESETS),
                   help="darts: C=36, 20 cells, batch 96, lr 0.025, 600 epochs, auxiliary, drop-path 0.3, "
                        "cutout 16; digits: C=16, 6 cells, batch 64, lr 0.05, 30 epochs, auxiliary, drop-path "
                        "0.1, cutout 4, for the embedded data set; imagenet-darts: NetworkImageNet C=48, 14 cells, "
                        "batch 128, lr 0.1 x0.97 every epoch, 250 epochs, label smoothing 0.1, top-5; "
                        "imagenet-pcdarts: the same with batch 1024, lr 0.5, 5 warm-up epochs, then linear decay "
                        "to 0 (default: digits for digits, darts for CIFAR, imagenet-darts for ImageNet)")
    p.add_argument("--C", type=int, default=None, help="initial channels (default: the preset's)")
    p.add_argument("--layers", type=int, default=None, help="cells (default: the preset's)")
    p.add_argument("--batch-size", type=int, default=None, help="batch size (default: the preset's)")
    p.add_argument("--lr", type=float, default=None,
                   help="initial lr, cosine-annealed to 0 (the imagenet-* presets: their own schedule) (default: "
                        "the preset's, scaled linearly with the batch size)")
    p.add_argument("--epochs", type=int, default=None, help="epochs (default: the preset's)")
    p.add_argument("--auxiliary", dest="auxiliary", action="store_true", default=None,
                   help=f"auxiliary classifier, loss weight {d.auxiliary_weight} (default: the preset's, on for "
                        "both)")
    p.add_argument("--no-auxiliary", dest="auxiliary", action="store_false",
                   help="no auxiliary classifier (default: the preset's)")
    p.add_argument("--drop-path", type=float, default=None,
                   help="final drop-path probability, ramped linearly from 0 over the epochs (default: the "
                        "preset's)")
    p.add_argument("--cutout", type=int, default=None, help="cutout length, 0: off (default: the preset's)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="replay each step's forward and backward from a CUDA graph (captured again when the "
                        "drop-path probability changes), the optimizer step eager; a batch of another shape runs "
                        "eagerly (one GPU, not with torchrun)")
    add_imagenet_options(p, search=False)
    add_run_options(p, seed=d.seed, device=d.device)
    return p


def main(argv=None) -> int:
    """``adarts-retrain``: parse ``argv`` (default ``sys.argv[1:]``), run the retrain; returns
    the exit code (0 done, 2 refused or failed: one ``error:`` line on stderr)."""
    p = build_parser()
    a = p.parse_args(argv)
    cfg = RetrainConfig(
        genotype=a.genotype, out=a.out or os.path.join("runs", f"retrain-{a.dataset}"), preset=a.preset, C=a.C,
        layers=a.layers, batch_size=a.batch_size, lr=a.lr, epochs=a.epochs, auxiliary=a.auxiliary,
        drop_path=a.drop_path, cutout=a.cutout, cuda_graphs=a.cuda_graphs, **shared_settings(a),
        **imagenet_settings(p, a, RetrainConfig.image_size))
    try:
        run_retrain(cfg)
    except REPORTED as e:
        return report(e, cfg)
    return 0

