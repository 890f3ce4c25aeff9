"""Plain-PyTorch reference of the fused ADARTS edge operations, forward and backward.

These functions are the specification every backend (C++ CPU, CUDA, Triton) must match,
the bodies of the ``adarts::`` custom ops, and the test oracle. Accumulation is in
float32 for half-precision inputs; outputs have the input dtype.

Notation: ``x: (B, C, H, W)``, ``a: (B, C)`` the channel attention, ``idx: (n,)`` int64
the selected channels (distinct, in ``[0, C)``), ``y: (B, n, H', W')`` the mixed-op output
on the selected channels, ``beta`` a 0-dim tensor (the edge's normalised beta).

Conventions shared by all backends:

- max pooling (global and 2x2) routes its gradient to the *first* maximum in row-major
  order within the window (what PyTorch's CPU max pooling does);
- top-k: ``idx`` lists the ``n`` highest batch-summed scores in descending order, equal
  scores ordered by the lower channel index.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype: float32 for half precision, the dtype itself otherwise."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _acc(t: Tensor) -> Tensor:
    """``t`` in the accumulation dtype (:func:`acc_dtype`)."""
    return t.to(acc_dtype(t.dtype))


# ----------------------------------------------------------------------------- 1. scoring

def attention_pools(x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Global average and max over H*W in one pass: ``avg, mx: (B, C)`` (accumulation
    dtype), ``arg: (B, C)`` int64 flat H*W position of the first maximum."""
    xf = _acc(x).flatten(2)
    avg = xf.mean(dim=2)
    mx, arg = xf.max(dim=2)          # CPU and CUDA both return the first maximum
    return avg, mx, arg


def attention_score_fwd(x: Tensor, w1: Tensor, w2: Tensor, n_select: int) -> Tuple[Tensor, Tensor]:
    """``a = sigmoid(relu(avg @ w1.T) @ w2.T + relu(mx @ w1.T) @ w2.T)``, ``idx = topk(a.sum(0), n)``.

    ``x: (B, C, H, W)``, ``w1: (C/2, C)``, ``w2: (C, C/2)`` -> ``a: (B, C)`` (dtype of x),
    ``idx: (n_select,)`` int64.
    """
    avg, mx, _ = attention_pools(x)
    a, idx = attention_mlp_fwd(avg, mx, w1, w2, n_select)
    return a.to(x.dtype), idx


def attention_mlp_fwd(avg: Tensor, mx: Tensor, w1: Tensor, w2: Tensor, n_select: int) -> Tuple[Tensor, Tensor]:
    """The scoring after the pools, on ``(B, C)`` matrices: ``a`` (accumulation dtype) and ``idx``.

    ``idx``: the ``n_select`` largest batch-summed scores, descending; a stable sort puts
    equal scores in ascending channel order (the tie rule).
    """
    w1f, w2f = _acc(w1), _acc(w2)
    z = F.relu(avg @ w1f.t()) @ w2f.t() + F.relu(mx @ w1f.t()) @ w2f.t()
    a = torch.sigmoid(z)
    idx = torch.sort(a.sum(dim=0), descending=True, stable=True).indices[:n_select]
    return a, idx


