"""Command-line helpers shared by the drivers and ``python -m adarts_kernels.profiling``."""
from __future__ import annotations

import argparse

from ..distributed import DEFAULT_CHECK_EVERY, DEFAULT_TIMEOUT_S

__all__ = ["HelpFormatter", "add_data_options", "add_imagenet_options", "add_run_options", "imagenet_settings"]


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's layout and ends every option's help with its default:
    ``(default: off)`` for a flag, ``(default: X)`` otherwise, unless the help already
    says what the default is."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text.lower() or action.default is argparse.SUPPRESS or not action.option_strings:
            return text
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)) and action.nargs == 0:
            on = isinstance(action, argparse._StoreFalseAction)
            return f"{text} (default: {'on' if on else 'off'})"
        return f"{text} (default: %(default)s)"


def add_run_options(p: argparse.ArgumentParser, seed: int, device: str) -> None:
    """The options every training driver shares: ``--seed``, ``--limit``, ``--device``,
    ``--resume``, ``--no-progress``, and for data parallelism ``--dist-timeout``, ``--check-every``."""
    p.add_argument("--seed", type=int, default=seed, help="seed of the weights and of the batch order")
    p.add_argument("--limit", type=int, default=None, metavar="N",
                   help="use at most N images of each split, for quick smoke runs (default: all)")
    p.add_argument("--device", default=device, help="auto (the first GPU, else the CPU), cpu, cuda, cuda:1 ...")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its checkpoint; the settings must be the same")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    g = p.add_argument_group("several GPUs or machines (under torchrun; ignored by a single process)")
    g.add_argument("--dist-timeout", type=float, default=DEFAULT_TIMEOUT_S, metavar="SECONDS",
                   help="a collective waits this long for the other ranks; a rank that died or hung then ends "
                        "the job with an error")
    g.add_argument("--check-every", type=int, default=DEFAULT_CHECK_EVERY, metavar="N",
                   help="every N steps, compare checksums of alpha, beta and the weights across ranks; a "
                        "mismatch stops the run (0: only at the end of each epoch)")


def add_data_options(p: argparse.ArgumentParser, dataset: str) -> None:
    """The data options every training driver shares: ``--dataset``, ``--data``, ``--download``."""
    p.add_argument("--dataset", default=dataset, choices=["digits", "cifar10", "cifar100", "imagenet"],
                   help="digits: embedded (scikit-learn), no download; cifar10/cifar100: read from --data; "
                        "imagenet: an ImageFolder DIR/train/<class>/*.JPEG, DIR/val/<class>/*.JPEG read from --data")
    p.add_argument("--data", default=None, metavar="DIR",
                   help="CIFAR: root holding cifar-10-batches-py / cifar-100-python; ImageNet: the folder holding "
                        "train/ and val/ (default: none; refused with digits)")
    p.add_argument("--download", action="store_true", help="CIFAR only: download into --data if missing")


def add_imagenet_options(p: argparse.ArgumentParser, search: bool) -> None:
    """The ImageNet options (``--dataset imagenet``): ``--image-size``, ``--workers``,
    ``--skip-bad-images`` and, for a search, ``--train-fraction`` / ``--arch-fraction``."""
    g = p.add_argument_group("ImageNet (--dataset imagenet)")
    g.add_argument("--image-size", type=int, default=None, metavar="S",
                   help="side of the training crop, a multiple of 32 (default: 224 on ImageNet, 16 for digits; "
                        "refused with CIFAR)")
    if search:
        g.add_argument("--train-fraction", type=float, default=None, metavar="F",
                       help="share of every class that trains the weights, drawn per class with --seed and kept "
                            "in <out>/manifest.json (default: 0.1)")
        g.add_argument("--arch-fraction", type=float, default=None, metavar="F",
                       help="a disjoint share of every class that trains the architecture (default: 0.025)")
    g.add_argument("--workers", type=int, default=None, metavar="N",
                   help="JPEG decoding worker processes per loader, 0: in the main process (default: min(8, cores))")
    g.add_argument("--skip-bad-images", action="store_true",
                   help="replace a file that cannot be decoded by the next one and count it in the epoch record, "
                        "instead of stopping the run")


def imagenet_settings(p: argparse.ArgumentParser, a: argparse.Namespace, image_size: int) -> dict:
    """The config fields of :func:`add_imagenet_options`' options; ``--image-size`` with CIFAR
    is an argparse error (its images are not resized)."""
    if a.image_size is not None and a.dataset in ("cifar10", "cifar100"):
        p.error(f"--image-size: {a.dataset} images are 32x32 and are not resized")
    size = a.image_size if a.image_size is not None else (224 if a.dataset == "imagenet" else image_size)
    out = dict(image_size=size, workers=a.workers, skip_bad_images=a.skip_bad_images)
    if hasattr(a, "train_fraction"):
        out.update(train_fraction=a.train_fraction, arch_fraction=a.arch_fraction)
    return out


def shared_settings(a: argparse.Namespace) -> dict:
    """The config fields that :func:`add_data_options` and :func:`add_run_options` parsed, as
    keyword arguments of :class:`~adarts_kernels.nas.config.SearchConfig` and
    :class:`~adarts_kernels.nas.config.RetrainConfig` alike."""
    return dict(dataset=a.dataset, data=a.data, download=a.download, limit=a.limit, seed=a.seed, device=a.device,
                progress=not a.no_progress, resume=a.resume, dist_timeout=a.dist_timeout, check_every=a.check_every)
