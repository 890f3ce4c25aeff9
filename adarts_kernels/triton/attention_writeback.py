"""Triton kernels of ``attention_writeback``: the edge output ``beta * (x * a)`` (stride 1)
or ``beta * a * maxpool2x2(x)`` (stride 2) with the selected channels replaced by
``beta * y``, and its backward.

One program per ``(b, c)`` plane of the output (forward: per ``(b, c, tile)``); the
channel -> slot test uses ``inv: (C,)`` int32 (``j`` with ``idx[j] == c``, or -1) built on
the device from ``idx``. A program of a selected channel never loads ``x``, one of a
bypass channel never loads ``y`` (masked loads). 2x2 max pooling (floor mode, as
``F.max_pool2d(x, 2, 2)``) takes the first maximum of each window in row-major order;
a NaN wins (the last NaN of a window, as PyTorch's max pooling kernels), so values and
gradient routing match the reference.

The ``beta`` gradient is reduced deterministically: each backward program writes its
plane's partial sum into a ``(B*C,)`` buffer (float32, float64 for float64 inputs), which
the launcher sums with torch.

``idx`` values must be distinct and in ``[0, C)`` (checked by the ``adarts::`` ops, not here).
"""
from typing import Optional, Tuple

import torch

from ..ops.reference import acc_dtype as torch_acc_dtype
from ._common import (acc_dtype, block_hw, check_x_a_idx, empty, float_dtypes, import_triton, inverse_map,
                      meta_tensor, num_warps, plane_sizes, recording_launches, require)

triton, tl, _ = import_triton()

Tensor = torch.Tensor


@triton.jit
def _max_pool_2x2(p, stride_h, mask, ACC_DTYPE: tl.constexpr):
    """Max of the 2x2 windows whose top-left elements are at pointers ``p`` (row pitch
    ``stride_h``): ``(m, k)``, ``k`` in 0..3 the row-major position of the first maximum
    (a NaN replaces the running maximum: PyTorch's ``val > max || isnan(val)`` rule).
    Masked-off lanes give ``(0, 0)``."""
    m = tl.load(p, mask=mask, other=0.0).to(ACC_DTYPE)
    v = tl.load(p + 1, mask=mask, other=0.0).to(ACC_DTYPE)
    upd = (v > m) | (v != v)
    m = tl.where(upd, v, m)
    k = tl.where(upd, 1, 0)
    v = tl.load(p + stride_h, mask=mask, other=0.0).to(ACC_DTYPE)
    upd = (v > m) | (v != v)
    m = tl.where(upd, v, m)
    k = tl.where(upd, 2, k)
    v = tl.load(p + stride_h + 1, mask=mask, other=0.0).to(ACC_DTYPE)
    upd = (v > m) | (v != v)
    m = tl.where(upd, v, m)
    k = tl.where(upd, 3, k)
    return m, k


