"""Triton kernels of ``attention_score``: CBAM channel attention and top-k selection.

Only the bandwidth-bound parts run as kernels: the one-pass global average + max (+ first
argmax) pooling of ``x: (B, C, H, W)`` and, in the backward, the write of ``dx``. The tiny
MLP on ``(B, C)`` (two matmuls), the sigmoid, the top-k (a stable descending sort of the
batch-summed scores: equal scores -> lower channel index) and the MLP backward are
``O(B * C * C/2)`` torch ops in the launchers, exactly as in the reference.

(The kernel modules deliberately avoid ``from __future__ import annotations``: the
``tl.constexpr`` annotations stay objects, as every Triton version expects.)
"""
import operator
from typing import Tuple

import torch

from ..ops.reference import attention_mlp_bwd, attention_mlp_fwd
from ..ops.reference import acc_dtype as torch_acc_dtype
from ._common import (acc_dtype, block_hw, empty, float_dtypes, import_triton, meta_tensor, num_warps,
                      plane_sizes, recording_launches, require)

triton, tl, _ = import_triton()

Tensor = torch.Tensor

INT32_MAX = 2 ** 31 - 1


@triton.jit
def _attention_score_fwd_kernel(x_ptr, avg_ptr, mx_ptr, arg_ptr, C, HW, stride_xb, stride_xc,
                                ACC_DTYPE: tl.constexpr, BLOCK_HW: tl.constexpr):
    """Global pools of one ``(b, c)`` plane, one program per plane (``grid = (B*C,)``).

    ``x: (B, C, H, W)`` (each plane contiguous over ``H*W``) ->
    ``avg[b*C + c] = sum_hw x[b, c] / (H*W)``, ``mx[b*C + c] = max_hw x[b, c]`` (ACC_DTYPE),
    ``arg[b*C + c]`` (int32) = lowest flat ``h*W + w`` among equal maxima. A NaN in the plane
    propagates: ``mx = NaN`` and ``arg`` = position of the first NaN (as ``torch.max``).

    The plane is read once in BLOCK_HW chunks; each lane keeps a running sum, maximum, first
    argmax (strict ``>`` keeps the earlier position) and first NaN position, reduced once
    at the end.
    """
    pid = tl.program_id(0).to(tl.int64)
    b = pid // C
    c = pid % C
    x_base = x_ptr + b * stride_xb + c * stride_xc
    offs = tl.arange(0, BLOCK_HW)
    lane_sum = tl.zeros([BLOCK_HW], dtype=ACC_DTYPE)
    lane_max = tl.full([BLOCK_HW], float("-inf"), ACC_DTYPE)
    lane_arg = offs                                   # all -inf plane -> position 0
    lane_nan = tl.zeros([BLOCK_HW], dtype=tl.int32) + HW   # HW = "no NaN seen"
    for start in range(0, HW, BLOCK_HW):
        hw = start + offs
        mask = hw < HW
        v = tl.load(x_base + hw, mask=mask, other=0.0).to(ACC_DTYPE)
        lane_sum += v
        lane_nan = tl.minimum(lane_nan, tl.where(v != v, hw, HW))
        better = mask & (v > lane_max)                # NaN never compares greater
        lane_max = tl.where(better, v, lane_max)
        lane_arg = tl.where(better, hw, lane_arg)
    total = tl.sum(lane_sum, axis=0)
    mx = tl.max(lane_max, axis=0)                     # lane_max holds no NaN
    arg = tl.min(tl.where(lane_max == mx, lane_arg, HW), axis=0)
    first_nan = tl.min(lane_nan, axis=0)
    has_nan = first_nan < HW
    mx = tl.where(has_nan, total, mx)                 # total is NaN whenever the plane has one
    arg = tl.where(has_nan, first_nan, arg)
    tl.store(avg_ptr + pid, total / HW)
    tl.store(mx_ptr + pid, mx)
    tl.store(arg_ptr + pid, arg)


@triton.jit
def _attention_score_bwd_kernel(dx_ptr, gavg_ptr, gmx_ptr, arg_ptr, C, HW, stride_dxb, stride_dxc,
                                ACC_DTYPE: tl.constexpr, BLOCK_HW: tl.constexpr):
    """``dx`` of the pools, one program per ``(b, c)`` plane (``grid = (B*C,)``).

    ``gavg = d_avg / (H*W)``, ``gmx = d_mx`` (``(B*C,)``, ACC_DTYPE), ``arg`` (``(B*C,)``
    int32, first maximum) -> ``dx[b, c, hw] = gavg[b*C+c] + (hw == arg[b*C+c]) * gmx[b*C+c]``,
    ``dx: (B, C, H, W)`` in the dtype of ``dx_ptr``; every element written once.
    """
    pid = tl.program_id(0).to(tl.int64)
    b = pid // C
    c = pid % C
    dx_base = dx_ptr + b * stride_dxb + c * stride_dxc
    g_avg = tl.load(gavg_ptr + pid).to(ACC_DTYPE)
    g_mx = tl.load(gmx_ptr + pid).to(ACC_DTYPE)
    arg = tl.load(arg_ptr + pid)
    offs = tl.arange(0, BLOCK_HW)
    for start in range(0, HW, BLOCK_HW):
        hw = start + offs
        val = tl.where(hw == arg, g_avg + g_mx, g_avg)
        tl.store(dx_base + hw, val.to(dx_ptr.dtype.element_ty), mask=hw < HW)


# ----------------------------------------------------------------------------- launchers

