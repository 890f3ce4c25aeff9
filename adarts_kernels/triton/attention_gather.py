"""Triton kernels of ``attention_gather``: the selected channels of ``x * a``, without
forming ``x * a``.

Forward: one program per ``(b, j, HW tile)``; ``idx[j]`` is loaded from device memory by
the kernel (no host synchronisation). Backward: one program per ``(b, c)`` plane of ``x``
that writes *every* plane of ``dx`` (zeros on the channels that are not selected) and
every ``da[b, c]``, reading ``grad``/``x`` only on the selected planes (masked loads), with
the channel -> slot inverse map ``inv`` built on the device. Choice: against a
``torch.zeros`` dx plus a kernel over the selected planes, this writes each element of
``dx`` once instead of ``1 + n/C`` times, needs no second launch, and produces ``da``
whole in the same pass (no zero-fill of ``da`` either).

``idx`` values must be distinct and in ``[0, C)``: the kernels do not check them (the
``adarts::`` ops do, see ``adarts_kernels.ops._common.check_idx_values``).
"""
from typing import Tuple

import torch

from ._common import (acc_dtype, block_hw, check_x_a_idx, empty, float_dtypes, import_triton, inverse_map, meta_tensor,
                      num_warps, plane_sizes, recording_launches, require)

triton, tl, _ = import_triton()

Tensor = torch.Tensor