@triton.jit
def _attention_writeback_fwd_kernel(x_ptr, a_ptr, inv_ptr, y_ptr, beta_ptr, out_ptr, C, HWO, WO,
                                    stride_xb, stride_xc, stride_xh, stride_ab,
                                    stride_yb, stride_yc, stride_ob, stride_oc,
                                    HAS_BETA: tl.constexpr, STRIDE: tl.constexpr,
                                    ACC_DTYPE: tl.constexpr, BLOCK_HW: tl.constexpr):
    """``grid = (B*C, cdiv(H'*W', BLOCK_HW))``, ``H' = H // STRIDE``, ``W' = W // STRIDE``.

    ``x: (B, C, H, W)``, ``a: (B, C)``, ``inv: (C,)`` int32, ``y: (B, n, H', W')``, ``beta``
    0-dim (``HAS_BETA``; else 1) -> ``out: (B, C, H', W')``::

        out[b, c] = beta * y[b, inv[c]]                 if inv[c] >= 0
        out[b, c] = beta * (m[b, c] * a[b, c])          otherwise,
        m = x (STRIDE 1) or maxpool2x2(x) (STRIDE 2)

    ACC_DTYPE arithmetic; each input element read at most once, each output written once.
    """
    pid = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
    b = pid // C
    c = pid % C
    slot = tl.load(inv_ptr + c)
    j = tl.maximum(slot, 0).to(tl.int64)
    scale = tl.load(a_ptr + b * stride_ab + c).to(ACC_DTYPE)
    o = tile * BLOCK_HW + tl.arange(0, BLOCK_HW)
    mask = o < HWO
    # the plane's flag as a block: the interpreter (triton 3.9) mis-types `block & scalar-bool`
    slot_b = tl.zeros([BLOCK_HW], dtype=tl.int32) + slot
    sel_b = slot_b >= 0
    byp_b = slot_b < 0
    x_base = x_ptr + b * stride_xb + c * stride_xc
    if STRIDE == 1:
        v = tl.load(x_base + o, mask=mask & byp_b, other=0.0).to(ACC_DTYPE)
    else:
        oh = o // WO
        ow = o - oh * WO
        v, k = _max_pool_2x2(x_base + 2 * oh * stride_xh + 2 * ow, stride_xh, mask & byp_b, ACC_DTYPE)
    yv = tl.load(y_ptr + b * stride_yb + j * stride_yc + o, mask=mask & sel_b, other=0.0).to(ACC_DTYPE)
    res = tl.where(sel_b, yv, v * scale)
    if HAS_BETA:
        res = res * tl.load(beta_ptr).to(ACC_DTYPE)
    tl.store(out_ptr + b * stride_ob + c * stride_oc + o, res.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _attention_writeback_bwd_kernel(grad_ptr, x_ptr, a_ptr, inv_ptr, y_ptr, beta_ptr,
                                    dx_ptr, da_ptr, dy_ptr, part_ptr, C, H, W, HO, WO,
                                    stride_gb, stride_gc, stride_xb, stride_xc, stride_xh, stride_ab,
                                    stride_yb, stride_yc, stride_dxb, stride_dxc, stride_dxh,
                                    stride_dab, stride_dyb, stride_dyc,
                                    HAS_BETA: tl.constexpr, STRIDE: tl.constexpr,
                                    H_TAIL: tl.constexpr, W_TAIL: tl.constexpr,
                                    ACC_DTYPE: tl.constexpr, BLOCK_HW: tl.constexpr):
    """Backward, one program per ``(b, c)`` plane (``grid = (B*C,)``).

    ``grad: (B, C, H', W')``; ``x, a, inv, y, beta`` as in the forward; ``g = grad[b, c]``::

        bypass c (inv[c] < 0):  da[b, c]  = beta * sum_hw(g * m)
                                dx[b, c]  = (g * a[b, c]) * beta, routed to the first
                                            maximum of each 2x2 window (STRIDE 2; 0 elsewhere)
                                part[b*C + c] = a[b, c] * sum_hw(g * m)
        selected c = idx[j]:    dy[b, j]  = g * beta,  dx[b, c] = 0,  da[b, c] = 0
                                part[b*C + c] = sum_hw(g * y[b, j])

    ``dbeta = sum(part)`` (launcher; only with HAS_BETA). STRIDE 2 with odd H (W): the last
    row (column) of ``dx``, outside every window, is written with zeros (H_TAIL, W_TAIL).
    Every element of ``dx``, ``da``, ``dy`` is written exactly once.
    """
    pid = tl.program_id(0).to(tl.int64)
    b = pid // C
    c = pid % C
    slot = tl.load(inv_ptr + c)
    byp = slot < 0
    j = tl.maximum(slot, 0).to(tl.int64)
    scale = tl.load(a_ptr + b * stride_ab + c).to(ACC_DTYPE)
    if HAS_BETA:
        beta = tl.load(beta_ptr).to(ACC_DTYPE)
    else:
        beta = 1.0
    g_base = grad_ptr + b * stride_gb + c * stride_gc
    x_base = x_ptr + b * stride_xb + c * stride_xc
    y_base = y_ptr + b * stride_yb + j * stride_yc
    dx_base = dx_ptr + b * stride_dxb + c * stride_dxc
    dy_base = dy_ptr + b * stride_dyb + j * stride_dyc
    offs = tl.arange(0, BLOCK_HW)
    # the plane's flag as a block: the interpreter (triton 3.9) mis-types `block & scalar-bool`
    slot_b = tl.zeros([BLOCK_HW], dtype=tl.int32) + slot
    sel_b = slot_b >= 0
    byp_b = slot_b < 0
    acc_gm = tl.zeros([BLOCK_HW], dtype=ACC_DTYPE)
    acc_gy = tl.zeros([BLOCK_HW], dtype=ACC_DTYPE)
    HWO = HO * WO
    for start in range(0, HWO, BLOCK_HW):
        o = start + offs
        mask = o < HWO
        smask = mask & sel_b
        bmask = mask & byp_b
        g = tl.load(g_base + o, mask=mask, other=0.0).to(ACC_DTYPE)
        # selected channel: dy and the y part of dbeta
        yv = tl.load(y_base + o, mask=smask, other=0.0).to(ACC_DTYPE)
        acc_gy += g * yv
        tl.store(dy_base + o, (g * beta).to(dy_ptr.dtype.element_ty), mask=smask)
        # bypass channel: dx, da and the bypass part of dbeta (exact zeros on selected planes)
        dval = tl.where(bmask, (g * scale) * beta, 0.0).to(dx_ptr.dtype.element_ty)
        if STRIDE == 1:
            v = tl.load(x_base + o, mask=bmask, other=0.0).to(ACC_DTYPE)
            acc_gm += g * v
            tl.store(dx_base + o, dval, mask=mask)
        else:
            oh = o // WO
            ow = o - oh * WO
            v, k = _max_pool_2x2(x_base + 2 * oh * stride_xh + 2 * ow, stride_xh, bmask, ACC_DTYPE)
            acc_gm += g * v
            zero = tl.zeros([BLOCK_HW], dtype=dx_ptr.dtype.element_ty)
            p = dx_base + 2 * oh * stride_dxh + 2 * ow
            tl.store(p, tl.where(k == 0, dval, zero), mask=mask)
            tl.store(p + 1, tl.where(k == 1, dval, zero), mask=mask)
            tl.store(p + stride_dxh, tl.where(k == 2, dval, zero), mask=mask)
            tl.store(p + stride_dxh + 1, tl.where(k == 3, dval, zero), mask=mask)
    if STRIDE == 2:
        zero = tl.zeros([BLOCK_HW], dtype=dx_ptr.dtype.element_ty)
        if H_TAIL:      # last row, all W columns
            for start in range(0, W, BLOCK_HW):
                w = start + offs
                tl.store(dx_base + (H - 1) * stride_dxh + w, zero, mask=w < W)
        if W_TAIL:      # last column, the rows inside the windows (the corner is the row's)
            for start in range(0, 2 * HO, BLOCK_HW):
                h = start + offs
                tl.store(dx_base + h * stride_dxh + (W - 1), zero, mask=h < 2 * HO)
    s_gm = tl.sum(acc_gm, axis=0)
    da = tl.where(byp, s_gm * beta, 0.0)
    tl.store(da_ptr + b * stride_dab + c, da.to(da_ptr.dtype.element_ty))
    if HAS_BETA:
        part = tl.where(byp, s_gm * scale, tl.sum(acc_gy, axis=0))
        tl.store(part_ptr + pid, part.to(part_ptr.dtype.element_ty))


# ----------------------------------------------------------------------------- launchers

def _check(op: str, x: Tensor, a: Tensor, idx: Tensor, y: Tensor, beta: Optional[Tensor], stride: int) -> None:
    if isinstance(stride, bool) or stride not in (1, 2):
        raise ValueError(f"adarts {op}: stride must be 1 or 2, got {stride!r}")
    check_x_a_idx(op, x, a, idx)
    B, C, H, W = x.shape
    want = (B, idx.shape[0], H // stride, W // stride)
    if tuple(y.shape) != want:
        raise ValueError(f"adarts {op}: y must be (B, n, H/stride, W/stride)={want}, got {tuple(y.shape)}")
    if beta is not None and beta.numel() != 1:
        raise ValueError(f"adarts {op}: beta must be a 0-dim tensor or None, got shape {tuple(beta.shape)}")


def attention_writeback_fwd(x: Tensor, a: Tensor, idx: Tensor, y: Tensor, beta: Optional[Tensor],
                            stride: int) -> Tensor:
    """``out = beta * base`` with ``out[:, idx] = beta * y``; ``base = x * a`` (stride 1) or
    ``a * maxpool2x2(x)`` (stride 2). ``y: (B, n, H/stride, W/stride)`` -> ``out: (B, C,
    H/stride, W/stride)`` (dtype of x); ``beta=None`` means 1."""
    op = "attention_writeback_fwd"
    require(op)
    _check(op, x, a, idx, y, beta, stride)
    x, a, idx, y = x.contiguous(), a.contiguous(), idx.contiguous(), y.contiguous()
    B, C, H, W = x.shape
    HO, WO = H // stride, W // stride
    out = empty((B, C, HO, WO), x.dtype, x.device)
    if B * C * HO * WO == 0:
        return out
    inv = inverse_map(idx, C)
    has_beta = beta is not None
    beta_t = beta.contiguous() if has_beta else a          # dummy pointer, never read
    block = block_hw(HO * WO)
    grid = (B * C, triton.cdiv(HO * WO, block))
    _attention_writeback_fwd_kernel[grid](
        x, a, inv, y, beta_t, out, C, HO * WO, WO,
        x.stride(0), x.stride(1), x.stride(2), a.stride(0), y.stride(0), y.stride(1),
        out.stride(0), out.stride(1),
        HAS_BETA=has_beta, STRIDE=stride, ACC_DTYPE=acc_dtype(x.dtype), BLOCK_HW=block,
        num_warps=num_warps(block))
    return out


def attention_writeback_bwd(grad: Tensor, x: Tensor, a: Tensor, idx: Tensor, y: Tensor, beta: Optional[Tensor],
                            stride: int) -> Tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
    """Gradients w.r.t. ``x`` (dtype of x), ``a`` (of a), ``y`` (of y) and ``beta`` (of beta,
    ``None`` when ``beta`` is None); see :func:`_attention_writeback_bwd_kernel`."""
    op = "attention_writeback_bwd"
    require(op)
    _check(op, x, a, idx, y, beta, stride)
    B, C, H, W = x.shape
    HO, WO = H // stride, W // stride
    if tuple(grad.shape) != (B, C, HO, WO):
        raise ValueError(f"adarts {op}: grad must be (B, C, H/stride, W/stride)={(B, C, HO, WO)}, "
                         f"got {tuple(grad.shape)}")
    grad, x, a, idx, y = grad.contiguous(), x.contiguous(), a.contiguous(), idx.contiguous(), y.contiguous()
    n = idx.shape[0]
    dx = empty((B, C, H, W), x.dtype, x.device)
    da = empty((B, C), a.dtype, a.device)
    dy = empty((B, n, HO, WO), y.dtype, y.device)
    has_beta = beta is not None
    part = empty((B * C,), torch_acc_dtype(x.dtype), x.device) if has_beta else None
    if B * C > 0:
        inv = inverse_map(idx, C)
        block = block_hw(HO * WO)
        _attention_writeback_bwd_kernel[(B * C,)](
            grad, x, a, inv, y, beta.contiguous() if has_beta else a, dx, da, dy,
            part if has_beta else da, C, H, W, HO, WO,
            grad.stride(0), grad.stride(1), x.stride(0), x.stride(1), x.stride(2), a.stride(0),
            y.stride(0), y.stride(1), dx.stride(0), dx.stride(1), dx.stride(2), da.stride(0),
            dy.stride(0), dy.stride(1),
            HAS_BETA=has_beta, STRIDE=stride, H_TAIL=(stride == 2 and H % 2 == 1),
            W_TAIL=(stride == 2 and W % 2 == 1), ACC_DTYPE=acc_dtype(x.dtype), BLOCK_HW=block,
            num_warps=num_warps(block))
    dbeta = None
    if has_beta:
        dbeta = part.sum().reshape(beta.shape).to(beta.dtype)
    return dx, da, dy, dbeta


def compile_configs():
    """Every distinct ``(kernel, signature, constexprs, num_warps)`` the launchers above can
    launch: they run on meta tensors over every dtype, stride, with and without ``beta`` and
    plane sizes reaching every block and (stride 2) every odd H / W tail."""
    require("attention_writeback compile_configs")
    with recording_launches(globals()) as configs:
        for dtype in float_dtypes():
            for stride in (1, 2):
                for H, W in plane_sizes(stride, odd=True):
                    x, a = meta_tensor((2, 3, H, W), dtype), meta_tensor((2, 3), dtype)
                    idx = torch.arange(2, device="meta")
                    y = meta_tensor((2, 2, H // stride, W // stride), dtype)
                    grad = meta_tensor((2, 3, H // stride, W // stride), dtype)
                    for beta in (None, meta_tensor((), dtype)):
                        attention_writeback_fwd(x, a, idx, y, beta, stride)
                        attention_writeback_bwd(grad, x, a, idx, y, beta, stride)
    return configs
