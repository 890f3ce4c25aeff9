"""The console commands of the package; a pip install has them, a checkout runs the same code
through ``python/search.py`` and ``python/retrain.py``.

- ``adarts-search``: :func:`adarts_kernels.commands.search.main`, the architecture search;
- ``adarts-retrain``: :func:`adarts_kernels.commands.retrain.main`, the retrain of a genotype;
- ``adarts-memory``: :func:`adarts_kernels.profiling.__main__.main`, the supernet memory report.

Each ``main(argv=None)`` parses ``argv`` (``sys.argv[1:]`` when ``None``) and returns the exit
code, which the console-script wrapper passes to ``sys.exit``: 0 when the run finished, 2 for
a refused setting or a failed run, reported as one ``error:`` line on stderr (no traceback);
``--help`` and argparse's own refusals exit from inside ``main`` as argparse does.
"""
from __future__ import annotations

import sys

from ..data import DataError
from ..distributed import explain_failure

__all__ = ["REPORTED", "report"]

#: the failures a command reports as one ``error:`` line: bad data, bad settings (``ValueError``,
#: the run directory's :class:`~adarts_kernels.nas.checkpoint.RunDirError` included), failed runs
#: (``RuntimeError``: non-finite values, a locked run directory, lost ranks) and I/O errors
REPORTED = (DataError, OSError, ValueError, RuntimeError)


def report(e: BaseException, cfg) -> int:
    """Print ``e`` as one ``error:`` line on stderr (prefixed with the rank under torchrun,
    see :func:`~adarts_kernels.distributed.explain_failure`) and return the exit code, 2."""
    print(f"error: {explain_failure(e, out=cfg.out, timeout_s=cfg.dist_timeout)}", file=sys.stderr)
    return 2