def attention_score_bwd(grad_a: Tensor, x: Tensor, w1: Tensor, w2: Tensor, a: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradients of ``a`` w.r.t. ``x: (B, C, H, W)``, ``w1``, ``w2``; pools recomputed from x.

    ``dz = grad_a * a * (1 - a)``; for ``v`` in (avg, mx): ``h_v = relu(v @ w1.T)``,
    ``dw2 += dz.T @ h_v``, ``dh_v = (dz @ w2) * (h_v > 0)``, ``dw1 += dh_v.T @ v``,
    ``dv = dh_v @ w1``; ``dx = d_avg / (H*W)`` everywhere plus ``d_mx`` at the first maximum.
    """
    B, C, H, W = x.shape
    avg, mx, arg = attention_pools(x)
    dw1, dw2, d_avg, d_mx = attention_mlp_bwd(grad_a, a, avg, mx, w1, w2)
    dx = (d_avg / (H * W))[:, :, None].expand(B, C, H * W).clone()
    dx.scatter_add_(2, arg[:, :, None], d_mx[:, :, None])
    return dx.view(B, C, H, W).to(x.dtype), dw1.to(w1.dtype), dw2.to(w2.dtype)


def attention_mlp_bwd(grad_a: Tensor, a: Tensor, avg: Tensor, mx: Tensor, w1: Tensor,
                      w2: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Backward of :func:`attention_mlp_fwd` on ``(B, C)`` matrices, in the accumulation dtype:
    ``dw1 (C/2, C)``, ``dw2 (C, C/2)``, ``d_avg (B, C)``, ``d_mx (B, C)``."""
    w1f, w2f, af = _acc(w1), _acc(w2), _acc(a)
    dz = _acc(grad_a) * af * (1 - af)
    h_avg, h_mx = F.relu(avg @ w1f.t()), F.relu(mx @ w1f.t())
    dw2 = dz.t() @ (h_avg + h_mx)
    dh = dz @ w2f
    dh_avg, dh_mx = dh * (h_avg > 0), dh * (h_mx > 0)
    dw1 = dh_avg.t() @ avg + dh_mx.t() @ mx
    return dw1, dw2, dh_avg @ w1f, dh_mx @ w1f


# ----------------------------------------------------------------------------- 2. gather

def attention_gather_fwd(x: Tensor, a: Tensor, idx: Tensor) -> Tensor:
    """``x_sel[b, j] = x[b, idx[j]] * a[b, idx[j]]``: ``(B, n, H, W)``, without forming ``x * a``."""
    xs = _acc(x).index_select(1, idx)
    return (xs * _acc(a).index_select(1, idx)[:, :, None, None]).to(x.dtype)


def attention_gather_bwd(grad: Tensor, x: Tensor, a: Tensor, idx: Tensor) -> Tuple[Tensor, Tensor]:
    """``dx[b, idx[j]] = grad[b, j] * a[b, idx[j]]`` (zero on other channels),
    ``da[b, idx[j]] = sum_hw grad[b, j] * x[b, idx[j]]`` (zero elsewhere)."""
    g = _acc(grad)
    xs = _acc(x).index_select(1, idx)
    a_sel = _acc(a).index_select(1, idx)
    dx = torch.zeros(x.shape, dtype=g.dtype, device=x.device)
    dx.index_copy_(1, idx, g * a_sel[:, :, None, None])
    da = torch.zeros(a.shape, dtype=g.dtype, device=a.device)
    da.index_copy_(1, idx, (g * xs).sum(dim=(2, 3)))
    return dx.to(x.dtype), da.to(a.dtype)


# ----------------------------------------------------------------------------- 3. write-back

def _base(x: Tensor, a: Tensor, stride: int) -> Tensor:
    """The bypass value before the write: ``x * a`` (stride 1) or ``a * maxpool2x2(x)`` (stride 2),
    equal to ``maxpool2x2(x * a)`` since ``a > 0``."""
    xa = _acc(x)
    if stride == 2:
        xa = F.max_pool2d(xa, 2, 2)
    return xa * _acc(a)[:, :, None, None]


def attention_writeback_fwd(x: Tensor, a: Tensor, idx: Tensor, y: Tensor, beta: Optional[Tensor],
                            stride: int) -> Tensor:
    """``out = beta * base`` with ``out[:, idx] = beta * y``; ``base`` as in :func:`_base`.

    ``y: (B, n, H/stride, W/stride)`` -> ``out: (B, C, H/stride, W/stride)`` (dtype of x).
    ``beta=None`` means 1.
    """
    out = _base(x, a, stride).index_copy(1, idx, _acc(y))
    if beta is not None:
        out = out * _acc(beta)
    return out.to(x.dtype)


def attention_writeback_bwd(grad: Tensor, x: Tensor, a: Tensor, idx: Tensor, y: Tensor, beta: Optional[Tensor],
                            stride: int) -> Tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
    """Gradients w.r.t. ``x, a, y, beta``. The edge output is not kept: the ``beta``
    gradient ``sum(grad * out / beta)`` is recomputed from x, a, idx and y.

    Non-selected channels ``c``: ``da[b, c] = beta * sum(grad * m)`` with ``m = x`` (stride
    1) or ``maxpool2x2(x)`` (stride 2), ``dx = beta * a * grad`` routed through the pooling
    (first maximum of each 2x2 window). Selected channels: ``dy[b, j] = beta * grad[b, idx[j]]``,
    ``dx = da = 0`` exactly, and they add nothing to ``dbeta``: the bypass terms are
    selected (``torch.where``), not multiplied by a 0/1 mask (``0 * NaN`` would be NaN), so
    a NaN or an infinity in ``x`` or ``a`` on an overwritten channel reaches no gradient, and
    one in ``grad`` there only ``dy`` and ``dbeta`` (through ``y``), as in the kernels, which
    never read those values.
    """
    B, C = x.shape[:2]
    g = _acc(grad)
    bf = _acc(beta) if beta is not None else torch.ones((), dtype=g.dtype, device=g.device)
    keep = torch.ones(C, dtype=torch.bool, device=g.device).index_fill(0, idx, False)[None, :, None, None]
    zero = torch.zeros((), dtype=g.dtype, device=g.device)
    xf, af = _acc(x), _acc(a)
    dm = torch.where(keep, g * af[:, :, None, None] * bf, zero)      # d(bypass value), bypass channels only
    if stride == 1:
        m = xf
        dx = dm
    else:
        m, arg = F.max_pool2d(xf, 2, 2, return_indices=True)
        dx = torch.zeros(xf.shape, dtype=g.dtype, device=g.device).flatten(2)
        dx.scatter_(2, arg.flatten(2), dm.flatten(2))
        dx = dx.view(xf.shape)
    gm = torch.where(keep, g * m, zero)
    da = gm.sum(dim=(2, 3)) * bf
    g_sel = g.index_select(1, idx)
    dy = g_sel * bf
    dbeta = None
    if beta is not None:
        dbeta = torch.where(keep, gm * af[:, :, None, None], zero).sum() + (g_sel * _acc(y)).sum()
        dbeta = dbeta.reshape(beta.shape).to(beta.dtype)
    return dx.to(x.dtype), da.to(a.dtype), dy.to(y.dtype), dbeta


# ----------------------------------------------------------------------------- 4. mixed sum

def mixed_sum_pools(x: Tensor, stride: int) -> Tuple[Tensor, Tensor]:
    """The pooling candidates before their BN: ``max_pool_3x3`` and ``avg_pool_3x3``
    (padding 1, ``count_include_pad=False``), ``(B, n, H/stride, W/stride)``, accumulation dtype."""
    xf = _acc(x)
    return (F.max_pool2d(xf, 3, stride, 1),
            F.avg_pool2d(xf, 3, stride, 1, count_include_pad=False))


def mixed_sum_fwd(z: List[Tensor], x: Tensor, z_weights: Tensor, pool_weights: Tensor,
                  identity_weight: Optional[Tensor], stride: int, eps: float,
                  run_mean: Optional[Tensor], run_var: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
    """The weighted sum of BatchNorm-ended inputs, the affine-free BatchNorms folded in.

    ``x: (B, n, H, W)``, ``z``: list of ``P`` tensors ``(B, n, H/s, W/s)`` (any ``P``),
    ``z_weights: (P,)``, ``pool_weights: (2,)`` (max pool, avg pool), ``identity_weight``: a
    0-dim tensor or ``None`` (stride 1 only). With ``u = [maxpool(x), avgpool(x)] + z``
    (``Q = P + 2``) and ``v = [pool_weights[0], pool_weights[1], z_weights[0], ...]``::

        BN_q(u) = (u - mean_q) * rsqrt(var_q + eps)          per channel
        y = sum_q v_q * BN_q(u_q)  (+ identity_weight * x)   summed in q order, identity last

    Training (``run_mean is None``): ``mean_q, var_q`` are the batch statistics over
    ``(B, H', W')`` (biased variance); eval: the given running ones. Non-finite inputs, the
    rule of every backend: ``mean_q = sum / N``, so ``+inf`` / ``-inf`` where the channel's
    values hold infinities of one sign (a window of infinities through the pools), NaN where
    they hold both signs or a NaN; ``var_q`` is then NaN. Returns
    ``y: (B, n, H/s, W/s)`` (dtype of x) and ``mean, var: (Q, n)`` (accumulation dtype), the
    statistics used, for the caller's running-statistics update.
    """
    pf, zf = _acc(pool_weights), _acc(z_weights)
    us = list(mixed_sum_pools(x, stride)) + [_acc(t) for t in z]
    if run_mean is None:
        vm = [torch.var_mean(u, dim=(0, 2, 3), unbiased=False) for u in us]
        var = torch.stack([v for v, _ in vm])
        mean = torch.stack([m for _, m in vm])
        # the kernels' rule for non-finite inputs: mean = sum / N (torch.var_mean gives NaN
        # for any infinity); only non-finite entries are replaced, finite ones keep their bits
        mean = torch.where(torch.isfinite(mean), mean, torch.stack([u.mean(dim=(0, 2, 3)) for u in us]))
    else:
        acc = acc_dtype(x.dtype)    # the statistics' dtype follows x, whatever the buffers' dtype
        mean, var = run_mean.to(acc).clone(), run_var.to(acc).clone()
    rstd = torch.rsqrt(var + eps)
    vs = [pf[0], pf[1]] + [zf[i] for i in range(len(z))]
    y = None
    for q, v in enumerate(vs):
        term = v * ((us[q] - mean[q][None, :, None, None]) * rstd[q][None, :, None, None])
        y = term if y is None else y + term
    if identity_weight is not None:
        y = y + _acc(identity_weight) * _acc(x)
    return y.to(x.dtype), mean, var


def mixed_sum_bwd(grad: Tensor, z: List[Tensor], x: Tensor, z_weights: Tensor, pool_weights: Tensor,
                  identity_weight: Optional[Tensor], mean: Tensor, var: Tensor, stride: int, eps: float,
                  training: bool) -> Tuple[List[Tensor], Tensor, Tensor, Tensor, Tensor]:
    """Gradients of :func:`mixed_sum_fwd`: ``(dz, dx, dz_weights, dpool_weights,
    didentity_weight)``, ``didentity_weight`` a 0-dim zero when ``identity_weight is None``.

    With ``g = grad``, ``N = B*H'*W'``, ``v`` the weights as in the forward and
    ``uh_q = BN_q(u_q)`` recomputed from the saved ``u`` (pools from ``x``) and statistics::

        dv_q = sum(g * uh_q);   didentity_weight = sum(g * x)
        du_q = v_q * rstd_q * (g - mean_c(g) - uh_q * mean_c(g * uh_q))   (training)
        du_q = v_q * rstd_q * g                                             (eval)
        dx   = maxpool_bwd(du_0) + avgpool_bwd(du_1) (+ identity_weight * g)

    ``mean_c`` averages over ``(B, H', W')`` per channel. Max pooling routes to the first
    maximum of each window (row-major), as PyTorch does.
    """
    g = _acc(grad)
    pf, zf, xf = _acc(pool_weights), _acc(z_weights), _acc(x)
    rstd = torch.rsqrt(var + eps)
    us = list(mixed_sum_pools(x, stride)) + [_acc(t) for t in z]
    vs = [pf[0], pf[1]] + [zf[i] for i in range(len(z))]
    dv = torch.zeros(len(vs), dtype=g.dtype, device=g.device)
    dus = []
    for q, v in enumerate(vs):
        uh = (us[q] - mean[q][None, :, None, None]) * rstd[q][None, :, None, None]
        gu = g * uh
        dv[q] = gu.sum()
        if training:
            du = g - g.mean(dim=(0, 2, 3), keepdim=True) - uh * gu.mean(dim=(0, 2, 3), keepdim=True)
        else:
            du = g
        dus.append(du * (v * rstd[q])[None, :, None, None])
    _, arg = F.max_pool2d(xf, 3, stride, 1, return_indices=True)
    dx = torch.ops.aten.max_pool2d_with_indices_backward(dus[0], xf, [3, 3], [stride, stride], [1, 1], [1, 1],
                                                         False, arg)
    dx = dx + torch.ops.aten.avg_pool2d_backward(dus[1], xf, [3, 3], [stride, stride], [1, 1], False, False, None)
    if identity_weight is not None:
        did = (g * xf).sum().to(identity_weight.dtype)
        dx = dx + _acc(identity_weight) * g
    else:
        did = torch.zeros((), dtype=pool_weights.dtype, device=pool_weights.device)
    dz = [d.to(t.dtype) for d, t in zip(dus[2:], z)]
    return dz, dx.to(x.dtype), dv[2:].to(z_weights.dtype, copy=True), dv[:2].to(pool_weights.dtype, copy=True), did