@triton.jit
def _attention_gather_fwd_kernel(x_ptr, a_ptr, idx_ptr, out_ptr, N_SEL, HW,
                                 stride_xb, stride_xc, stride_ab, stride_ob, stride_oc,
                                 ACC_DTYPE: tl.constexpr, BLOCK_HW: tl.constexpr):
    """``out[b, j, hw] = x[b, idx[j], hw] * a[b, idx[j]]``; ``grid = (B*n, cdiv(H*W, BLOCK_HW))``.

    ``x: (B, C, H, W)``, ``a: (B, C)``, ``idx: (n,)`` int64 -> ``out: (B, n, H, W)`` (dtype of
    ``out_ptr``); product in ACC_DTYPE. Each program reads one tile of one selected plane
    once and writes the matching tile of ``out`` once.
    """
    pid = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
    b = pid // N_SEL
    j = pid % N_SEL
    c = tl.load(idx_ptr + j).to(tl.int64)
    scale = tl.load(a_ptr + b * stride_ab + c).to(ACC_DTYPE)
    hw = tile * BLOCK_HW + tl.arange(0, BLOCK_HW)
    mask = hw < HW
    v = tl.load(x_ptr + b * stride_xb + c * stride_xc + hw, mask=mask, other=0.0).to(ACC_DTYPE)
    tl.store(out_ptr + b * stride_ob + j * stride_oc + hw,
             (v * scale).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _attention_gather_bwd_kernel(grad_ptr, x_ptr, a_ptr, inv_ptr, dx_ptr, da_ptr, C, HW,
                                 stride_gb, stride_gc, stride_xb, stride_xc, stride_ab,
                                 stride_dxb, stride_dxc, stride_dab,
                                 ACC_DTYPE: tl.constexpr, BLOCK_HW: tl.constexpr):
    """Backward of the gather; one program per ``(b, c)`` plane (``grid = (B*C,)``).

    ``grad: (B, n, H, W)``, ``x: (B, C, H, W)``, ``a: (B, C)``, ``inv: (C,)`` int32 (slot ``j``
    with ``idx[j] == c``, or -1) ->

    - selected ``c = idx[j]``: ``dx[b, c, hw] = grad[b, j, hw] * a[b, c]``,
      ``da[b, c] = sum_hw grad[b, j, hw] * x[b, c, hw]`` (ACC_DTYPE accumulation);
    - other ``c``: ``dx[b, c] = 0``, ``da[b, c] = 0`` (no loads: the masks are all false).

    Every element of ``dx: (B, C, H, W)`` and ``da: (B, C)`` is written exactly once.
    """
    pid = tl.program_id(0).to(tl.int64)
    b = pid // C
    c = pid % C
    slot = tl.load(inv_ptr + c)
    sel = slot >= 0
    j = tl.maximum(slot, 0).to(tl.int64)
    scale = tl.load(a_ptr + b * stride_ab + c).to(ACC_DTYPE)
    g_base = grad_ptr + b * stride_gb + j * stride_gc
    x_base = x_ptr + b * stride_xb + c * stride_xc
    dx_base = dx_ptr + b * stride_dxb + c * stride_dxc
    offs = tl.arange(0, BLOCK_HW)
    # the plane's flag as a block: the interpreter (triton 3.9) mis-types `block & scalar-bool`
    sel_b = (tl.zeros([BLOCK_HW], dtype=tl.int32) + slot) >= 0
    acc = tl.zeros([BLOCK_HW], dtype=ACC_DTYPE)
    for start in range(0, HW, BLOCK_HW):
        hw = start + offs
        mask = hw < HW
        lmask = mask & sel_b
        g = tl.load(g_base + hw, mask=lmask, other=0.0).to(ACC_DTYPE)
        v = tl.load(x_base + hw, mask=lmask, other=0.0).to(ACC_DTYPE)
        acc += g * v
        dx = tl.where(lmask, g * scale, 0.0)        # exact zeros even where a is inf/NaN
        tl.store(dx_base + hw, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    da = tl.where(sel, tl.sum(acc, axis=0), 0.0)
    tl.store(da_ptr + b * stride_dab + c, da.to(da_ptr.dtype.element_ty))


# ----------------------------------------------------------------------------- launchers

def attention_gather_fwd(x: Tensor, a: Tensor, idx: Tensor) -> Tensor:
    """``x_sel[b, j] = x[b, idx[j]] * a[b, idx[j]]``: ``(B, n, H, W)``, dtype of x."""
    op = "attention_gather_fwd"
    require(op)
    check_x_a_idx(op, x, a, idx)
    x, a, idx = x.contiguous(), a.contiguous(), idx.contiguous()
    B, C, H, W = x.shape
    n, HW = idx.shape[0], H * W
    out = empty((B, n, H, W), x.dtype, x.device)
    if B * n * HW == 0:
        return out
    block = block_hw(HW)
    grid = (B * n, triton.cdiv(HW, block))
    _attention_gather_fwd_kernel[grid](
        x, a, idx, out, n, HW, x.stride(0), x.stride(1), a.stride(0), out.stride(0), out.stride(1),
        ACC_DTYPE=acc_dtype(x.dtype), BLOCK_HW=block, num_warps=num_warps(block))
    return out


def attention_gather_bwd(grad: Tensor, x: Tensor, a: Tensor, idx: Tensor) -> Tuple[Tensor, Tensor]:
    """``dx[b, idx[j]] = grad[b, j] * a[b, idx[j]]`` (zero on other channels, dtype of x),
    ``da[b, idx[j]] = sum_hw grad[b, j] * x[b, idx[j]]`` (zero elsewhere, dtype of a)."""
    op = "attention_gather_bwd"
    require(op)
    check_x_a_idx(op, x, a, idx)
    B, C, H, W = x.shape
    n, HW = idx.shape[0], H * W
    if tuple(grad.shape) != (B, n, H, W):
        raise ValueError(f"adarts {op}: grad must be (B, n, H, W)=({B}, {n}, {H}, {W}), got {tuple(grad.shape)}")
    grad, x, a, idx = grad.contiguous(), x.contiguous(), a.contiguous(), idx.contiguous()
    dx = empty((B, C, H, W), x.dtype, x.device)
    da = empty((B, C), a.dtype, a.device)
    if B * C == 0:
        return dx, da
    inv = inverse_map(idx, C)
    block = block_hw(HW)
    _attention_gather_bwd_kernel[(B * C,)](
        grad, x, a, inv, dx, da, C, HW, grad.stride(0), grad.stride(1), x.stride(0), x.stride(1),
        a.stride(0), dx.stride(0), dx.stride(1), da.stride(0),
        ACC_DTYPE=acc_dtype(x.dtype), BLOCK_HW=block, num_warps=num_warps(block))
    return dx, da


def compile_configs():
    """Every distinct ``(kernel, signature, constexprs, num_warps)`` the launchers above can
    launch: they run on meta tensors over every dtype and plane sizes reaching every block."""
    require("attention_gather compile_configs")
    with recording_launches(globals()) as configs:
        for dtype in float_dtypes():
            for H, W in plane_sizes(1):
                x, a = meta_tensor((2, 3, H, W), dtype), meta_tensor((2, 3), dtype)
                idx = torch.arange(2, device="meta")
                attention_gather_fwd(x, a, idx)
                attention_gather_bwd(meta_tensor((2, 2, H, W), dtype), x, a, idx)
    return configs
