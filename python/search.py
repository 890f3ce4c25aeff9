#!/usr/bin/env python
"""Architecture search from this checkout: ``adarts-search`` (:mod:`adarts_kernels.commands.search`,
which holds the options and their help) run on the checkout's own ``adarts_kernels``."""
import sys

from _checkout import use_checkout  # python/_checkout.py: a script's directory is first on sys.path

use_checkout("search.py")

from adarts_kernels.commands.search import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