def _check_inputs(op: str, x: Tensor, w1: Tensor, w2: Tensor) -> None:
    if x.dim() != 4:
        raise ValueError(f"adarts {op}: x must be (B, C, H, W), got {tuple(x.shape)}")
    B, C, H, W = x.shape
    if H * W == 0:
        raise ValueError(f"adarts {op}: x must have H*W > 0, got {tuple(x.shape)}")
    if H * W > INT32_MAX:   # arg and the "no NaN" sentinel HW are int32 flat positions in the kernels
        raise ValueError(f"adarts {op}: planes H*W must have fewer than 2^31 elements (32-bit argmax "
                         f"positions), got x of shape {tuple(x.shape)}")
    if w1.dim() != 2 or w1.shape[1] != C:
        raise ValueError(f"adarts {op}: w1 must be (hidden, C={C}), got {tuple(w1.shape)}")
    if w2.dim() != 2 or tuple(w2.shape) != (C, w1.shape[0]):
        raise ValueError(f"adarts {op}: w2 must be (C={C}, hidden={w1.shape[0]}), got {tuple(w2.shape)}")


def _pools(x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """``avg, mx: (B, C)`` (float32, float64 for float64 x) and ``arg: (B, C)`` int32."""
    B, C, H, W = x.shape
    HW = H * W
    acc = torch_acc_dtype(x.dtype)
    avg = empty((B, C), acc, x.device)
    mx = empty((B, C), acc, x.device)
    arg = empty((B, C), torch.int32, x.device)
    if B * C == 0:
        return avg, mx, arg
    block = block_hw(HW)
    _attention_score_fwd_kernel[(B * C,)](
        x, avg, mx, arg, C, HW, x.stride(0), x.stride(1),
        ACC_DTYPE=acc_dtype(x.dtype), BLOCK_HW=block, num_warps=num_warps(block))
    return avg, mx, arg


def attention_score_fwd(x: Tensor, w1: Tensor, w2: Tensor, n_select: int) -> Tuple[Tensor, Tensor]:
    """``a = sigmoid(relu(avg @ w1.T) @ w2.T + relu(mx @ w1.T) @ w2.T)``,
    ``idx = topk(a.sum(0), n_select)``.

    ``x: (B, C, H, W)``, ``w1: (C/2, C)``, ``w2: (C, C/2)`` -> ``a: (B, C)`` (dtype of x),
    ``idx: (n_select,)`` int64. Pools by :func:`_attention_score_fwd_kernel`; MLP, sigmoid
    and the stable descending sort (ties -> lower channel) are torch ops on ``(B, C)``.
    """
    op = "attention_score_fwd"
    require(op)
    _check_inputs(op, x, w1, w2)
    C = x.shape[1]
    try:
        n_ok = not isinstance(n_select, bool) and 0 <= operator.index(n_select) <= C
    except TypeError:
        n_ok = False
    if not n_ok:
        raise ValueError(f"adarts {op}: n_select must be an int in [0, C={C}], got {n_select!r}")
    n_select = operator.index(n_select)
    x = x.contiguous()
    avg, mx, _ = _pools(x)
    a, idx = attention_mlp_fwd(avg, mx, w1, w2, n_select)
    return a.to(x.dtype), idx


def attention_score_bwd(grad_a: Tensor, x: Tensor, w1: Tensor, w2: Tensor, a: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradients of ``a`` w.r.t. ``x``, ``w1``, ``w2``; the pools are recomputed by
    :func:`_attention_score_fwd_kernel`, the MLP backward is torch ops on ``(B, C)``::

        dz = grad_a * a * (1 - a);  h_v = relu(v @ w1.T)  for v in (avg, mx)
        dw2 = dz.T @ (h_avg + h_mx);  dh_v = (dz @ w2) * (h_v > 0)
        dw1 = dh_avg.T @ avg + dh_mx.T @ mx;  d_v = dh_v @ w1

    and :func:`_attention_score_bwd_kernel` writes ``dx = d_avg / (H*W) + d_mx`` at the first
    maximum, in one pass. Returns ``dx`` (dtype of x), ``dw1`` (of w1), ``dw2`` (of w2).
    """
    op = "attention_score_bwd"
    require(op)
    _check_inputs(op, x, w1, w2)
    B, C, H, W = x.shape
    if tuple(a.shape) != (B, C) or tuple(grad_a.shape) != (B, C):
        raise ValueError(f"adarts {op}: a and grad_a must be (B, C)=({B}, {C}), "
                         f"got {tuple(a.shape)} and {tuple(grad_a.shape)}")
    x = x.contiguous()
    avg, mx, arg = _pools(x)
    dw1, dw2, d_avg, d_mx = attention_mlp_bwd(grad_a, a, avg, mx, w1, w2)
    g_avg = (d_avg / (H * W)).contiguous()
    g_mx = d_mx.contiguous()
    dx = empty((B, C, H, W), x.dtype, x.device)
    if B * C > 0:
        block = block_hw(H * W)
        _attention_score_bwd_kernel[(B * C,)](
            dx, g_avg, g_mx, arg, C, H * W, dx.stride(0), dx.stride(1),
            ACC_DTYPE=acc_dtype(x.dtype), BLOCK_HW=block, num_warps=num_warps(block))
    return dx, dw1.to(w1.dtype), dw2.to(w2.dtype)


def compile_configs():
    """Every distinct ``(kernel, signature, constexprs, num_warps)`` the launchers above can
    launch: they run on meta tensors over every dtype and plane sizes reaching every block."""
    require("attention_score compile_configs")
    with recording_launches(globals()) as configs:
        for dtype in float_dtypes():
            for H, W in plane_sizes(1):
                x = meta_tensor((2, 4, H, W), dtype)
                w1, w2 = meta_tensor((2, 4), dtype), meta_tensor((4, 2), dtype)
                a, _ = attention_score_fwd(x, w1, w2, 2)
                attention_score_bwd(meta_tensor((2, 4), dtype), x, w1, w2, a)
    return configs
