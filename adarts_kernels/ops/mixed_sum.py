"""``adarts::mixed_sum``: a weighted sum of BatchNorm-ended inputs with the affine-free
BatchNorms folded in (docs/method.md section 2, step 6). The op knows nothing of the search space:
the caller names the weight of every term.

Forward, ``x: (B, n, H, W)`` (the selected channels ``x_sel``), ``z``: a list of ``P``
tensors ``(B, n, H/s, W/s)`` (``0 <= P <= MAX_Z``), the inputs of the BatchNorms that end
the convolution candidates, ``z_weights: (P,)``, ``pool_weights: (2,)`` (the weights of
``max_pool_3x3(x)`` and ``avg_pool_3x3(x)``, in this order), ``identity_weight``: a 0-dim
tensor or ``None`` (stride 1 only), stride ``s``::

    u = [maxpool3x3(x), avgpool3x3(x)] + z                        # Q = P + 2 BN inputs
    v = [pool_weights[0], pool_weights[1], z_weights[0], ..., z_weights[P-1]]
    y = sum_q v_q * (u_q - mean_q) * rsqrt(var_q + eps)  (+ identity_weight * x)

summed in q order, the identity last. Training (no running statistics given): batch
statistics over ``(B, H', W')`` (a batch mean is ``sum / N`` on every backend: ``+-inf``
where a channel's values hold infinities of one sign, NaN with both signs or a NaN);
eval: the running ones. Returns ``(y, mean, var)``, ``mean, var: (Q, n)`` the statistics
used, in x's accumulation dtype (float32 for half precision, else x's dtype; in eval mode
whatever the running buffers' dtype), rows ``[maxpool, avgpool, z_0, ..., z_{P-1}]`` (for
the caller's running-statistics update; not differentiable).

Backward: every ``dz_q`` including the BN statistics' contributions, ``dx`` (through the
pooling terms and the identity), ``dz_weights``, ``dpool_weights`` and ``didentity_weight``.

Saved for backward: the ``z`` list (the BN inputs), ``x``, ``z_weights``, ``pool_weights``,
``identity_weight`` (when given) and the per-channel ``mean, var: (Q, n)``. Not saved: any
candidate output, any normalised value, the pooling outputs or max-pool indices (both
recomputed from ``x``).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..backend import resolve
from . import reference as R
from ..limits import MAX_Z  # noqa: F401  (re-exported: ops.mixed_sum.MAX_Z)
from ._common import autocast_off, check, check_float, contiguous, no_double_backward


@torch.library.custom_op("adarts::mixed_sum", mutates_args=())
def _mixed_sum(z: List[Tensor], x: Tensor, z_weights: Tensor, pool_weights: Tensor,
               identity_weight: Optional[Tensor], stride: int, eps: float, run_mean: Optional[Tensor],
               run_var: Optional[Tensor], impl: str) -> Tuple[Tensor, Tensor, Tensor]:
    return R.mixed_sum_fwd(z, x, z_weights, pool_weights, identity_weight, stride, eps, run_mean, run_var)


def mixed_sum_fwd_kernel(z, x, z_weights, pool_weights, identity_weight, stride, eps, run_mean, run_var, impl):
    """The CPU/CUDA kernel of ``adarts::mixed_sum`` on the backend ``impl`` names; the fused edge's
    eager path calls it directly (:mod:`adarts_kernels.nn.fused_function`)."""
    with autocast_off(x.device.type):   # the ops accumulate in float32 themselves
        if impl == "reference":
            return R.mixed_sum_fwd(z, x, z_weights, pool_weights, identity_weight, stride, eps, run_mean, run_var)
        z, x, z_weights, pool_weights, identity_weight, run_mean, run_var = contiguous(
            z, x, z_weights, pool_weights, identity_weight, run_mean, run_var)
        if impl in ("cpp", "cuda"):
            return torch.ops.adarts_C.mixed_sum_fwd(z, x, z_weights, pool_weights, identity_weight, stride, eps,
                                                    run_mean, run_var)
        from ..triton.mixed_sum import mixed_sum_fwd as triton_mixed_sum_fwd
        return triton_mixed_sum_fwd(z, x, z_weights, pool_weights, identity_weight, stride, eps, run_mean, run_var)


_mixed_sum.register_kernel(["cpu", "cuda"])(mixed_sum_fwd_kernel)


@_mixed_sum.register_fake
def _(z, x, z_weights, pool_weights, identity_weight, stride, eps, run_mean, run_var, impl):
    B, n, H, W = x.shape
    for t in z:
        torch._check(t.shape[0] == B and t.shape[1] == n)
        torch._check(t.shape[2] == H // stride and t.shape[3] == W // stride)
    torch._check(z_weights.shape[0] == len(z))
    Q = len(z) + 2
    return (x.new_empty((B, n, H // stride, W // stride)), x.new_empty((Q, n), dtype=R.acc_dtype(x.dtype)),
            x.new_empty((Q, n), dtype=R.acc_dtype(x.dtype)))


@torch.library.custom_op("adarts::_mixed_sum_backward", mutates_args=())
def _mixed_sum_backward(grad: Tensor, z: List[Tensor], x: Tensor, z_weights: Tensor, pool_weights: Tensor,
                        identity_weight: Optional[Tensor], mean: Tensor, var: Tensor, stride: int, eps: float,
                        training: bool, impl: str) -> Tuple[List[Tensor], Tensor, Tensor, Tensor, Tensor]:
    return R.mixed_sum_bwd(grad, z, x, z_weights, pool_weights, identity_weight, mean, var, stride, eps, training)


def mixed_sum_bwd_kernel(grad, z, x, z_weights, pool_weights, identity_weight, mean, var, stride, eps, training, impl):
    """The CPU/CUDA kernel of ``adarts::_mixed_sum_backward`` (called directly as above)."""
    with autocast_off(x.device.type):   # the ops accumulate in float32 themselves
        if impl == "reference":
            out = R.mixed_sum_bwd(grad, z, x, z_weights, pool_weights, identity_weight, mean, var, stride, eps,
                                  training)
        else:
            grad, z, x, z_weights, pool_weights, identity_weight, mean, var = contiguous(
                grad, z, x, z_weights, pool_weights, identity_weight, mean, var)
            if impl in ("cpp", "cuda"):
                out = torch.ops.adarts_C.mixed_sum_bwd(grad, z, x, z_weights, pool_weights, identity_weight, mean,
                                                       var, stride, eps, training)
            else:
                from ..triton.mixed_sum import mixed_sum_bwd as triton_mixed_sum_bwd
                out = triton_mixed_sum_bwd(grad, z, x, z_weights, pool_weights, identity_weight, mean, var,
                                           stride, eps, training)
    dz, dx, dzw, dpw, diw = out
    return list(dz), dx, dzw, dpw, diw


_mixed_sum_backward.register_kernel(["cpu", "cuda"])(mixed_sum_bwd_kernel)


@_mixed_sum_backward.register_fake
def _(grad, z, x, z_weights, pool_weights, identity_weight, mean, var, stride, eps, training, impl):
    diw = (pool_weights.new_empty(()) if identity_weight is None else torch.empty_like(identity_weight))
    return ([torch.empty_like(t, memory_format=torch.contiguous_format) for t in z],
            torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(z_weights, memory_format=torch.contiguous_format),
            torch.empty_like(pool_weights, memory_format=torch.contiguous_format), diw)


def _setup_context(ctx, inputs, output):
    z, x, z_weights, pool_weights, identity_weight, stride, eps, run_mean, run_var, impl = inputs
    _, mean, var = output
    ctx.has_identity = identity_weight is not None
    extra = (identity_weight,) if ctx.has_identity else ()
    ctx.save_for_backward(x, z_weights, pool_weights, mean, var, *extra, *z)
    ctx.mark_non_differentiable(mean, var)
    ctx.stride, ctx.eps, ctx.impl, ctx.training = stride, eps, impl, run_mean is None


def _backward(ctx, grad, _gmean, _gvar):
    x, z_weights, pool_weights, mean, var, *rest = ctx.saved_tensors
    identity_weight = rest.pop(0) if ctx.has_identity else None
    dz, dx, dzw, dpw, diw = _mixed_sum_backward(grad.contiguous(), rest, x, z_weights, pool_weights,
                                                identity_weight, mean, var, ctx.stride, ctx.eps, ctx.training,
                                                ctx.impl)
    return list(dz), dx, dzw, dpw, (diw if ctx.has_identity else None), None, None, None, None, None


_mixed_sum.register_autograd(_backward, setup_context=_setup_context)
no_double_backward(_mixed_sum_backward, "mixed_sum")


def mixed_sum(z: Sequence[Tensor], x: Tensor, z_weights: Tensor, pool_weights: Tensor,
              identity_weight: Optional[Tensor] = None, stride: int = 1, eps: float = 1e-5,
              run_mean: Optional[Tensor] = None, run_var: Optional[Tensor] = None,
              impl: Optional[str] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """``(y, mean, var)`` of the mixed sum; see the module docstring.

    ``z``: ``P`` tensors ``(B, n, H/stride, W/stride)``, ``0 <= P <= MAX_Z``;
    ``x: (B, n, H, W)``; ``z_weights: (P,)``; ``pool_weights: (2,)`` (max pool, avg pool);
    ``identity_weight``: 0-dim or ``None`` (the term ``identity_weight * x``, stride 1 only);
    all of x's dtype and device. ``run_mean, run_var: (P + 2, n)`` for eval mode (both or
    neither). ``y: (B, n, H/stride, W/stride)``, ``mean, var: (P + 2, n)``, rows
    ``[maxpool, avgpool, z_0, ..., z_{P-1}]``.
    """
    op = "mixed_sum"
    check(isinstance(z, (list, tuple)), op, f"z must be a list of tensors, got {type(z).__name__}", TypeError)
    z = list(z)
    check(stride in (1, 2) and not isinstance(stride, bool), op, f"stride must be 1 or 2, got {stride!r}")
    P = len(z)
    check(P <= MAX_Z, op, f"z holds {P} tensors, more than MAX_Z={MAX_Z} (the most one call takes)")
    check(stride == 1 or identity_weight is None, op,
          "identity_weight must be None at stride 2 (the identity term exists at stride 1 only)")
    check_float(op, x=x, z_weights=z_weights, pool_weights=pool_weights, identity_weight=identity_weight,
                optional=("identity_weight",), **{f"z[{i}]": t for i, t in enumerate(z)})
    check(x.dim() == 4, op, f"expected x of shape (B, n, H, W), got {tuple(x.shape)}")
    B, n, H, W = x.shape
    check(H > 0 and W > 0, op, f"x must have non-empty planes (H, W > 0), got {tuple(x.shape)}")
    check(stride == 1 or (H % 2 == 0 and W % 2 == 0), op, f"stride 2 needs even H and W, got {tuple(x.shape)}")
    want = (B, n, H // stride, W // stride)
    for i, t in enumerate(z):
        check(tuple(t.shape) == want, op, f"expected z[{i}] of shape (B, n, H/stride, W/stride)={want}, "
                                          f"got {tuple(t.shape)}")
    check(tuple(z_weights.shape) == (P,), op,
          f"expected z_weights of shape (P,)={(P,)}, one weight per z, got {tuple(z_weights.shape)}")
    check(tuple(pool_weights.shape) == (2,), op,
          f"expected pool_weights of shape (2,) (max pool, avg pool), got {tuple(pool_weights.shape)}")
    check(identity_weight is None or identity_weight.dim() == 0, op,
          f"expected identity_weight as a 0-dim tensor or None, got shape {tuple(identity_weight.shape)}"
          if identity_weight is not None else "")
    check((run_mean is None) == (run_var is None), op, "give both run_mean and run_var, or neither")
    if run_mean is not None:
        for name, t in (("run_mean", run_mean), ("run_var", run_var)):
            check(isinstance(t, Tensor) and t.is_floating_point(), op, f"{name} must be a float tensor", TypeError)
            check(t.device == x.device, op, f"device mismatch: x is on {x.device} but {name} is on {t.device}")
            check(tuple(t.shape) == (P + 2, n), op, f"expected {name} of shape (Q, n)={(P + 2, n)}, got {tuple(t.shape)}")
    check(eps > 0, op, f"eps must be positive, got {eps}")
    return _mixed_sum(z, x, z_weights, pool_weights, identity_weight, stride, float(eps), run_mean, run_var,
                      resolve(impl, x.device))
