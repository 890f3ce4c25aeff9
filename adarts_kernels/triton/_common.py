"""Helpers shared by the Triton launchers (``adarts_kernels.triton.<op>``): the lazy triton
import, output allocation (poisoned on request), accumulation dtypes, block sizes and the
shape checks and inverse map of the gather and write-back launchers.

Importing this module imports neither triton nor torch; :func:`import_triton` probes triton
once, on first use.
"""
from __future__ import annotations

_TRITON = None   # (triton, triton.language, error) once probed


class _StubTriton:
    """Stands in for ``triton`` where it is missing: ``@triton.jit`` leaves the function as is
    (it is never launched: every launcher calls :func:`require` first)."""

    @staticmethod
    def jit(fn=None, **kwargs):
        return fn if fn is not None else (lambda f: f)


class _StubLanguage:
    """Stands in for ``triton.language``: only what module-level code evaluates
    (the ``tl.constexpr`` annotations)."""

    constexpr = object


def import_triton():
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


def require(op: str) -> None:
    """Raise ``RuntimeError`` naming ``op`` when triton does not import."""
    err = import_triton()[2]
    if err is not None:
        raise RuntimeError(f"adarts {op}: triton is not available ({err!r})")


def empty(shape, dtype, device):
    """``torch.empty``; poisoned (NaN / integer sentinel) when the package flag
    ``adarts_kernels.triton.POISON_OUTPUTS`` is set (read at every call, so that setting it
    on the package takes effect at once)."""
    import torch

    from . import POISON_OUTPUTS
    t = torch.empty(shape, dtype=dtype, device=device)
    if POISON_OUTPUTS:
        t.fill_(float("nan") if t.is_floating_point() else 2 ** 30)
    return t


def acc_dtype(dtype):
    """The kernels' accumulation dtype (a ``triton.language`` dtype) for a torch input dtype:
    float64 for float64, float32 otherwise (matches ``reference._acc``)."""
    import torch
    tl = import_triton()[1]
    return tl.float64 if dtype == torch.float64 else tl.float32


def acc_torch(dtype):
    """The accumulation dtype as a torch dtype (``reference.acc_dtype``)."""
    from ..ops.reference import acc_dtype as reference_acc_dtype   # float64 stays float64, every other float: float32
    return reference_acc_dtype(dtype)


def block_hw(n: int, lo: int = 16, hi: int = 1024) -> int:
    """Power-of-two block covering ``n`` elements, clamped to ``[lo, hi]``."""
    b = lo
    while b < n and b < hi:
        b *= 2
    return b


def num_warps(block: int) -> int:
    """Warps for a block of ``block`` elements: one per 256, between 1 and 8."""
    return max(1, min(8, block // 256))


def check_x_a_idx(op: str, x, a, idx) -> None:
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


def inverse_map(idx, C: int):
    """``inv: (C,)`` int32, ``inv[c] = j`` if ``idx[j] == c`` else ``-1``, built with device
    ops only (no host synchronisation)."""
    import torch
    inv = torch.full((C,), -1, dtype=torch.int32, device=idx.device)
    inv.scatter_(0, idx.to(torch.int64), torch.arange(idx.shape[0], dtype=torch.int32, device=idx.device))
    return inv
