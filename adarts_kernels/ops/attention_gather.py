"""``adarts::attention_gather``: ``x_sel = (x * a)[:, idx]`` without forming ``x * a``.

Forward, ``x: (B, C, H, W)``, ``a: (B, C)``, ``idx: (n,)`` int64 distinct in ``[0, C)``::

    x_sel[b, j] = x[b, idx[j]] * a[b, idx[j]]                # (B, n, H, W)

Backward::

    dx[b, idx[j]] = grad[b, j] * a[b, idx[j]]                # zero on the other channels
    da[b, idx[j]] = sum_hw grad[b, j] * x[b, idx[j]]         # zero on the other channels

Saved for backward: ``x`` (the edge input), ``a: (B, C)``, ``idx``; nothing of size
``|x_sel|``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ..backend import resolve
from . import reference as R
from ._common import autocast_off, check, check_float, check_idx_meta, check_idx_values, contiguous, no_double_backward


@torch.library.custom_op("adarts::attention_gather", mutates_args=())
def _attention_gather(x: Tensor, a: Tensor, idx: Tensor, impl: str, validate_idx: bool = True) -> Tensor:
    return R.attention_gather_fwd(x, a, idx)


def gather_fwd_kernel(x, a, idx, impl, validate_idx=True):
    """The CPU/CUDA kernel of ``adarts::attention_gather`` on the backend ``impl`` names; the fused edge's
    eager path calls it directly (:mod:`adarts_kernels.nn.fused_function`)."""
    if validate_idx and impl != "cpp":   # the C++ CPU kernel checks the values itself
        check_idx_values("attention_gather", idx, x.shape[1])
    with autocast_off(x.device.type):   # the ops accumulate in float32 themselves
        if impl == "reference":
            return R.attention_gather_fwd(x, a, idx)
        x, a, idx = contiguous(x, a, idx)
        if impl in ("cpp", "cuda"):
            return torch.ops.adarts_C.attention_gather_fwd(x, a, idx)
        if impl == "triton":
            from ..triton.attention_gather import attention_gather_fwd as triton_attention_gather_fwd
            return triton_attention_gather_fwd(x, a, idx)
    raise ValueError(f"unknown backend {impl!r}")


_attention_gather.register_kernel(["cpu", "cuda"])(gather_fwd_kernel)


@_attention_gather.register_fake
def _(x, a, idx, impl, validate_idx=True):
    torch._check(a.shape[0] == x.shape[0] and a.shape[1] == x.shape[1])
    return x.new_empty((x.shape[0], idx.shape[0], x.shape[2], x.shape[3]))


@torch.library.custom_op("adarts::_attention_gather_backward", mutates_args=())
def _attention_gather_backward(grad: Tensor, x: Tensor, a: Tensor, idx: Tensor, impl: str) -> Tuple[Tensor, Tensor]:
    return R.attention_gather_bwd(grad, x, a, idx)


def gather_bwd_kernel(grad, x, a, idx, impl):
    """The CPU/CUDA kernel of ``adarts::_attention_gather_backward`` (called directly as above)."""
    with autocast_off(x.device.type):
        if impl == "reference":
            return R.attention_gather_bwd(grad, x, a, idx)
        grad, x, a, idx = contiguous(grad, x, a, idx)
        if impl in ("cpp", "cuda"):
            return torch.ops.adarts_C.attention_gather_bwd(grad, x, a, idx)
        if impl == "triton":
            from ..triton.attention_gather import attention_gather_bwd as triton_attention_gather_bwd
            return triton_attention_gather_bwd(grad, x, a, idx)
    raise ValueError(f"unknown backend {impl!r}")


_attention_gather_backward.register_kernel(["cpu", "cuda"])(gather_bwd_kernel)


@_attention_gather_backward.register_fake
def _(grad, x, a, idx, impl):
    return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(a)


def _setup_context(ctx, inputs, output):
    x, a, idx, impl = inputs[:4]
    ctx.save_for_backward(x, a, idx)
    ctx.impl = impl


def _backward(ctx, grad):
    x, a, idx = ctx.saved_tensors
    dx, da = _attention_gather_backward(grad.contiguous(), x, a, idx, ctx.impl)
    return dx, da, None, None, None


_attention_gather.register_autograd(_backward, setup_context=_setup_context)
no_double_backward(_attention_gather_backward, "attention_gather")


def attention_gather(x: Tensor, a: Tensor, idx: Tensor, impl: Optional[str] = None, *,
                     validate_idx: bool = True) -> Tensor:
    """``(x * a[:, :, None, None])[:, idx]``: ``(B, n, H, W)``. See the module docstring.

    ``validate_idx``: check that ``idx``'s values are distinct and in ``[0, C)`` (on CUDA a
    sort and asynchronous device asserts; on CPU a host read). Pass ``False`` only for an
    ``idx`` that :func:`attention_score` has just produced for this ``x`` (distinct and in
    range by construction); the shape, dtype and device checks run either way.
    """
    op = "attention_gather"
    check_float(op, x=x, a=a)
    check(x.dim() == 4, op, f"expected x of shape (B, C, H, W), got {tuple(x.shape)}")
    check(a.shape == x.shape[:2], op, f"expected a of shape (B, C)={tuple(x.shape[:2])}, got {tuple(a.shape)}")
    check_idx_meta(op, idx, x, x.shape[1])
    return _attention_gather(x, a, idx, resolve(impl, x.device), bool(validate_idx))
