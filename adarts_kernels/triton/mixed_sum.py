"""Triton kernels of ``mixed_sum``: the weighted sum of BatchNorm-ended inputs with the
affine-free BatchNorms folded in, and its backward.

``x: (B, n, H, W)``, ``z``: ``P`` tensors ``(B, n, H', W')`` (``0 <= P <= 5``, the kernels'
five ``z`` pointers; ``H' = H / s``), ``z_weights: (P,)``, ``pool_weights: (2,)`` (max pool,
avg pool), ``identity_weight``: 0-dim or ``None`` (``HAS_IDENTITY``; stride 1 only). The
``Q = P + 2`` BatchNorm inputs are ``u = [maxpool3x3(x), avgpool3x3(x)] + z`` with the
weights ``v = [pool_weights[0], pool_weights[1]] + z_weights`` (3x3 windows, stride ``s``, padding 1, the
average over the in-bounds elements only). Neither pooling output is ever stored: every
kernel that needs ``u_0, u_1`` recomputes them from the (at most 9) elements of ``x`` in
the window. Max pooling keeps the first maximum of a window in row-major order (strict
``>`` while scanning the rows, then the columns) and a NaN replaces the running maximum
(PyTorch's ``val > max || isnan(val)`` rule), so values and gradient routing match the
reference; a window of ``-inf`` keeps its first in-bounds element.

Forward (training: batch statistics; eval: the given running ones)::

    stats:  _mixed_sum_stats_kernel, grid (n, B): per (q, c, b) plane the mean and the sum
            of squared deviations (per-lane Welford, lanes merged at the end); the launcher
            merges the B planes of a channel with torch (Chan's formula, no host sync)
    y:      _mixed_sum_fwd_kernel, grid (B*n, tiles):
            y = sum_q coef_q * (u_q - mean_q)  (+ identity_weight * x),
            coef_q = v_q * rsqrt(var_q + eps)

Backward::

    reduce: _mixed_sum_bwd_reduce_kernel, grid (n, B): per plane sum(g),
            sum(g * (u_q - mean_q)) for every q and (identity) sum(g * x); summed over b
            by the launcher, which also forms the weights' gradients and the per-channel
            means of the training correction
    dz:     _mixed_sum_bwd_dz_kernel, grid (B*n, tiles): every dz_q in one pass over g
    dx:     _mixed_sum_bwd_dx_kernel, grid (B*n, tiles over H*W): a gather (no atomics):
            each x position visits the <= 9 windows containing it, adds du_1 / count and,
            where it is that window's first maximum, du_0 (the window's pools recomputed)

Accumulation in float32 (float64 for float64 inputs). All per-channel parameters are
small ``(Q, n)`` torch tensors built on the device; no launcher reads device data.
"""
from typing import List, Optional, Tuple

import torch

from ..limits import MAX_Z   # the kernels below take exactly MAX_Z z pointers
from ..ops.reference import acc_dtype as torch_acc_dtype
from ._common import (acc_dtype, block_hw, empty, float_dtypes, import_triton, meta_tensor, num_warps,
                      plane_sizes, recording_launches, require)

triton, tl, _ = import_triton()

Tensor = torch.Tensor


