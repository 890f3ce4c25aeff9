"""Affine-free BatchNorm pieces shared by the fused modules, as small public helpers.

The fused edge folds its candidates' affine-free BatchNorms into other computations
(``adarts::mixed_sum``, :class:`~adarts_kernels.nn.units.BnReluDwPw`,
:class:`BatchNormKeepOutput`), so their ``BatchNorm2d`` modules never run their own forward.
These helpers read a module's settings (:func:`batchnorm_mode`), compute the statistics and
the input gradient (:func:`affine_free_stats`, :func:`affine_free_backward`) and move the
module's running statistics as its own training forward would
(:func:`update_running_stats`). Shapes: ``u: (B, n, H, W)``, statistics ``(n,)``.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..ops.reference import acc_dtype

Tensor = torch.Tensor


def channel(v: Tensor) -> Tensor:
    """A per-channel vector ``(n,)`` as ``(1, n, 1, 1)`` for broadcasting against ``(B, n, H, W)``."""
    return v.view(1, -1, 1, 1)


def batchnorm_mode(bn: nn.BatchNorm2d) -> Tuple[bool, Optional[Tensor], Optional[Tensor]]:
    """``(training, run_mean, run_var)`` as ``bn`` would normalise: batch statistics when it
    is training or tracks none (running statistics ``None``), its running ones otherwise."""
    training = bn.training or bn.running_mean is None
    return (True, None, None) if training else (False, bn.running_mean, bn.running_var)


def affine_free_stats(u: Tensor, training: bool, run_mean: Optional[Tensor], run_var: Optional[Tensor],
                      eps: float) -> Tuple[Tensor, Tensor, Tensor]:
    """``(mean, var, rstd)`` of an affine-free BN of ``u: (B, n, H, W)``, each ``(n,)`` in the
    accumulation dtype: batch statistics (biased variance) in training, the running ones in eval."""
    acc = acc_dtype(u.dtype)
    if training:
        var, mean = torch.var_mean(u.to(acc), dim=(0, 2, 3), unbiased=False)
    else:
        mean, var = run_mean.to(acc).clone(), run_var.to(acc).clone()
    return mean, var, torch.rsqrt(var + eps)


def affine_free_backward(g: Tensor, uh: Tensor, rstd: Tensor, training: bool) -> Tensor:
    """Input gradient of an affine-free BN from the output gradient ``g`` and the normalised
    value ``uh`` (both ``(B, n, H, W)`` in the accumulation dtype):
    ``rstd * (g - mean_c(g) - uh * mean_c(g * uh))`` with batch statistics, ``rstd * g`` with
    running ones."""
    if training:
        g = g - g.mean(dim=(0, 2, 3), keepdim=True) - uh * (g * uh).mean(dim=(0, 2, 3), keepdim=True)
    return g * channel(rstd)


def update_running_stats(bns: Sequence[nn.BatchNorm2d], mean: Tensor, var: Tensor, count: int) -> None:
    """Move the running statistics of several BNs as ``BatchNorm2d``'s training forward does.

    ``mean, var: (len(bns), n)`` the batch mean and biased variance over ``count`` values per
    channel: ``running = (1 - momentum) * running + momentum * batch`` with the unbiased
    variance ``var * count / (count - 1)``, or the cumulative average when ``momentum`` is
    ``None``; ``num_batches_tracked`` counts up. BNs in eval mode or without running
    statistics are left alone. Device-side arithmetic only (no host synchronisation).
    Tested against ``BatchNorm2d`` itself (``tests/test_units.py``).
    """
    update_running_stats_rows(bns, list(mean.unbind(0)), list(var.unbind(0)), count)


def update_running_stats_rows(bns: Sequence[nn.BatchNorm2d], means: Sequence[Tensor], variances: Sequence[Tensor],
                              count: int) -> None:
    """:func:`update_running_stats` with one ``(n,)`` row per BN (``means[q]``, ``variances[q]``
    for ``bns[q]``), the BNs of one edge in one batched update: three ``torch._foreach_*``
    calls for all of them instead of three ops per BN (the same arithmetic, element by element)."""
    live = []
    for q, bn in enumerate(bns):
        buf = bn._buffers         # bn.running_mean etc., without Module.__getattr__
        if bn.training and bn.track_running_stats and buf.get("running_mean") is not None:
            live.append((q, bn, buf))
    if not live:
        return
    factor = count / max(count - 1, 1)
    with torch.no_grad():
        torch._foreach_add_([buf["num_batches_tracked"] for _, _, buf in live], 1)
        groups: dict = {}
        for q, bn, buf in live:
            rm, rv = buf["running_mean"], buf["running_var"]
            m, v = means[q], variances[q]
            if m.dtype != rm.dtype:
                m = m.to(rm.dtype)
            if bn.momentum is None:      # cumulative average, as BatchNorm2d
                uv = (v * factor).to(rv.dtype)
                w = 1.0 / buf["num_batches_tracked"].to(rm.dtype)
                rm.add_((m - rm) * w)
                rv.add_((uv - rv) * w)
            else:
                groups.setdefault(bn.momentum, []).append((rm, rv, m, v))
        for momentum, items in groups.items():
            unbiased = torch._foreach_mul([v for _, _, _, v in items], factor)
            unbiased = [u if u.dtype == rv.dtype else u.to(rv.dtype) for u, (_, rv, _, _) in zip(unbiased, items)]
            # means and variances in one call
            torch._foreach_lerp_([rm for rm, _, _, _ in items] + [rv for _, rv, _, _ in items],
                                 [m for _, _, m, _ in items] + unbiased, momentum)


class BatchNormKeepOutput(torch.autograd.Function):
    """Affine-free BatchNorm that keeps its *output* for backward instead of its input.

    ``y = (u - mean) * rstd`` per channel, ``u: (B, n, H, W)``. The backward of an affine-free
    BN needs only the normalised value, which is ``y`` itself::

        du = rstd * (g - mean_c(g) - y * mean_c(g * y))      (training: batch statistics)
        du = rstd * g                                         (eval: running statistics)

    so when ``y`` is kept anyway (a cell state that the edges read) the BN costs nothing
    extra. Returns ``(y, mean, var)``; ``mean, var: (n,)`` are not differentiable.
    """

    @staticmethod
    def forward(ctx, u, training: bool, run_mean: Optional[Tensor], run_var: Optional[Tensor], eps: float):
        mean, var, rstd = affine_free_stats(u, training, run_mean, run_var, eps)
        y = ((u.to(rstd.dtype) - channel(mean)) * channel(rstd)).to(u.dtype)
        ctx.save_for_backward(y, rstd)
        ctx.training = training
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    def backward(ctx, g, _gm, _gv):
        y, rstd = ctx.saved_tensors
        du = affine_free_backward(g.to(rstd.dtype), y.to(rstd.dtype), rstd, ctx.training)
        return du.to(y.dtype), None, None, None, None


def batch_norm_keep_output(u: Tensor, bn: nn.BatchNorm2d) -> Tensor:
    """``bn(u)`` for an affine-free ``bn`` through :class:`BatchNormKeepOutput`, with the
    running statistics updated as ``BatchNorm2d`` would."""
    if bn.affine:
        raise ValueError("batch_norm_keep_output: the BN must be affine-free (affine=False)")
    training, rm, rv = batchnorm_mode(bn)
    y, mean, var = BatchNormKeepOutput.apply(u, training, rm, rv, bn.eps)
    if training:
        update_running_stats([bn], mean[None], var[None], u.numel() // u.shape[1])
    return y
