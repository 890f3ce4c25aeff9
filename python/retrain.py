#!/usr/bin/env python
"""Retrain from this checkout: ``adarts-retrain`` (:mod:`adarts_kernels.commands.retrain`, which
holds the options and their help) run on the checkout's own ``adarts_kernels``."""
import sys

from _checkout import use_checkout  # python/_checkout.py: a script's directory is first on sys.path

use_checkout("retrain.py")

from adarts_kernels.commands.retrain import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
