"""Run a checkout's own ``adarts_kernels``: the shared start of ``search.py`` and ``retrain.py``.

A checkout's drivers must run the checkout's code, also where another copy of the package is
installed (``pip install adarts-kernels``, or an editable install of another clone): the
checkout root goes first on ``sys.path``. When such a copy exists, one line on stderr says
which copy is imported and which is not used, so nobody debugs the other one by mistake.
"""
import importlib.util
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _package_dir(spec):
    """The resolved directory of the package ``spec`` finds (``None`` without a spec)."""
    if spec is None:
        return None
    if spec.submodule_search_locations:
        return os.path.realpath(list(spec.submodule_search_locations)[0])
    return os.path.realpath(os.path.dirname(spec.origin)) if spec.origin else None


def use_checkout(script: str) -> None:
    """Put the checkout root first on ``sys.path`` and, if another copy of ``adarts_kernels``
    is importable, print ``<script>: using adarts_kernels from ... , not ...`` on stderr.

    The other copy is looked up BEFORE the root is inserted (afterwards the checkout hides
    it); what is imported is looked up after, since an import hook placed ahead of
    ``sys.path`` could still win, and the line must name the copy that really runs."""
    checkout = os.path.realpath(os.path.join(ROOT, "adarts_kernels"))
    before = _package_dir(importlib.util.find_spec("adarts_kernels"))
    sys.path.insert(0, ROOT)
    if before is None or before == checkout:
        return
    used = _package_dir(importlib.util.find_spec("adarts_kernels"))
    if used == checkout:
        print(f"{script}: using adarts_kernels from the checkout {checkout}, not the installed copy at {before}",
              file=sys.stderr)
    else:
        print(f"{script}: using the installed adarts_kernels at {used}, not the checkout's {checkout} (an "
              f"import hook puts it first)", file=sys.stderr)
