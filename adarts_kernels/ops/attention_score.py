"""``adarts::attention_score``: CBAM channel attention and top-k channel selection.

Forward (docs/method.md section 2, steps 1, 3, 4), ``x: (B, C, H, W)``, ``w1: (C/2, C)``,
``w2: (C, C/2)`` (the two 1x1 convolutions of the shared MLP, flattened)::

    avg, mx = mean_hw(x), max_hw(x)                          # one pass over x
    a   = sigmoid(relu(avg @ w1.T) @ w2.T + relu(mx @ w1.T) @ w2.T)      # (B, C)
    idx = topk(a.sum(0), n_select)   # (n,), descending, equal scores -> lower index

Backward to ``x, w1, w2`` (``idx`` has no gradient). Saved for backward: ``x`` (the edge
input, which the gather op keeps anyway: no extra bytes), ``w1, w2`` (parameters) and
``a: (B, C)``. The pools, their argmax and the MLP hidden units are recomputed.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ..backend import resolve
from . import reference as R
from ._common import autocast_off, check, check_float, contiguous, no_double_backward


@torch.library.custom_op("adarts::attention_score", mutates_args=())
def _attention_score(x: Tensor, w1: Tensor, w2: Tensor, n_select: int, impl: str) -> Tuple[Tensor, Tensor]:
    return R.attention_score_fwd(x, w1, w2, n_select)


def score_fwd_kernel(x, w1, w2, n_select, impl):
    """The CPU/CUDA kernel of ``adarts::attention_score`` on the backend ``impl`` names; the fused edge's
    eager path calls it directly (:mod:`adarts_kernels.nn.fused_function`)."""
    with autocast_off(x.device.type):   # the ops accumulate in float32 themselves
        if impl == "reference":
            return R.attention_score_fwd(x, w1, w2, n_select)
        x, w1, w2 = contiguous(x, w1, w2)
        if impl in ("cpp", "cuda"):
            return torch.ops.adarts_C.attention_score_fwd(x, w1, w2, n_select)
        if impl == "triton":
            from ..triton.attention_score import attention_score_fwd as triton_attention_score_fwd
            return triton_attention_score_fwd(x, w1, w2, n_select)
    raise ValueError(f"unknown backend {impl!r}")


_attention_score.register_kernel(["cpu", "cuda"])(score_fwd_kernel)


@_attention_score.register_fake
def _(x, w1, w2, n_select, impl):
    B, C = x.shape[0], x.shape[1]
    torch._check(w1.shape[1] == C and w2.shape[0] == C)
    torch._check(1 <= n_select <= C)
    return x.new_empty((B, C)), x.new_empty((n_select,), dtype=torch.int64)


@torch.library.custom_op("adarts::_attention_score_backward", mutates_args=())
def _attention_score_backward(grad_a: Tensor, x: Tensor, w1: Tensor, w2: Tensor, a: Tensor,
                              impl: str) -> Tuple[Tensor, Tensor, Tensor]:
    return R.attention_score_bwd(grad_a, x, w1, w2, a)


def score_bwd_kernel(grad_a, x, w1, w2, a, impl):
    """The CPU/CUDA kernel of ``adarts::_attention_score_backward`` (called directly as above)."""
    with autocast_off(x.device.type):
        if impl == "reference":
            return R.attention_score_bwd(grad_a, x, w1, w2, a)
        grad_a, x, w1, w2, a = contiguous(grad_a, x, w1, w2, a)
        if impl in ("cpp", "cuda"):
            return torch.ops.adarts_C.attention_score_bwd(grad_a, x, w1, w2, a)
        if impl == "triton":
            from ..triton.attention_score import attention_score_bwd as triton_attention_score_bwd
            return triton_attention_score_bwd(grad_a, x, w1, w2, a)
    raise ValueError(f"unknown backend {impl!r}")


_attention_score_backward.register_kernel(["cpu", "cuda"])(score_bwd_kernel)


@_attention_score_backward.register_fake
def _(grad_a, x, w1, w2, a, impl):
    return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(w1), torch.empty_like(w2)


def _setup_context(ctx, inputs, output):
    x, w1, w2, _, impl = inputs
    a, idx = output
    ctx.save_for_backward(x, w1, w2, a)
    ctx.impl = impl
    ctx.mark_non_differentiable(idx)


def _backward(ctx, grad_a, grad_idx):
    x, w1, w2, a = ctx.saved_tensors
    if grad_a is None:
        return None, None, None, None, None
    dx, dw1, dw2 = _attention_score_backward(grad_a.contiguous(), x, w1, w2, a, ctx.impl)
    return dx, dw1, dw2, None, None


_attention_score.register_autograd(_backward, setup_context=_setup_context)
no_double_backward(_attention_score_backward, "attention_score")


def attention_score(x: Tensor, w1: Tensor, w2: Tensor, n_select: int,
                    impl: Optional[str] = None) -> Tuple[Tensor, Tensor]:
    """Channel attention ``a: (B, C)`` and the selected channels ``idx: (n_select,)`` int64.

    ``x: (B, C, H, W)``; ``w1: (C/2, C)`` or the conv weight ``(C/2, C, 1, 1)``;
    ``w2: (C, C/2)`` or ``(C, C/2, 1, 1)``. ``impl``: backend (see ``adarts_kernels.backend``).
    """
    op = "attention_score"
    check_float(op, x=x, w1=w1, w2=w2)
    check(x.dim() == 4, op, f"expected x of shape (B, C, H, W), got {tuple(x.shape)}")
    C = x.shape[1]
    w1 = w1.flatten(1) if w1.dim() == 4 else w1
    w2 = w2.flatten(1) if w2.dim() == 4 else w2
    check(w1.dim() == 2 and w1.shape[1] == C and w2.dim() == 2 and w2.shape == (C, w1.shape[0]), op,
          f"expected w1 (hidden, C={C}) and w2 (C={C}, hidden), got {tuple(w1.shape)} and {tuple(w2.shape)}")
    check(isinstance(n_select, int) and not isinstance(n_select, bool) and 1 <= n_select <= C, op,
          f"n_select must be an integer in [1, C={C}], got {n_select!r}")
    check(x.numel() > 0, op, f"x is empty: {tuple(x.shape)}")
    return _attention_score(x, w1, w2, n_select, resolve(impl, x.device))
