"""Triton kernels of the fused ADARTS edge operations (scoring, gather, write-back, mixed sum).

One module per op, imported directly by its caller (``adarts_kernels.ops.<op>``)::

    adarts_kernels.triton.attention_score:      attention_score_fwd(x, w1, w2, n_select) -> (a, idx)
                                                attention_score_bwd(grad_a, x, w1, w2, a) -> (dx, dw1, dw2)
    adarts_kernels.triton.attention_gather:     attention_gather_fwd(x, a, idx) -> x_sel
                                                attention_gather_bwd(grad, x, a, idx) -> (dx, da)
    adarts_kernels.triton.attention_writeback:  attention_writeback_fwd(x, a, idx, y, beta, stride) -> out
                                                attention_writeback_bwd(grad, x, a, idx, y, beta, stride)
                                                    -> (dx, da, dy, dbeta)
    adarts_kernels.triton.mixed_sum:            mixed_sum_fwd / mixed_sum_bwd

The launchers take and return torch tensors with exactly the signatures and return values
of the plain-PyTorch reference (:mod:`adarts_kernels.ops.reference`, the contract). Their
shared helpers are in :mod:`adarts_kernels.triton._common`.

Importing this package imports neither triton nor the kernel modules: ``HAS_TRITON`` and
``TRITON_ERROR`` are resolved lazily on first attribute access (PEP 562), so the package
imports (and ``HAS_TRITON`` reads ``False``) where triton is missing.

Debugging aid: with ``POISON_OUTPUTS = True`` on this package (or ``ADARTS_TRITON_POISON=1``
in the environment at import) every buffer a launcher allocates for a kernel to fill is
first filled with NaN (floating) or a large sentinel (integer), so an element a kernel
forgets to write shows up in the comparison with the reference.
"""
from __future__ import annotations

import os

# Kept for mixed_sum.py, which imports these names from the package until it imports _common.
from ._common import acc_dtype as _acc_dtype  # noqa: F401
from ._common import acc_torch as _acc_torch  # noqa: F401
from ._common import block_hw as _block_hw  # noqa: F401
from ._common import empty as _empty  # noqa: F401
from ._common import import_triton as _import_triton
from ._common import num_warps as _num_warps  # noqa: F401
from ._common import require as _require  # noqa: F401

__all__ = ["HAS_TRITON", "TRITON_ERROR", "POISON_OUTPUTS"]

POISON_OUTPUTS = os.environ.get("ADARTS_TRITON_POISON", "") == "1"


def __getattr__(name):
    if name == "HAS_TRITON":
        return _import_triton()[2] is None
    if name == "TRITON_ERROR":
        return _import_triton()[2]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
