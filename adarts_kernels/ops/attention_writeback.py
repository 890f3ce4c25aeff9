"""``adarts::attention_writeback``: the edge output with edge normalisation, ``beta * out``.

Forward (docs/method.md section 2, steps 7-8), ``x: (B, C, H, W)``, ``a: (B, C)``, ``idx: (n,)``,
``y: (B, n, H/s, W/s)``, ``beta``: 0-dim or ``None`` (= 1), stride ``s`` in {1, 2}::

    base = x * a                   (s = 1)      base = a * maxpool2x2(x) = maxpool2x2(x * a)   (s = 2)
    out  = beta * base;  out[:, idx] = beta * y                                  # (B, C, H/s, W/s)

so that a node is a plain sum of its edges. ``x * a`` is never formed in memory.

The attention must be positive, ``a > 0``: the stride-2 identity ``maxpool2x2(x * a) =
a * maxpool2x2(x)`` holds only then (a negative ``a`` turns the maximum into a minimum, a
zero ``a`` routes the gradient elsewhere). The ``a`` of :func:`attention_score` is a
sigmoid, always ``> 0``. The op does not check it: that would read device data (a host
synchronisation on every call).

Backward to ``x, a, y, beta``; the edge output is not kept: the beta gradient
``sum(grad * out) / beta`` is recomputed from ``x, a, idx, y``. Saved for backward: ``x``
(the edge input), ``a: (B, C)``, ``idx``, ``y`` (the mixed-op output, ``|x| / k`` at stride 1)
and ``beta``; at stride 2 the pooling's argmax is recomputed, never stored.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ..backend import resolve
from . import reference as R
from ._common import autocast_off, check, check_float, check_idx_meta, check_idx_values, contiguous, no_double_backward


def _bwd_outputs(dx, da, dy, dbeta, x):
    if dbeta is None:
        dbeta = x.new_zeros(())
    return dx, da, dy, dbeta


@torch.library.custom_op("adarts::attention_writeback", mutates_args=())
def _attention_writeback(x: Tensor, a: Tensor, idx: Tensor, y: Tensor, beta: Optional[Tensor], stride: int,
                         impl: str, validate_idx: bool = True) -> Tensor:
    return R.attention_writeback_fwd(x, a, idx, y, beta, stride)


def writeback_fwd_kernel(x, a, idx, y, beta, stride, impl, validate_idx=True):
    """The CPU/CUDA kernel of ``adarts::attention_writeback`` on the backend ``impl`` names; the fused
    edge's eager path calls it directly (:mod:`adarts_kernels.nn.fused_function`)."""
    if validate_idx and impl != "cpp":   # the C++ CPU kernel checks the values itself
        check_idx_values("attention_writeback", idx, x.shape[1])
    with autocast_off(x.device.type):   # the ops accumulate in float32 themselves
        if impl == "reference":
            return R.attention_writeback_fwd(x, a, idx, y, beta, stride)
        x, a, idx, y, beta = contiguous(x, a, idx, y, beta)
        if impl in ("cpp", "cuda"):
            return torch.ops.adarts_C.attention_writeback_fwd(x, a, idx, y, beta, stride)
        if impl == "triton":
            from ..triton.attention_writeback import attention_writeback_fwd as triton_attention_writeback_fwd
            return triton_attention_writeback_fwd(x, a, idx, y, beta, stride)
    raise ValueError(f"unknown backend {impl!r}")


_attention_writeback.register_kernel(["cpu", "cuda"])(writeback_fwd_kernel)


