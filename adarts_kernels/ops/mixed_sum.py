"""``adarts::mixed_sum``: the weighted mixed-operation sum with the candidates' affine-free
BatchNorms folded in (SPEC section 2, step 6).

Forward, ``x: (B, n, H, W)`` (the selected channels ``x_sel``), ``z``: a list of ``P``
tensors ``(B, n, H/s, W/s)``, the inputs of the BatchNorm that ends each convolution
candidate, ``w: (8,)`` (softmaxed alpha row, ``PRIMITIVES`` order), stride ``s``::

    u = [maxpool3x3(x), avgpool3x3(x)] + z                        # Q = P + 2 BN inputs
    y = sum_q w[o_q] * (u_q - mean_q) * rsqrt(var_q + eps)  (+ w[3] * x at stride 1)

with ``z = [sep_conv_3x3, sep_conv_5x5, dil_conv_3x3, dil_conv_5x5]`` at stride 1 and
``[skip_connect (FactorizedReduce), sep_conv_3x3, ..., dil_conv_5x5]`` at stride 2.
``none`` is skipped entirely. Training (no running statistics given): batch statistics
over ``(B, H', W')``; eval: the running ones. Returns ``(y, mean, var)``, ``mean, var: (Q, n)``
the statistics used (for the caller's running-statistics update; not differentiable).

Backward: every ``dz_q`` including the BN statistics' contributions, ``dx`` (through the
pooling candidates and the identity) and ``dw``.

Saved for backward: the ``z`` list (the BN inputs), ``x``, ``w`` and the per-channel
``mean, var: (Q, n)``. Not saved: any candidate output, any normalised value, the pooling
outputs or max-pool indices (both recomputed from ``x``).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from ..backend import resolve
from . import reference as R
from ._common import check, check_float, run


@torch.library.custom_op("adarts::mixed_sum", mutates_args=())
def _mixed_sum(z: List[Tensor], x: Tensor, w: Tensor, stride: int, eps: float, run_mean: Optional[Tensor],
               run_var: Optional[Tensor], impl: str) -> Tuple[Tensor, Tensor, Tensor]:
    return R.mixed_sum_fwd(z, x, w, stride, eps, run_mean, run_var)


@_mixed_sum.register_kernel(["cpu", "cuda"])
def _(z, x, w, stride, eps, run_mean, run_var, impl):
    return run("mixed_sum_fwd", impl, z, x, w, stride, eps, run_mean, run_var)


@_mixed_sum.register_fake
def _(z, x, w, stride, eps, run_mean, run_var, impl):
    B, n, H, W = x.shape
    for t in z:
        torch._check(t.shape[0] == B and t.shape[1] == n)
        torch._check(t.shape[2] == H // stride and t.shape[3] == W // stride)
    Q = len(z) + 2
    return (x.new_empty((B, n, H // stride, W // stride)), x.new_empty((Q, n), dtype=R.acc_dtype(x.dtype)),
            x.new_empty((Q, n), dtype=R.acc_dtype(x.dtype)))


@torch.library.custom_op("adarts::_mixed_sum_backward", mutates_args=())
def _mixed_sum_backward(grad: Tensor, z: List[Tensor], x: Tensor, w: Tensor, mean: Tensor, var: Tensor,
                        stride: int, eps: float, training: bool, impl: str) -> Tuple[List[Tensor], Tensor, Tensor]:
    return R.mixed_sum_bwd(grad, z, x, w, mean, var, stride, eps, training)


@_mixed_sum_backward.register_kernel(["cpu", "cuda"])
def _(grad, z, x, w, mean, var, stride, eps, training, impl):
    dz, dx, dw = run("mixed_sum_bwd", impl, grad, z, x, w, mean, var, stride, eps, training)
    return list(dz), dx, dw


@_mixed_sum_backward.register_fake
def _(grad, z, x, w, mean, var, stride, eps, training, impl):
    return ([torch.empty_like(t, memory_format=torch.contiguous_format) for t in z],
            torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(w))


def _setup_context(ctx, inputs, output):
    z, x, w, stride, eps, run_mean, run_var, impl = inputs
    _, mean, var = output
    ctx.save_for_backward(x, w, mean, var, *z)
    ctx.mark_non_differentiable(mean, var)
    ctx.stride, ctx.eps, ctx.impl, ctx.training = stride, eps, impl, run_mean is None


def _backward(ctx, grad, _gmean, _gvar):
    x, w, mean, var, *z = ctx.saved_tensors
    dz, dx, dw = _mixed_sum_backward(grad.contiguous(), z, x, w, mean, var, ctx.stride, ctx.eps,
                                     ctx.training, ctx.impl)
    return list(dz), dx, dw, None, None, None, None, None


_mixed_sum.register_autograd(_backward, setup_context=_setup_context)


def mixed_sum(z: List[Tensor], x: Tensor, w: Tensor, stride: int = 1, eps: float = 1e-5,
              run_mean: Optional[Tensor] = None, run_var: Optional[Tensor] = None,
              impl: Optional[str] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """``(y, mean, var)`` of the mixed sum; see the module docstring.

    ``z``: ``P`` tensors ``(B, n, H/stride, W/stride)`` (``P = 4`` at stride 1, 5 at stride 2),
    ``x: (B, n, H, W)``, ``w: (8,)``; ``run_mean, run_var: (P + 2, n)`` for eval mode (both
    or neither). ``y: (B, n, H/stride, W/stride)``, ``mean, var: (P + 2, n)``.
    """
    op = "mixed_sum"
    check(isinstance(z, (list, tuple)), op, f"z must be a list of tensors, got {type(z).__name__}", TypeError)
    z = list(z)
    check(stride in (1, 2), op, f"stride must be 1 or 2, got {stride!r}")
    P = 4 if stride == 1 else 5
    check(len(z) == P, op, f"stride {stride} takes {P} BN inputs in z, got {len(z)}")
    check_float(op, x=x, w=w, **{f"z[{i}]": t for i, t in enumerate(z)})
    check(x.dim() == 4, op, f"expected x of shape (B, n, H, W), got {tuple(x.shape)}")
    B, n, H, W = x.shape
    check(stride == 1 or (H % 2 == 0 and W % 2 == 0), op, f"stride 2 needs even H and W, got {tuple(x.shape)}")
    want = (B, n, H // stride, W // stride)
    for i, t in enumerate(z):
        check(tuple(t.shape) == want, op, f"expected z[{i}] of shape (B, n, H/stride, W/stride)={want}, "
                                          f"got {tuple(t.shape)}")
    check(w.shape == (8,), op, f"expected w of shape (8,), one weight per candidate, got {tuple(w.shape)}")
    check((run_mean is None) == (run_var is None), op, "give both run_mean and run_var, or neither")
    if run_mean is not None:
        for name, t in (("run_mean", run_mean), ("run_var", run_var)):
            check(isinstance(t, Tensor) and t.is_floating_point(), op, f"{name} must be a float tensor", TypeError)
            check(t.device == x.device, op, f"device mismatch: x is on {x.device} but {name} is on {t.device}")
            check(tuple(t.shape) == (P + 2, n), op, f"expected {name} of shape (Q, n)={(P + 2, n)}, got {tuple(t.shape)}")
    check(eps > 0, op, f"eps must be positive, got {eps}")
    return _mixed_sum(z, x, w, stride, float(eps), run_mean, run_var, resolve(impl, x.device))
