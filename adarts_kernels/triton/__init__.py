"""Triton kernels of the fused ADARTS edge operations (scoring, gather, write-back, mixed sum).

One module per op, imported directly by its caller (``adarts_kernels.ops.<op>``)::

    adarts_kernels.triton.attention_score:      attention_score_fwd(x, w1, w2, n_select) -> (a, idx)
                                                attention_score_bwd(grad_a, x, w1, w2, a) -> (dx, dw1, dw2)
    adarts_kernels.triton.attention_gather:     attention_gather_fwd(x, a, idx) -> x_sel
                                                attention_gather_bwd(grad, x, a, idx) -> (dx, da)
    adarts_kernels.triton.attention_writeback:  attention_writeback_fwd(x, a, idx, y, beta, stride) -> out
                                                attention_writeback_bwd(grad, x, a, idx, y, beta, stride)
                                                    -> (dx, da, dy, dbeta)
    adarts_kernels.triton.mixed_sum:            mixed_sum_fwd(z, x, z_weights, pool_weights, identity_weight, stride,
                                                              eps, run_mean, run_var) -> (y, mean, var)
                                                mixed_sum_bwd(grad, z, x, z_weights, pool_weights, identity_weight,
                                                              mean, var, stride, eps, training)
                                                    -> (dz, dx, dz_weights, dpool_weights, didentity_weight)

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

from ._common import import_triton

__all__ = ["HAS_TRITON", "TRITON_ERROR", "POISON_OUTPUTS"]

POISON_OUTPUTS = os.environ.get("ADARTS_TRITON_POISON", "") == "1"


def __getattr__(name):
    if name == "HAS_TRITON":
        return import_triton()[2] is None
    if name == "TRITON_ERROR":
        return import_triton()[2]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