@_attention_writeback.register_fake
def _(x, a, idx, y, beta, stride, impl, validate_idx=True):
    B, C, H, W = x.shape
    torch._check(y.shape[0] == B and y.shape[1] == idx.shape[0])
    torch._check(y.shape[2] == H // stride and y.shape[3] == W // stride)
    return x.new_empty((B, C, H // stride, W // stride))


@torch.library.custom_op("adarts::_attention_writeback_backward", mutates_args=())
def _attention_writeback_backward(grad: Tensor, x: Tensor, a: Tensor, idx: Tensor, y: Tensor,
                                  beta: Optional[Tensor], stride: int,
                                  impl: str) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    return _bwd_outputs(*R.attention_writeback_bwd(grad, x, a, idx, y, beta, stride), x)


def writeback_bwd_kernel(grad, x, a, idx, y, beta, stride, impl):
    """The CPU/CUDA kernel of ``adarts::_attention_writeback_backward`` (called directly as above)."""
    with autocast_off(x.device.type):
        if impl == "reference":
            return _bwd_outputs(*R.attention_writeback_bwd(grad, x, a, idx, y, beta, stride), x)
        grad, x, a, idx, y, beta = contiguous(grad, x, a, idx, y, beta)
        if impl in ("cpp", "cuda"):
            return _bwd_outputs(*torch.ops.adarts_C.attention_writeback_bwd(grad, x, a, idx, y, beta, stride), x)
        if impl == "triton":
            from ..triton.attention_writeback import attention_writeback_bwd as triton_attention_writeback_bwd
            return _bwd_outputs(*triton_attention_writeback_bwd(grad, x, a, idx, y, beta, stride), x)
    raise ValueError(f"unknown backend {impl!r}")


_attention_writeback_backward.register_kernel(["cpu", "cuda"])(writeback_bwd_kernel)


@_attention_writeback_backward.register_fake
def _(grad, x, a, idx, y, beta, stride, impl):
    dbeta = beta.new_empty(()) if beta is not None else x.new_empty(())
    return (torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(a),
            torch.empty_like(y, memory_format=torch.contiguous_format), dbeta)


def _setup_context(ctx, inputs, output):
    x, a, idx, y, beta, stride, impl = inputs[:7]
    ctx.save_for_backward(x, a, idx, y, beta)
    ctx.stride, ctx.impl, ctx.has_beta = stride, impl, beta is not None


def _backward(ctx, grad):
    x, a, idx, y, beta = ctx.saved_tensors
    dx, da, dy, dbeta = _attention_writeback_backward(grad.contiguous(), x, a, idx, y,
                                                      beta if ctx.has_beta else None, ctx.stride, ctx.impl)
    return dx, da, None, dy, (dbeta if ctx.has_beta else None), None, None, None


_attention_writeback.register_autograd(_backward, setup_context=_setup_context)
no_double_backward(_attention_writeback_backward, "attention_writeback")


def attention_writeback(x: Tensor, a: Tensor, idx: Tensor, y: Tensor, beta: Optional[Tensor] = None,
                        stride: int = 1, impl: Optional[str] = None, *, validate_idx: bool = True) -> Tensor:
    """``beta * out`` of an ADARTS edge: ``(B, C, H/stride, W/stride)``. See the module docstring.

    ``a`` must be positive (``a > 0``, as the sigmoid from :func:`attention_score` is): at
    stride 2 the op computes ``a * maxpool2x2(x)`` for ``maxpool2x2(x * a)``, equal only for
    ``a > 0``. Not checked (a check would read device data).

    ``validate_idx``: check that ``idx``'s values are distinct and in ``[0, C)`` (on CUDA a
    sort and asynchronous device asserts; on CPU a host read). Pass ``False`` only for an
    ``idx`` that :func:`attention_score` has just produced for this ``x`` (distinct and in
    range by construction); the shape, dtype and device checks run either way.
    """
    op = "attention_writeback"
    check_float(op, x=x, a=a, y=y, beta=beta, optional=("beta",))
    check(x.dim() == 4, op, f"expected x of shape (B, C, H, W), got {tuple(x.shape)}")
    B, C, H, W = x.shape
    check(stride in (1, 2) and not isinstance(stride, bool), op, f"stride must be 1 or 2, got {stride!r}")
    check(stride == 1 or (H % 2 == 0 and W % 2 == 0), op, f"stride 2 needs even H and W, got {tuple(x.shape)}")
    check(a.shape == (B, C), op, f"expected a of shape (B, C)={(B, C)}, got {tuple(a.shape)}")
    check_idx_meta(op, idx, x, C)
    n = idx.shape[0]
    check(y.shape == (B, n, H // stride, W // stride), op,
          f"expected y of shape (B, n, H/stride, W/stride)={(B, n, H // stride, W // stride)}, got {tuple(y.shape)}")
    if beta is not None:
        check(beta.dim() == 0, op, f"beta must be a 0-dim tensor, got shape {tuple(beta.shape)}")
    return _attention_writeback(x, a, idx, y, beta, stride, resolve(impl, x.device), bool(validate_idx))
