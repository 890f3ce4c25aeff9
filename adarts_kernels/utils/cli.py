"""Command-line helpers shared by the drivers and ``python -m adarts_kernels.profiling``."""
from __future__ import annotations

import argparse

from ..distributed import DEFAULT_CHECK_EVERY, DEFAULT_TIMEOUT_S

__all__ = ["HelpFormatter", "add_data_options", "add_run_options"]


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
    p.add_argument("--dataset", default=dataset, choices=["digits", "cifar10", "cifar100"],
                   help="digits: embedded (scikit-learn), no download; cifar10/cifar100: read from --data")
    p.add_argument("--data", default=None, metavar="DIR",
                   help="CIFAR only: root holding cifar-10-batches-py / cifar-100-python (default: none; "
                        "refused with digits)")
    p.add_argument("--download", action="store_true", help="CIFAR only: download into --data if missing")
