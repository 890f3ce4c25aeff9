"""Triton kernels of the fused ADARTS edge operations (scoring, gather, write-back, mixed sum).

The launchers take and return torch tensors with exactly the signatures and return values
of the plain-PyTorch reference (:mod:`adarts_kernels.ops.reference`, the contract)::

    attention_score_fwd(x, w1, w2, n_select) -> (a, idx)
    attention_score_bwd(grad_a, x, w1, w2, a) -> (dx, dw1, dw2)
    attention_gather_fwd(x, a, idx) -> x_sel
    attention_gather_bwd(grad, x, a, idx) -> (dx, da)
    attention_writeback_fwd(x, a, idx, y, beta, stride) -> out
    attention_writeback_bwd(grad, x, a, idx, y, beta, stride) -> (dx, da, dy, dbeta)
    mixed_sum_fwd(z, x, w, stride, eps, run_mean, run_var) -> (y, mean, var)
    mixed_sum_bwd(grad, z, x, w, mean, var, stride, eps, training) -> (dz_list, dx, dw)

Importing this package imports neither triton nor the kernel modules: ``HAS_TRITON``,
``TRITON_ERROR`` and the launchers are resolved lazily on first attribute access (PEP 562),
so the package imports (and ``HAS_TRITON`` reads ``False``) where triton is missing.

Debugging aid: with ``POISON_OUTPUTS = True`` (or ``ADARTS_TRITON_POISON=1`` in the
environment at import) every buffer a launcher allocates for a kernel to fill is first
filled with NaN (floating) or a large sentinel (integer), so an element a kernel forgets
to write shows up in the comparison with the reference.
"""
from __future__ import annotations

import importlib
import os

__all__ = [
    "HAS_TRITON", "TRITON_ERROR", "POISON_OUTPUTS",
    "attention_score_fwd", "attention_score_bwd",
    "attention_gather_fwd", "attention_gather_bwd",
    "attention_writeback_fwd", "attention_writeback_bwd",
    "mixed_sum_fwd", "mixed_sum_bwd",
]

POISON_OUTPUTS = os.environ.get("ADARTS_TRITON_POISON", "") == "1"

_LAUNCHERS = {
    "attention_score_fwd": "attention_score",
    "attention_score_bwd": "attention_score",
    "attention_gather_fwd": "attention_gather",
    "attention_gather_bwd": "attention_gather",
    "attention_writeback_fwd": "attention_writeback",
    "attention_writeback_bwd": "attention_writeback",
    "mixed_sum_fwd": "mixed_sum",
    "mixed_sum_bwd": "mixed_sum",
}

_TRITON = None   # (triton, triton.language, error) once probed


class _StubTriton:
    """Stands in for ``triton`` where it is missing: ``@triton.jit`` leaves the function as is
    (it is never launched: every launcher calls :func:`_require` first)."""

    @staticmethod
    def jit(fn=None, **kwargs):
        return fn if fn is not None else (lambda f: f)


class _StubLanguage:
    """Stands in for ``triton.language``: only what module-level code evaluates
    (the ``tl.constexpr`` annotations)."""

    constexpr = object


def _import_triton():
    """``(triton, triton.language, error)``; stubs and the import error where it fails."""
    global _TRITON
    if _TRITON is None:
        try:
            import triton
            import triton.language as tl
            _TRITON = (triton, tl, None)
        except Exception as exc:  # ImportError, or a broken install failing at import
            _TRITON = (_StubTriton(), _StubLanguage(), exc)
    return _TRITON


def _require(op: str) -> None:
    err = _import_triton()[2]
    if err is not None:
        raise RuntimeError(f"adarts {op}: triton is not available ({err!r})")


def _empty(shape, dtype, device):
    """``torch.empty``; poisoned (NaN / integer sentinel) when ``POISON_OUTPUTS`` is set."""
    import torch
    t = torch.empty(shape, dtype=dtype, device=device)
    if POISON_OUTPUTS:
        t.fill_(float("nan") if t.is_floating_point() else 2 ** 30)
    return t


def _acc_dtype(dtype):
    """The kernels' accumulation dtype for a torch input dtype: float64 for float64, float32
    otherwise (matches ``reference._acc``)."""
    import torch
    tl = _import_triton()[1]
    return tl.float64 if dtype == torch.float64 else tl.float32


def _acc_torch(dtype):
    from ..ops.reference import acc_dtype   # float64 stays float64, every other float: float32
    return acc_dtype(dtype)


def _block_hw(n: int, lo: int = 16, hi: int = 1024) -> int:
    """Power-of-two block covering ``n`` elements, clamped to ``[lo, hi]``."""
    b = lo
    while b < n and b < hi:
        b *= 2
    return b


def _num_warps(block: int) -> int:
    return max(1, min(8, block // 256))


def _check_x_a_idx(op: str, x, a, idx) -> None:
    """Shape-only checks shared by the gather and write-back launchers (no device data read)."""
    import torch
    if x.dim() != 4:
        raise ValueError(f"adarts {op}: x must be (B, C, H, W), got {tuple(x.shape)}")
    B, C = x.shape[:2]
    if tuple(a.shape) != (B, C):
        raise ValueError(f"adarts {op}: a must be (B, C)=({B}, {C}), got {tuple(a.shape)}")
    if idx.dim() != 1 or idx.shape[0] > C:
        raise ValueError(f"adarts {op}: idx must be (n,) with n <= C={C}, got {tuple(idx.shape)}")
    if idx.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"adarts {op}: idx must be int64 (or int32), got {idx.dtype}")


def _inverse_map(idx, C: int):
    """``inv: (C,)`` int32, ``inv[c] = j`` if ``idx[j] == c`` else ``-1``, built with device
    ops only (no host synchronisation)."""
    import torch
    inv = torch.full((C,), -1, dtype=torch.int32, device=idx.device)
    inv.scatter_(0, idx.to(torch.int64), torch.arange(idx.shape[0], dtype=torch.int32, device=idx.device))
    return inv


def __getattr__(name):
    if name == "HAS_TRITON":
        return _import_triton()[2] is None
    if name == "TRITON_ERROR":
        return _import_triton()[2]
    if name in _LAUNCHERS:
        mod = importlib.import_module(f".{_LAUNCHERS[name]}", __name__)
        return getattr(mod, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