def _pool_launch(block: int, per_thread: int) -> dict:
    """Launch options of the kernels that recompute the 3x3 pools (stats and reduce:
    ``per_thread=2``; dx, which recomputes nine windows per element: ``per_thread=1``).

    ``num_warps``: at most ``per_thread`` elements of the block per thread (between 1 and 16
    warps); each element keeps many values live (the window's loads, the running maximum,
    sum and count, the accumulators; two registers each in float64), and more elements per
    thread spill registers. ``maxnreg``: the architecture's limit for that many threads
    (65536 registers per block, at most 255 per thread), given explicitly because without it
    ptxas aims at a lower count of its own and spills a few words (the loop-carried
    accumulators' initial values) rather than use the registers there are."""
    warps = max(1, min(16, block // (32 * per_thread)))
    return {"num_warps": warps, "maxnreg": min(255, 65536 // (32 * warps))}


# ----------------------------------------------------------------------------- helpers

@triton.jit
def _pool_3x3(x_base, oh, ow, H, W, mask, STRIDE: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    """Both 3x3 pools (padding 1) of the windows at output positions ``(oh, ow)`` of the
    ``(H, W)`` plane at ``x_base``: ``(mx, code, tot, cnt)`` with ``mx`` the maximum,
    ``code = kh*3 + kw`` the window position of the first maximum (NaN wins; all ``-inf``:
    the first in-bounds element), ``tot`` the sum and ``cnt`` (int32) the number of
    in-bounds elements; ``avg = tot / cnt``. Lanes off ``mask`` load nothing and give
    ``(0, code, 0, 0)``."""
    h0 = oh * STRIDE - 1
    w0 = ow * STRIDE - 1
    mx = tl.full([BLOCK], float("-inf"), ACC_DTYPE)
    code = tl.where(h0 < 0, 3, 0) + tl.where(w0 < 0, 1, 0)
    tot = tl.zeros([BLOCK], dtype=ACC_DTYPE)
    cnt = tl.zeros([BLOCK], dtype=tl.int32)
    for kh in tl.static_range(3):
        h = h0 + kh
        row_ok = mask & (h >= 0) & (h < H)
        for kw in tl.static_range(3):
            w = w0 + kw
            ok = row_ok & (w >= 0) & (w < W)
            v = tl.load(x_base + h * W + w, mask=ok, other=0.0).to(ACC_DTYPE)
            upd = ok & ((v > mx) | (v != v))
            mx = tl.where(upd, v, mx)
            code = tl.where(upd, kh * 3 + kw, code)
            tot += v
            cnt += ok.to(tl.int32)
    mx = tl.where(cnt > 0, mx, 0.0)       # lanes off mask: 0, not -inf (no inf * 0 downstream)
    return mx, code, tot, cnt


@triton.jit
def _welford_step(cnt, mean, m2, v, mask):
    """One element per lane into the per-lane running ``(cnt, mean, m2)`` (lanes off
    ``mask`` unchanged). A non-finite running mean moves as a sum would (``mean + v``: an
    infinity stays, the other sign or a NaN gives NaN), so that the plane mean follows the
    rule of every backend, ``mean = sum / N`` (Welford's ``inf + (v - inf) / cnt`` would give
    NaN for a finite ``v``); finite means update exactly as before."""
    v = tl.where(mask, v, 0.0)
    cnt_new = cnt + tl.where(mask, 1.0, 0.0)
    delta = v - mean
    finite = (mean - mean) == 0.0
    mean_new = mean + tl.where(mask, tl.where(finite, delta / tl.maximum(cnt_new, 1.0), v), 0.0)
    m2_new = m2 + tl.where(mask, delta * (v - mean_new), 0.0)
    return cnt_new, mean_new, m2_new


@triton.jit
def _welford_finish(cnt, mean, m2):
    """Merge the lanes: ``(mean, sum of squared deviations)`` of all elements seen (at
    least one)."""
    total = tl.sum(cnt, axis=0)
    mu = tl.sum(cnt * mean, axis=0) / total
    d = mean - mu
    return mu, tl.sum(m2 + cnt * d * d, axis=0)


@triton.jit
def _plane_moments(base, HWO, ACC_DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    """``(mean, sum of squared deviations)`` of the ``HWO`` contiguous elements at ``base``."""
    offs = tl.arange(0, BLOCK)
    cnt = tl.zeros([BLOCK], dtype=ACC_DTYPE)
    mean = tl.zeros([BLOCK], dtype=ACC_DTYPE)
    m2 = tl.zeros([BLOCK], dtype=ACC_DTYPE)
    for start in range(0, HWO, BLOCK):
        o = start + offs
        mask = o < HWO
        v = tl.load(base + o, mask=mask, other=0.0).to(ACC_DTYPE)
        cnt, mean, m2 = _welford_step(cnt, mean, m2, v, mask)
    return _welford_finish(cnt, mean, m2)


@triton.jit
def _plane_dot(g_base, u_base, mean_u, HWO, ACC_DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    """``sum(g * (u - mean_u))`` over the ``HWO`` contiguous elements of two planes."""
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=ACC_DTYPE)
    for start in range(0, HWO, BLOCK):
        o = start + offs
        mask = o < HWO
        g = tl.load(g_base + o, mask=mask, other=0.0).to(ACC_DTYPE)
        u = tl.load(u_base + o, mask=mask, other=0.0).to(ACC_DTYPE)
        acc += tl.where(mask, g * (u - mean_u), 0.0)
    return tl.sum(acc, axis=0)


@triton.jit
def _du(g, u, prm_ptr, gm, q, Q, NC, c, TRAINING: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """``du_q`` of one channel from ``prm: (4, Q, n) = [mean, rstd, coef, gum]``::

        training: coef_q * (g - gm - uh * gum_q),  uh = (u - mean_q) * rstd_q
        eval:     coef_q * g
    """
    coef = tl.load(prm_ptr + (2 * Q + q) * NC + c).to(ACC_DTYPE)
    if TRAINING:
        mean = tl.load(prm_ptr + q * NC + c).to(ACC_DTYPE)
        rstd = tl.load(prm_ptr + (Q + q) * NC + c).to(ACC_DTYPE)
        gum = tl.load(prm_ptr + (3 * Q + q) * NC + c).to(ACC_DTYPE)
        du = coef * (g - gm - ((u - mean) * rstd) * gum)
    else:
        du = coef * g
    return du


@triton.jit
def _dz_one(g, z_base, dz_base, o, mask, prm_ptr, gm, q, Q, NC, c,
            TRAINING: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """Load one tile of ``z_q``, store the tile of ``dz_q``."""
    u = tl.load(z_base + o, mask=mask, other=0.0).to(ACC_DTYPE)
    du = _du(g, u, prm_ptr, gm, q, Q, NC, c, TRAINING, ACC_DTYPE)
    tl.store(dz_base + o, du.to(dz_base.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- kernels

@triton.jit
def _mixed_sum_stats_kernel(x_ptr, z0_ptr, z1_ptr, z2_ptr, z3_ptr, z4_ptr, pmean_ptr, pm2_ptr,
                            NC, NB, H, W, HO, WO,
                            STRIDE: tl.constexpr, NZ: tl.constexpr,
                            ACC_DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    """Per-plane moments of every BN input; one program per ``(c, b)`` (``grid = (n, B)``).

    ``x: (B, n, H, W)``, ``z0..z{NZ-1}: (B, n, H', W')`` (contiguous; the pointers from
    ``z{NZ}`` on are never read) -> ``pmean, pm2: (Q, n, B)`` (ACC_DTYPE), ``Q = NZ + 2``::

        pmean[q, c, b] = mean_hw u_q[b, c],   pm2[q, c, b] = sum_hw (u_q[b, c] - pmean[q, c, b])^2

    with ``u_0, u_1`` the 3x3 max / average pools of ``x[b, c]`` (recomputed, one read of
    each window per program). Per-lane Welford updates, lanes merged once per plane.
    """
    c = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    plane = b * NC + c
    HWO = HO * WO
    x_base = x_ptr + plane * H * W
    offs = tl.arange(0, BLOCK)
    cnt0 = tl.zeros([BLOCK], dtype=ACC_DTYPE)
    mean0 = tl.zeros([BLOCK], dtype=ACC_DTYPE)
    m20 = tl.zeros([BLOCK], dtype=ACC_DTYPE)
    cnt1 = tl.zeros([BLOCK], dtype=ACC_DTYPE)
    mean1 = tl.zeros([BLOCK], dtype=ACC_DTYPE)
    m21 = tl.zeros([BLOCK], dtype=ACC_DTYPE)
    for start in range(0, HWO, BLOCK):
        o = start + offs
        mask = o < HWO
        oh = o // WO
        ow = o - oh * WO
        mx, code, tot, cnt = _pool_3x3(x_base, oh, ow, H, W, mask, STRIDE, ACC_DTYPE, BLOCK)
        avg = tot / tl.maximum(cnt, 1).to(ACC_DTYPE)
        cnt0, mean0, m20 = _welford_step(cnt0, mean0, m20, mx, mask)
        cnt1, mean1, m21 = _welford_step(cnt1, mean1, m21, avg, mask)
    out = c * NB + b
    step = NC * NB
    mu, m2 = _welford_finish(cnt0, mean0, m20)
    tl.store(pmean_ptr + out, mu)
    tl.store(pm2_ptr + out, m2)
    mu, m2 = _welford_finish(cnt1, mean1, m21)
    tl.store(pmean_ptr + out + step, mu)
    tl.store(pm2_ptr + out + step, m2)
    z_off = plane * HWO
    if NZ > 0:
        mu, m2 = _plane_moments(z0_ptr + z_off, HWO, ACC_DTYPE, BLOCK)
        tl.store(pmean_ptr + out + 2 * step, mu)
        tl.store(pm2_ptr + out + 2 * step, m2)
    if NZ > 1:
        mu, m2 = _plane_moments(z1_ptr + z_off, HWO, ACC_DTYPE, BLOCK)
        tl.store(pmean_ptr + out + 3 * step, mu)
        tl.store(pm2_ptr + out + 3 * step, m2)
    if NZ > 2:
        mu, m2 = _plane_moments(z2_ptr + z_off, HWO, ACC_DTYPE, BLOCK)
        tl.store(pmean_ptr + out + 4 * step, mu)
        tl.store(pm2_ptr + out + 4 * step, m2)
    if NZ > 3:
        mu, m2 = _plane_moments(z3_ptr + z_off, HWO, ACC_DTYPE, BLOCK)
        tl.store(pmean_ptr + out + 5 * step, mu)
        tl.store(pm2_ptr + out + 5 * step, m2)
    if NZ > 4:
        mu, m2 = _plane_moments(z4_ptr + z_off, HWO, ACC_DTYPE, BLOCK)
        tl.store(pmean_ptr + out + 6 * step, mu)
        tl.store(pm2_ptr + out + 6 * step, m2)


@triton.jit
def _mixed_sum_fwd_kernel(x_ptr, z0_ptr, z1_ptr, z2_ptr, z3_ptr, z4_ptr, prm_ptr, id_ptr, y_ptr,
                          NC, H, W, HO, WO,
                          STRIDE: tl.constexpr, NZ: tl.constexpr, HAS_IDENTITY: tl.constexpr,
                          ACC_DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    """``y`` tile by tile; ``grid = (B*n, cdiv(H'*W', BLOCK))``.

    ``x: (B, n, H, W)``, ``z0..z{NZ-1}: (B, n, H', W')``, ``prm: (2, Q, n) = [mean, coef]``
    (ACC_DTYPE, ``coef_q = v_q * rsqrt(var_q + eps)``), ``id: (1,)`` (ACC_DTYPE, the identity
    weight; read only with HAS_IDENTITY, which needs STRIDE 1) -> ``y: (B, n, H', W')``::

        y[b, c] = sum_q coef_q[c] * (u_q[b, c] - mean_q[c])  (+ id * x[b, c] with HAS_IDENTITY)

    ``u_0, u_1`` recomputed from the 3x3 windows of ``x``; each ``z`` element read once,
    each ``y`` element written once.
    """
    pid = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
    c = pid % NC
    Q = NZ + 2
    HWO = HO * WO
    o = tile * BLOCK + tl.arange(0, BLOCK)
    mask = o < HWO
    oh = o // WO
    ow = o - oh * WO
    x_base = x_ptr + pid * H * W
    mx, code, tot, cnt = _pool_3x3(x_base, oh, ow, H, W, mask, STRIDE, ACC_DTYPE, BLOCK)
    avg = tot / tl.maximum(cnt, 1).to(ACC_DTYPE)
    y = (mx - tl.load(prm_ptr + c).to(ACC_DTYPE)) * tl.load(prm_ptr + Q * NC + c).to(ACC_DTYPE)
    y += (avg - tl.load(prm_ptr + NC + c).to(ACC_DTYPE)) * tl.load(prm_ptr + (Q + 1) * NC + c).to(ACC_DTYPE)
    z_off = pid * HWO + o
    if NZ > 0:
        v = tl.load(z0_ptr + z_off, mask=mask, other=0.0).to(ACC_DTYPE)
        y += (v - tl.load(prm_ptr + 2 * NC + c).to(ACC_DTYPE)) * tl.load(prm_ptr + (Q + 2) * NC + c).to(ACC_DTYPE)
    if NZ > 1:
        v = tl.load(z1_ptr + z_off, mask=mask, other=0.0).to(ACC_DTYPE)
        y += (v - tl.load(prm_ptr + 3 * NC + c).to(ACC_DTYPE)) * tl.load(prm_ptr + (Q + 3) * NC + c).to(ACC_DTYPE)
    if NZ > 2:
        v = tl.load(z2_ptr + z_off, mask=mask, other=0.0).to(ACC_DTYPE)
        y += (v - tl.load(prm_ptr + 4 * NC + c).to(ACC_DTYPE)) * tl.load(prm_ptr + (Q + 4) * NC + c).to(ACC_DTYPE)
    if NZ > 3:
        v = tl.load(z3_ptr + z_off, mask=mask, other=0.0).to(ACC_DTYPE)
        y += (v - tl.load(prm_ptr + 5 * NC + c).to(ACC_DTYPE)) * tl.load(prm_ptr + (Q + 5) * NC + c).to(ACC_DTYPE)
    if NZ > 4:
        v = tl.load(z4_ptr + z_off, mask=mask, other=0.0).to(ACC_DTYPE)
        y += (v - tl.load(prm_ptr + 6 * NC + c).to(ACC_DTYPE)) * tl.load(prm_ptr + (Q + 6) * NC + c).to(ACC_DTYPE)
    if HAS_IDENTITY:
        v = tl.load(x_base + o, mask=mask, other=0.0).to(ACC_DTYPE)
        y += tl.load(id_ptr).to(ACC_DTYPE) * v
    tl.store(y_ptr + pid * HWO + o, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _mixed_sum_bwd_reduce_kernel(grad_ptr, x_ptr, z0_ptr, z1_ptr, z2_ptr, z3_ptr, z4_ptr, mean_ptr, part_ptr,
                                 NC, NB, H, W, HO, WO,
                                 STRIDE: tl.constexpr, NZ: tl.constexpr, HAS_IDENTITY: tl.constexpr,
                                 ACC_DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    """Per-plane sums of the backward; one program per ``(c, b)`` (``grid = (n, B)``).

    ``grad: (B, n, H', W')``, ``x``, ``z`` as in the forward, ``mean: (Q, n)`` (ACC_DTYPE)
    -> ``part: (R, n, B)`` (ACC_DTYPE), ``R = Q + 1`` (+ 1 with HAS_IDENTITY), ``g = grad[b, c]``::

        part[0, c, b]     = sum_hw g
        part[1 + q, c, b] = sum_hw g * (u_q[b, c] - mean_q[c])      q < Q
        part[Q + 1, c, b] = sum_hw g * x[b, c]                       HAS_IDENTITY only (STRIDE 1)
    """
    c = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    plane = b * NC + c
    HWO = HO * WO
    x_base = x_ptr + plane * H * W
    g_base = grad_ptr + plane * HWO
    mean0 = tl.load(mean_ptr + c).to(ACC_DTYPE)
    mean1 = tl.load(mean_ptr + NC + c).to(ACC_DTYPE)
    offs = tl.arange(0, BLOCK)
    acc_g = tl.zeros([BLOCK], dtype=ACC_DTYPE)
    acc_0 = tl.zeros([BLOCK], dtype=ACC_DTYPE)
    acc_1 = tl.zeros([BLOCK], dtype=ACC_DTYPE)
    acc_x = tl.zeros([BLOCK], dtype=ACC_DTYPE)
    for start in range(0, HWO, BLOCK):
        o = start + offs
        mask = o < HWO
        oh = o // WO
        ow = o - oh * WO
        g = tl.load(g_base + o, mask=mask, other=0.0).to(ACC_DTYPE)
        mx, code, tot, cnt = _pool_3x3(x_base, oh, ow, H, W, mask, STRIDE, ACC_DTYPE, BLOCK)
        avg = tot / tl.maximum(cnt, 1).to(ACC_DTYPE)
        acc_g += g
        acc_0 += tl.where(mask, g * (mx - mean0), 0.0)
        acc_1 += tl.where(mask, g * (avg - mean1), 0.0)
        if HAS_IDENTITY:
            acc_x += g * tl.load(x_base + o, mask=mask, other=0.0).to(ACC_DTYPE)
    out = c * NB + b
    step = NC * NB
    tl.store(part_ptr + out, tl.sum(acc_g, axis=0))
    tl.store(part_ptr + out + step, tl.sum(acc_0, axis=0))
    tl.store(part_ptr + out + 2 * step, tl.sum(acc_1, axis=0))
    z_off = plane * HWO
    if NZ > 0:
        s = _plane_dot(g_base, z0_ptr + z_off, tl.load(mean_ptr + 2 * NC + c).to(ACC_DTYPE), HWO, ACC_DTYPE, BLOCK)
        tl.store(part_ptr + out + 3 * step, s)
    if NZ > 1:
        s = _plane_dot(g_base, z1_ptr + z_off, tl.load(mean_ptr + 3 * NC + c).to(ACC_DTYPE), HWO, ACC_DTYPE, BLOCK)
        tl.store(part_ptr + out + 4 * step, s)
    if NZ > 2:
        s = _plane_dot(g_base, z2_ptr + z_off, tl.load(mean_ptr + 4 * NC + c).to(ACC_DTYPE), HWO, ACC_DTYPE, BLOCK)
        tl.store(part_ptr + out + 5 * step, s)
    if NZ > 3:
        s = _plane_dot(g_base, z3_ptr + z_off, tl.load(mean_ptr + 5 * NC + c).to(ACC_DTYPE), HWO, ACC_DTYPE, BLOCK)
        tl.store(part_ptr + out + 6 * step, s)
    if NZ > 4:
        s = _plane_dot(g_base, z4_ptr + z_off, tl.load(mean_ptr + 6 * NC + c).to(ACC_DTYPE), HWO, ACC_DTYPE, BLOCK)
        tl.store(part_ptr + out + 7 * step, s)
    if HAS_IDENTITY:
        tl.store(part_ptr + out + (NZ + 3) * step, tl.sum(acc_x, axis=0))


@triton.jit
def _mixed_sum_bwd_dz_kernel(grad_ptr, z0_ptr, z1_ptr, z2_ptr, z3_ptr, z4_ptr, prm_ptr, gm_ptr,
                             dz0_ptr, dz1_ptr, dz2_ptr, dz3_ptr, dz4_ptr, NC, HWO,
                             NZ: tl.constexpr, TRAINING: tl.constexpr,
                             ACC_DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    """Every ``dz_q`` in one pass over ``g``; ``grid = (B*n, cdiv(H'*W', BLOCK))``.

    ``grad, z_q, dz_q: (B, n, H', W')``, ``prm: (4, Q, n) = [mean, rstd, coef, gum]`` and
    ``gm: (n,)`` (ACC_DTYPE; ``coef_q = v_q * rstd_q``, ``gm = mean_c(g)``,
    ``gum_q = mean_c(g * uh_q)``)::

        dz_q = coef_{q+2} * (g - gm - uh_{q+2} * gum_{q+2}),  uh = (z_q - mean) * rstd   (TRAINING)
        dz_q = coef_{q+2} * g                                                         (eval)
    """
    pid = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
    c = pid % NC
    Q = NZ + 2
    o = tile * BLOCK + tl.arange(0, BLOCK)
    mask = o < HWO
    off = pid * HWO
    g = tl.load(grad_ptr + off + o, mask=mask, other=0.0).to(ACC_DTYPE)
    if TRAINING:
        gm = tl.load(gm_ptr + c).to(ACC_DTYPE)
    else:
        gm = 0.0
    if NZ > 0:
        _dz_one(g, z0_ptr + off, dz0_ptr + off, o, mask, prm_ptr, gm, 2, Q, NC, c, TRAINING, ACC_DTYPE)
    if NZ > 1:
        _dz_one(g, z1_ptr + off, dz1_ptr + off, o, mask, prm_ptr, gm, 3, Q, NC, c, TRAINING, ACC_DTYPE)
    if NZ > 2:
        _dz_one(g, z2_ptr + off, dz2_ptr + off, o, mask, prm_ptr, gm, 4, Q, NC, c, TRAINING, ACC_DTYPE)
    if NZ > 3:
        _dz_one(g, z3_ptr + off, dz3_ptr + off, o, mask, prm_ptr, gm, 5, Q, NC, c, TRAINING, ACC_DTYPE)
    if NZ > 4:
        _dz_one(g, z4_ptr + off, dz4_ptr + off, o, mask, prm_ptr, gm, 6, Q, NC, c, TRAINING, ACC_DTYPE)


@triton.jit
def _mixed_sum_bwd_dx_kernel(grad_ptr, x_ptr, prm_ptr, gm_ptr, id_ptr, dx_ptr,
                             NC, H, W, HO, WO,
                             STRIDE: tl.constexpr, NZ: tl.constexpr, HAS_IDENTITY: tl.constexpr,
                             TRAINING: tl.constexpr,
                             ACC_DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    """``dx`` by gathering; ``grid = (B*n, cdiv(H*W, BLOCK))``.

    ``grad: (B, n, H', W')``, ``x, dx: (B, n, H, W)``, ``prm``, ``gm`` as in
    :func:`_mixed_sum_bwd_dz_kernel`, ``id: (1,)`` (ACC_DTYPE, read with HAS_IDENTITY). For ``x[b, c, h, w]`` and each
    window ``(oh, ow)`` holding it at offset ``(kh, kw)`` (``h = oh*STRIDE - 1 + kh``)::

        dx += du_1[oh, ow] / count(oh, ow)
        dx += du_0[oh, ow]                      if (kh, kw) is the window's first maximum
        dx += id * g[h, w]                      HAS_IDENTITY (STRIDE 1)

    ``du_0, du_1`` as ``dz`` in :func:`_mixed_sum_bwd_dz_kernel` with ``u_0, u_1`` the
    window's pools, recomputed from ``x``. Each ``dx`` element written once, no atomics.
    """
    pid = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
    c = pid % NC
    Q = NZ + 2
    HWO = HO * WO
    p = tile * BLOCK + tl.arange(0, BLOCK)
    mask = p < H * W
    h = p // W
    w = p - h * W
    x_base = x_ptr + pid * H * W
    g_base = grad_ptr + pid * HWO
    if TRAINING:
        gm = tl.load(gm_ptr + c).to(ACC_DTYPE)
    else:
        gm = 0.0
    acc = tl.zeros([BLOCK], dtype=ACC_DTYPE)
    for kh in tl.static_range(3):
        th = h + 1 - kh
        th_c = tl.maximum(th, 0)
        oh = th_c // STRIDE
        row_ok = mask & (th >= 0) & (th_c - oh * STRIDE == 0) & (oh < HO)
        for kw in tl.static_range(3):
            tw = w + 1 - kw
            tw_c = tl.maximum(tw, 0)
            ow = tw_c // STRIDE
            ok = row_ok & (tw >= 0) & (tw_c - ow * STRIDE == 0) & (ow < WO)
            g = tl.load(g_base + oh * WO + ow, mask=ok, other=0.0).to(ACC_DTYPE)
            mx, code, tot, cnt = _pool_3x3(x_base, oh, ow, H, W, ok, STRIDE, ACC_DTYPE, BLOCK)
            cnt_f = tl.maximum(cnt, 1).to(ACC_DTYPE)
            du1 = _du(g, tot / cnt_f, prm_ptr, gm, 1, Q, NC, c, TRAINING, ACC_DTYPE)
            acc += tl.where(ok, du1 / cnt_f, 0.0)
            du0 = _du(g, mx, prm_ptr, gm, 0, Q, NC, c, TRAINING, ACC_DTYPE)
            acc += tl.where(ok & (code == kh * 3 + kw), du0, 0.0)
    if HAS_IDENTITY:
        g = tl.load(g_base + p, mask=mask, other=0.0).to(ACC_DTYPE)
        acc += tl.load(id_ptr).to(ACC_DTYPE) * g
    tl.store(dx_ptr + pid * H * W + p, acc.to(dx_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- launchers

def _check(op: str, z, x: Tensor, z_weights: Tensor, pool_weights: Tensor, identity_weight: Optional[Tensor],
           stride: int) -> Tuple[int, int]:
    """Shape checks (no device data read); returns ``(H', W')``."""
    if isinstance(stride, bool) or stride not in (1, 2):
        raise ValueError(f"adarts {op}: stride must be 1 or 2, got {stride!r}")
    if x.dim() != 4:
        raise ValueError(f"adarts {op}: x must be (B, n, H, W), got {tuple(x.shape)}")
    B, n, H, W = x.shape
    if H == 0 or W == 0:
        raise ValueError(f"adarts {op}: x must have non-empty planes (H, W > 0), got {tuple(x.shape)}")
    if stride == 2 and (H % 2 or W % 2):
        raise ValueError(f"adarts {op}: stride 2 needs even H and W, got {tuple(x.shape)}")
    if not isinstance(z, (list, tuple)) or len(z) > MAX_Z:
        raise ValueError(f"adarts {op}: z must be a list of at most {MAX_Z} tensors")
    want = (B, n, H // stride, W // stride)
    for i, t in enumerate(z):
        if tuple(t.shape) != want:
            raise ValueError(f"adarts {op}: z[{i}] must be (B, n, H/stride, W/stride)={want}, got {tuple(t.shape)}")
    if tuple(z_weights.shape) != (len(z),):
        raise ValueError(f"adarts {op}: z_weights must be (P,)={(len(z),)}, got {tuple(z_weights.shape)}")
    if tuple(pool_weights.shape) != (2,):
        raise ValueError(f"adarts {op}: pool_weights must be (2,), got {tuple(pool_weights.shape)}")
    if identity_weight is not None:
        if stride != 1:
            raise ValueError(f"adarts {op}: identity_weight must be None at stride 2")
        if identity_weight.dim() != 0:
            raise ValueError(f"adarts {op}: identity_weight must be 0-dim, got {tuple(identity_weight.shape)}")
    return H // stride, W // stride


def _z_ptrs(z: List[Tensor], filler: Tensor) -> List[Tensor]:
    """Five pointers for the kernels; those past ``len(z)`` are ``filler`` (never accessed)."""
    return list(z) + [filler] * (MAX_Z - len(z))


def _coef(z_weights: Tensor, pool_weights: Tensor, rstd: Tensor) -> Tensor:
    """``coef_q = v_q * rstd_q``, ``v = [pool_weights, z_weights]``: ``(Q, n)``."""
    v = torch.cat([pool_weights, z_weights]).to(rstd.dtype)
    return v[:, None] * rstd


def _identity_arg(identity_weight: Optional[Tensor], acc: torch.dtype, like: Tensor) -> Tensor:
    """The identity weight as a ``(1,)`` tensor in ``acc`` (``like`` when absent: never read)."""
    return like if identity_weight is None else identity_weight.to(acc).reshape(1)


def mixed_sum_fwd(z: List[Tensor], x: Tensor, z_weights: Tensor, pool_weights: Tensor,
                  identity_weight: Optional[Tensor], stride: int, eps: float,
                  run_mean: Optional[Tensor], run_var: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
    """``y = sum_q v_q * (u_q - mean_q) * rsqrt(var_q + eps)`` (+ ``identity_weight * x``),
    ``u = [maxpool3x3(x), avgpool3x3(x)] + z``, ``v = [pool_weights, z_weights]``.
    ``x: (B, n, H, W)``, ``z``: ``P <= 5`` tensors ``(B, n, H/s, W/s)``, ``z_weights: (P,)``,
    ``pool_weights: (2,)``, ``identity_weight``: 0-dim or ``None`` -> ``y`` (dtype of x),
    ``mean, var: (Q, n)`` in x's accumulation dtype (float32, float64 for float64 x): the
    batch statistics (``run_mean is None``, biased variance) or copies of ``run_mean,
    run_var`` in that dtype, whatever the buffers' dtype. Statistics by
    :func:`_mixed_sum_stats_kernel` plus a torch merge over the batch, ``y`` by
    :func:`_mixed_sum_fwd_kernel`."""
    op = "mixed_sum_fwd"
    require(op)
    HO, WO = _check(op, z, x, z_weights, pool_weights, identity_weight, stride)
    if (run_mean is None) != (run_var is None):
        raise ValueError(f"adarts {op}: give both run_mean and run_var, or neither")
    x = x.contiguous()
    z = [t.contiguous() for t in z]
    B, n, H, W = x.shape
    Q = len(z) + 2
    acc = torch_acc_dtype(x.dtype)
    HWO = HO * WO
    if run_mean is None:
        if B * n * HWO == 0:      # empty batch statistics (NaN), nothing to launch for
            from ..ops.reference import mixed_sum_fwd as ref
            return ref(z, x, z_weights, pool_weights, identity_weight, stride, eps, run_mean, run_var)
        pmean = empty((Q, n, B), acc, x.device)
        pm2 = empty((Q, n, B), acc, x.device)
        block = block_hw(HWO)
        _mixed_sum_stats_kernel[(n, B)](
            x, *_z_ptrs(z, x), pmean, pm2, n, B, H, W, HO, WO,
            STRIDE=stride, NZ=len(z), ACC_DTYPE=acc_dtype(x.dtype), BLOCK=block, **_pool_launch(block, 2))
        mean = pmean.mean(dim=2)
        var = (pm2.sum(dim=2) + HWO * (pmean - mean[:, :, None]).square().sum(dim=2)) / (B * HWO)
    else:
        if tuple(run_mean.shape) != (Q, n) or tuple(run_var.shape) != (Q, n):
            raise ValueError(f"adarts {op}: run_mean and run_var must be (Q, n)={(Q, n)}, "
                             f"got {tuple(run_mean.shape)} and {tuple(run_var.shape)}")
        # the statistics' dtype follows x (acc), whatever the buffers' dtype (as the reference)
        mean, var = run_mean.to(acc, copy=True), run_var.to(acc, copy=True)
    y = empty((B, n, HO, WO), x.dtype, x.device)
    if B * n * HWO == 0:
        return y, mean, var
    rstd = torch.rsqrt(var + eps).to(acc)
    prm = torch.stack([mean.to(acc), _coef(z_weights, pool_weights, rstd)]).contiguous()      # (2, Q, n)
    block = block_hw(HWO, hi=512)
    _mixed_sum_fwd_kernel[(B * n, triton.cdiv(HWO, block))](
        x, *_z_ptrs(z, x), prm, _identity_arg(identity_weight, acc, prm), y, n, H, W, HO, WO,
        STRIDE=stride, NZ=len(z), HAS_IDENTITY=identity_weight is not None, ACC_DTYPE=acc_dtype(x.dtype),
        BLOCK=block, num_warps=num_warps(block))
    return y, mean, var


def mixed_sum_bwd(grad: Tensor, z: List[Tensor], x: Tensor, z_weights: Tensor, pool_weights: Tensor,
                  identity_weight: Optional[Tensor], mean: Tensor, var: Tensor, stride: int, eps: float,
                  training: bool) -> Tuple[List[Tensor], Tensor, Tensor, Tensor, Tensor]:
    """Gradients of :func:`mixed_sum_fwd`: ``(dz, dx, dz_weights, dpool_weights,
    didentity_weight)`` (each in its input's dtype; ``didentity_weight`` a 0-dim zero without
    the identity), with ``g = grad``, ``N = B*H'*W'``, ``uh_q = (u_q - mean_q) * rstd_q``::

        dv_q = sum(g * uh_q);   didentity_weight = sum(g * x)
        du_q = v_q * rstd_q * (g - mean_c(g) - uh_q * mean_c(g * uh_q))   (training)
        du_q = v_q * rstd_q * g                                             (eval)
        dz_q = du_{q+2};   dx = maxpool_bwd(du_0) + avgpool_bwd(du_1) (+ identity_weight * g)

    Per-plane sums by :func:`_mixed_sum_bwd_reduce_kernel` (summed over the batch with
    torch), then :func:`_mixed_sum_bwd_dz_kernel` and :func:`_mixed_sum_bwd_dx_kernel`.
    """
    op = "mixed_sum_bwd"
    require(op)
    HO, WO = _check(op, z, x, z_weights, pool_weights, identity_weight, stride)
    B, n, H, W = x.shape
    Q = len(z) + 2
    has_id = identity_weight is not None
    if tuple(grad.shape) != (B, n, HO, WO):
        raise ValueError(f"adarts {op}: grad must be (B, n, H/stride, W/stride)={(B, n, HO, WO)}, "
                         f"got {tuple(grad.shape)}")
    if tuple(mean.shape) != (Q, n) or tuple(var.shape) != (Q, n):
        raise ValueError(f"adarts {op}: mean and var must be (Q, n)={(Q, n)}, "
                         f"got {tuple(mean.shape)} and {tuple(var.shape)}")
    grad, x = grad.contiguous(), x.contiguous()
    z = [t.contiguous() for t in z]
    acc = torch_acc_dtype(x.dtype)
    HWO = HO * WO
    id_dtype = identity_weight.dtype if has_id else pool_weights.dtype
    dz = [empty(t.shape, t.dtype, t.device) for t in z]
    dx = empty((B, n, H, W), x.dtype, x.device)
    if B * n * HWO == 0:
        for t in dz:
            t.zero_()
        return (dz, dx.zero_(), torch.zeros_like(z_weights, memory_format=torch.contiguous_format),
                torch.zeros_like(pool_weights, memory_format=torch.contiguous_format),
                torch.zeros((), dtype=id_dtype, device=x.device))
    rstd = torch.rsqrt(var + eps).to(acc)
    mean_a = mean.to(acc).contiguous()
    rows = Q + 1 + int(has_id)
    part = empty((rows, n, B), acc, x.device)
    block = block_hw(HWO)
    acc_tl = acc_dtype(x.dtype)
    zp = _z_ptrs(z, x)
    _mixed_sum_bwd_reduce_kernel[(n, B)](
        grad, x, *zp, mean_a, part, n, B, H, W, HO, WO,
        STRIDE=stride, NZ=len(z), HAS_IDENTITY=has_id, ACC_DTYPE=acc_tl, BLOCK=block, **_pool_launch(block, 2))
    sums = part.sum(dim=2)                          # (rows, n)
    s_gu = sums[1:Q + 1] * rstd                     # (Q, n): per-channel sum(g * uh_q)
    dv = s_gu.sum(dim=1)                            # (Q,): the gradients of v
    did = sums[Q + 1].sum() if has_id else torch.zeros((), dtype=acc, device=x.device)
    N = B * HWO
    coef = _coef(z_weights, pool_weights, rstd)
    gm = (sums[0] / N).contiguous()
    gum = s_gu / N
    prm = torch.stack([mean_a, rstd, coef, gum]).contiguous()                  # (4, Q, n)
    dzp = _z_ptrs(dz, dx)
    block = block_hw(HWO, hi=512)
    _mixed_sum_bwd_dz_kernel[(B * n, triton.cdiv(HWO, block))](
        grad, *zp, prm, gm, *dzp, n, HWO,
        NZ=len(z), TRAINING=bool(training), ACC_DTYPE=acc_tl, BLOCK=block, num_warps=num_warps(block))
    block = block_hw(H * W, hi=256)
    _mixed_sum_bwd_dx_kernel[(B * n, triton.cdiv(H * W, block))](
        grad, x, prm, gm, _identity_arg(identity_weight, acc, prm), dx, n, H, W, HO, WO,
        STRIDE=stride, NZ=len(z), HAS_IDENTITY=has_id, TRAINING=bool(training), ACC_DTYPE=acc_tl, BLOCK=block,
        **_pool_launch(block, 1))
    return (dz, dx, dv[2:].to(z_weights.dtype, copy=True), dv[:2].to(pool_weights.dtype, copy=True),
            did.to(id_dtype))


def compile_configs():
    """Every distinct ``(kernel, signature, constexprs, num_warps)`` the launchers above can
    launch: they run on meta tensors over every dtype, stride, number of ``z`` inputs
    (0..MAX_Z), with and without the identity (stride 1), training and eval, and plane sizes
    reaching every block."""
    require("mixed_sum compile_configs")
    B, n = 2, 3
    with recording_launches(globals()) as configs:
        for dtype in float_dtypes():
            for stride in (1, 2):
                for H, W in plane_sizes(stride):
                    x = meta_tensor((B, n, H, W), dtype)
                    grad = meta_tensor((B, n, H // stride, W // stride), dtype)
                    for nz in range(MAX_Z + 1):
                        z = [meta_tensor(grad.shape, dtype) for _ in range(nz)]
                        zw, pw = meta_tensor((nz,), dtype), meta_tensor((2,), dtype)
                        running = meta_tensor((nz + 2, n), dtype)
                        for identity in ((None, meta_tensor((), dtype)) if stride == 1 else (None,)):
                            for training in (True, False):
                                rm, rv = (None, None) if training else (running, running)
                                _, mean, var = mixed_sum_fwd(z, x, zw, pw, identity, stride, 1e-5, rm, rv)
                                mixed_sum_bwd(grad, z, x, zw, pw, identity, mean, var, stride, 1e-5, training)
    return configs
