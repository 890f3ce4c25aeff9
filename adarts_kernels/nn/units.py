"""Recomputing building blocks of the fused candidates (plain PyTorch, explicit backward).

The convolution candidates are chains ``[BN] -> ReLU -> depthwise -> pointwise``. Autograd
would keep, per candidate, its own ``ReLU(x_sel)`` copy and every depthwise output
(``|x_sel|`` each). These functions keep only a chain's *input*: ``x_sel`` once for the
four convolution candidates (and the FactorizedReduce of ``skip_connect`` at stride 2),
whose ReLU is computed once and shared; the first BN's input for the second half of a
``sep_conv``. ReLU and the depthwise convolutions are recomputed in backward. Each
pointwise output is the next BatchNorm's input, which its consumer keeps.

Every unit takes an explicit ``keep`` flag: ``keep=True`` keeps the ReLU and depthwise
outputs instead of recomputing them, which is what a forward re-run inside backward
(:func:`~adarts_kernels.nn.recompute.recompute_edge`) wants: its graph lives only until its
gradients are out. Nothing here moves BatchNorm running statistics: the callers do, with
:func:`~adarts_kernels.nn.batchnorm.update_running_stats`.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .batchnorm import affine_free_backward, affine_free_stats, batchnorm_mode, channel

Tensor = torch.Tensor
_conv_bwd = torch.ops.aten.convolution_backward.default

#: A chain after the shared ReLU: ``("dwpw", stride, padding, dilation)`` (depthwise kxk then
#: pointwise 1x1; two weights), ``("fr",)`` (FactorizedReduce's two offset stride-2 1x1
#: convolutions; two weights) or ``("conv", stride, padding)`` (one dense convolution; one weight).
Spec = Tuple


def _n_weights(spec: Spec) -> int:
    return 1 if spec[0] == "conv" else 2


def _as(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t.to(dtype)``, skipping the call when it would return ``t`` itself."""
    return t if t.dtype == dtype else t.to(dtype)


def _layout(t: Tensor) -> Tensor:
    """The convolutions' operand layout. On CPU, channels_last: oneDNN's depthwise and 1x1
    convolutions with the few channels of a partial-channel edge (C/k = 4..16) are 4-20x
    faster in it than in NCHW (measured at batch 16-64, 4 channels, 32x32: depthwise 5x5
    forward 0.84 -> 0.10 ms, backward 1.83 -> 0.47 ms; 1x1 forward 0.81 -> 0.04 ms)."""
    if _channels_last_pays(t) and t.dim() == 4:
        return t.contiguous(memory_format=torch.channels_last)
    return t.contiguous()


def _channels_last_pays(t: Tensor) -> bool:
    """The one device check of :func:`_layout` (tests replace it to run the GPU layout on CPU)."""
    return t.device.type == "cpu"


#: The stride-1 depthwise input gradient is taken as a flipped forward convolution (CPU) from
#: this many values per channel (B * H * W) up: below it one convolution_backward for both
#: gradients is cheaper. Measured on CPU, one thread, 4 channels, 3x3 and 5x5 dilated kernels,
#: combined against flipped (us): B*H*W = 128: 64 / 72; 512: 68-86 / 75-88; 2048: 91-148 /
#: 89-135; 16384: 258-720 / 218-594 (2026-12-07). csrc/edge.cpp uses the same rule.
FLIP_MIN_VALUES = 2048


def _flip_pays(t: Tensor) -> bool:
    """The one device check of the flipped depthwise input gradient (oneDNN's forward beats its
    backward-data on CPU; tests replace it to run the GPU's choice on CPU)."""
    return t.device.type == "cpu"


#: On CPU, the depthwise convolutions of the chains that share one ReLU output, stride and
#: dilation run as one convolution (channel multiplier m, the smaller kernels zero-padded to
#: the largest) while that input has at most this many values (B * n * H * W). Each oneDNN
#: convolution call has a fixed host cost (40-100 us for a depthwise forward or backward),
#: which dominates small inputs; the merged call computes the zero taps too (sep_conv_3x3's
#: kernel as 5x5), which dominates large ones. Measured on CPU, one thread, sep_conv_3x3 + 5x5
#: forward and backward, separate against merged (us, 2026-12-07): 2x2x8x8: 269 / 158;
#: 8x4x8x8: 341 / 209; 8x4x16x16: 468 / 345; 32x4x8x8: 502 / 358; 16x4x16x16: 624 / 505;
#: 8x8x16x16: 494 / 535; 32x4x32x32 (forward alone): 497 / 782. On a GPU the merge is not
#: made: it trades one convolution launch for several small ones (the kernel's packing, the
#: pointwise inputs' copies). csrc/edge.cpp takes the decision as an argument.
MERGE_MAX_VALUES = 8192


def _merge_pays(t: Tensor, channels: int) -> bool:
    """Whether the depthwise convolutions of chains on a shared input of ``channels`` channels,
    with ``t``'s device, batch and plane size, run merged (:data:`MERGE_MAX_VALUES`): the one
    device check of the merge (tests replace it to run either choice anywhere)."""
    return t.device.type == "cpu" and t.shape[0] * t.shape[-2] * t.shape[-1] * channels <= MERGE_MAX_VALUES


def merge_groups(specs: Tuple[Spec, ...], ks: Tuple[int, ...], outs: Tuple[int, ...]) -> Tuple[Tuple[int, ...], ...]:
    """The chains of ``specs`` as groups that share their convolution calls, in the order of
    their first chain: ``dwpw`` chains with the same stride, dilation and pointwise output
    channels (``outs[i]``) whose square depthwise kernel (odd size ``ks[i]``; -1 for other
    chains) is centred (``2 * padding == dilation * (k - 1)``: a smaller kernel zero-padded to
    the largest computes the same sums) form one group; every other chain is a group of its
    own. csrc/edge.cpp groups by the same rule."""
    groups: List[List[int]] = []
    where = {}
    for i, (spec, k, o) in enumerate(zip(specs, ks, outs)):
        if spec[0] == "dwpw" and k % 2 == 1 and 2 * spec[2] == spec[3] * (k - 1):
            key = (spec[1], spec[3], o)
            if key in where:
                groups[where[key]].append(i)
                continue
            where[key] = len(groups)
        groups.append([i])
    return tuple(tuple(g) for g in groups)


def _groups(specs: Tuple[Spec, ...], ws: Sequence[Tensor], r: Tensor) -> Tuple[Tuple[int, ...], ...]:
    """:func:`merge_groups` of the chains on ``r`` when merging pays (:func:`_merge_pays`), else
    one group per chain."""
    if not _merge_pays(r, r.shape[1]):
        return tuple((i,) for i in range(len(specs)))
    ks, outs, at = [], [], 0
    for spec in specs:
        w = ws[at]
        dwpw = spec[0] == "dwpw" and w.shape[-1] == w.shape[-2]
        ks.append(w.shape[-1] if dwpw else -1)
        outs.append(ws[at + 1].shape[0] if dwpw else -1)
        at += _n_weights(spec)
    return merge_groups(tuple(specs), tuple(ks), tuple(outs))


def _packed_kernel(w0s: Sequence[Tensor], side_by_side: bool = False) -> Tuple[Tensor, int]:
    """Depthwise kernels ``(n, 1, k_j, k_j)``, zero-padded to the largest size ``K``, as one
    ``(n * m, 1, K, K)`` kernel: ``(kernel, K)``. For one shared input (``groups=n``, channel
    multiplier ``m``) output channel ``g * m + j`` is chain ``j``'s channel ``g``; for inputs
    ``side_by_side`` (``groups = m * n``) chain ``j``'s channels are ``j*n:(j+1)*n``."""
    n, m = w0s[0].shape[0], len(w0s)
    K = max(w.shape[-1] for w in w0s)
    wk = w0s[0].new_zeros((m, n, K, K) if side_by_side else (n, m, K, K))
    for j, w in enumerate(w0s):
        o, k = (K - w.shape[-1]) // 2, w.shape[-1]
        (wk[j] if side_by_side else wk[:, j])[:, o:o + k, o:o + k].copy_(w[:, 0])
    return wk.reshape(n * m, 1, K, K), K


def _part(t: Tensor, j: int, m: int, side_by_side: bool) -> Tensor:
    """Chain ``j``'s channels of a merged group's depthwise output (or its gradient) ``t``:
    ``j::m`` (one input, channel multiplier ``m``) or the ``j``-th of ``m`` blocks (inputs side by side)."""
    if side_by_side:
        n = t.shape[1] // m
        return t[:, j * n:(j + 1) * n]
    return t[:, j::m]


def _group_fwd(r: Tensor, s: int, d: int, pairs: Sequence[Tuple[Tensor, Tensor]], side_by_side: bool = False
               ) -> Tuple[List[Tensor], Tensor]:
    """``(zs, t)``: a merged group's chain outputs and its merged depthwise output ``t`` (chain
    ``j``'s channels: :func:`_part`): one depthwise convolution (``groups`` = the input's channels:
    ``n`` for one shared input, ``m * n`` for inputs side by side), then each chain's pointwise one."""
    m = len(pairs)
    wd, K = _packed_kernel([w0 for w0, _ in pairs], side_by_side)
    t = F.conv2d(r, wd, None, s, d * (K - 1) // 2, d, r.shape[1])
    return [F.conv2d(_layout(_part(t, j, m, side_by_side)), w1) for j, (_, w1) in enumerate(pairs)], t


def _group_bwd(gzs: Sequence[Optional[Tensor]], r: Tensor, s: int, d: int, pairs: Sequence[Tuple[Tensor, Tensor]],
               t: Optional[Tensor] = None, side_by_side: bool = False
               ) -> Tuple[Tensor, List[Optional[Tensor]], List[Optional[Tensor]]]:
    """``(dr, dw0s, dw1s)`` of :func:`_group_fwd` (a chain without gradient: ``None`` in ``gzs``,
    zeros for it, ``None`` weight gradients); ``t`` recomputed unless given."""
    m, n = len(pairs), r.shape[1]
    wd, K = _packed_kernel([w0 for w0, _ in pairs], side_by_side)
    P = d * (K - 1) // 2
    if t is None:
        t = F.conv2d(r, wd, None, s, P, d, n)
    dt = torch.empty_like(t)
    dw1s: List[Optional[Tensor]] = []
    for j, (gz, (_, w1)) in enumerate(zip(gzs, pairs)):
        if gz is None:
            _part(dt, j, m, side_by_side).zero_()
            dw1s.append(None)
            continue
        dtj, dw1, _ = _conv_bwd(gz, _layout(_part(t, j, m, side_by_side)), w1, None, [1, 1], [0, 0], [1, 1], False,
                                [0, 0], 1, [True, True, False])
        _part(dt, j, m, side_by_side).copy_(dtj)
        dw1s.append(dw1)
    del t
    dr, dwd, _ = _conv_bwd(dt, r, wd, None, [s, s], [P, P], [d, d], False, [0, 0], n, [True, True, False])
    # chain j's kernel gradient at [j] of (m, n, K, K)
    dwd = dwd.reshape(m, n // m, K, K) if side_by_side else dwd.reshape(n, m, K, K).transpose(0, 1)
    dw0s: List[Optional[Tensor]] = []
    for j, (w0, _) in enumerate(pairs):
        o, k = (K - w0.shape[-1]) // 2, w0.shape[-1]
        dw0s.append(None if gzs[j] is None else dwd[j, :, o:o + k, o:o + k].unsqueeze(1))
    return dr, dw0s, dw1s


def _chain_fwd(r: Tensor, spec: Spec, w0: Tensor, w1: Optional[Tensor] = None
               ) -> Tuple[Tensor, Optional[Tensor]]:
    """``(z, t)``: the chain's output and its depthwise output (``None`` for other chains)."""
    if spec[0] == "conv":
        return F.conv2d(r, w0, None, spec[1], spec[2]), None
    if spec[0] == "fr":
        # 1x1 stride-2 convolutions = channel mixing of the even / odd subsampled grids, as
        # matrix products (oneDNN's channels_last strided 1x1 backward corrupted the heap on
        # CPU, torch 2.13, and its NCHW path is slow with few channels)
        return torch.cat([torch.einsum("oc,bchw->bohw", w0[:, :, 0, 0], r[:, :, ::2, ::2]),
                          torch.einsum("oc,bchw->bohw", w1[:, :, 0, 0], r[:, :, 1::2, 1::2])], dim=1), None
    _, s, p, d = spec
    t = F.conv2d(r, w0, None, s, p, d, r.shape[1])
    return F.conv2d(t, w1), t


def _chain_bwd(gz: Tensor, r: Tensor, spec: Spec, w0: Tensor, w1: Optional[Tensor] = None,
               t: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """``(dr, dw0, dw1)``; the depthwise output ``t`` is recomputed here (and dropped) unless given."""
    if spec[0] == "conv":
        _, s, p = spec
        dr, dw0, _ = _conv_bwd(gz, r, w0, None, [s, s], [p, p], [1, 1], False, [0, 0], 1, [True, True, False])
        return dr, dw0, None
    if spec[0] == "fr":
        half = w0.shape[0]
        g0, g1 = gz[:, :half], gz[:, half:]
        r0, r1 = r[:, :, ::2, ::2], r[:, :, 1::2, 1::2]
        dw0 = torch.einsum("bohw,bchw->oc", g0, r0)[:, :, None, None]
        dw1 = torch.einsum("bohw,bchw->oc", g1, r1)[:, :, None, None]
        dr = torch.zeros_like(r)
        dr[:, :, ::2, ::2] = torch.einsum("bohw,oc->bchw", g0, w0[:, :, 0, 0])
        dr[:, :, 1::2, 1::2] = torch.einsum("bohw,oc->bchw", g1, w1[:, :, 0, 0])
        return dr, dw0, dw1
    _, s, p, d = spec
    n = r.shape[1]
    if t is None:
        t = F.conv2d(r, w0, None, s, p, d, n)
    dt, dw1, _ = _conv_bwd(gz, t, w1, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1, [True, True, False])
    del t
    k = w0.shape[-1]
    if s == 1 and 2 * p == d * (k - 1) and _flip_pays(r) and r.numel() >= FLIP_MIN_VALUES * n:
        # a "same" stride-1 depthwise convolution's input gradient is the same convolution
        # with the kernel flipped: oneDNN's forward is ~2x faster than its backward-data
        # (measured, 16x4x32x32, 5x5: 0.10 vs 0.19 ms); below FLIP_MIN_VALUES values per
        # channel the one combined call is cheaper
        dr = F.conv2d(dt, w0.flip(2, 3), None, 1, p, d, n)
        _, dw0, _ = _conv_bwd(dt, r, w0, None, [1, 1], [p, p], [d, d], False, [0, 0], n, [False, True, False])
    else:
        dr, dw0, _ = _conv_bwd(dt, r, w0, None, [s, s], [p, p], [d, d], False, [0, 0], n, [True, True, False])
    return dr, dw0, dw1


def grad_like(g: Tensor, w: Tensor) -> Tensor:
    """``g``, the gradient of parameter ``w``, in ``w``'s dtype and strides. A convolution
    backward in channels_last gives e.g. ``(n, 1, k, k)`` gradients with strides that differ
    from the weight's only along the size-1 axis: those are re-strided without a copy, so
    data parallelism (whose gradient buckets mirror the parameters' strides) takes them
    as they are; any other layout is copied."""
    g = _as(g, w.dtype)
    if g.stride() == w.stride():
        return g
    if g.is_contiguous() and w.is_contiguous():
        return g.as_strided(w.shape, w.stride())      # same storage offset
    return torch.empty_like(w).copy_(g)


def relu_convs_fwd(u: Tensor, specs: Tuple[Spec, ...], weights: Sequence[Tensor], keep: bool
                   ) -> Tuple[List[Tensor], Optional[Tensor], List[Optional[Tensor]]]:
    """The computation of :class:`SharedReluConvs` without autograd: ``(zs, r, ts)``, ``r`` the
    shared ReLU output and ``ts`` the depthwise outputs when ``keep`` (else ``None`` and ``[]``)."""
    r = _layout(F.relu(u))
    ws = [_as(w, u.dtype) for w in weights]
    at = _offsets(specs)
    zs: List[Optional[Tensor]] = [None] * len(specs)
    ts: List[Optional[Tensor]] = [None] * len(specs)
    for g in _groups(specs, ws, r):
        if len(g) == 1:
            i, = g
            zs[i], ts[i] = _chain_fwd(r, specs[i], *ws[at[i]:at[i] + _n_weights(specs[i])])
        else:   # one depthwise convolution for the group; each chain keeps the merged output
            group_zs, t = _group_fwd(r, specs[g[0]][1], specs[g[0]][3], [(ws[at[i]], ws[at[i] + 1]) for i in g])
            for i, z in zip(g, group_zs):
                zs[i], ts[i] = z, t
    return (zs, r, ts) if keep else (zs, None, [])


def _offsets(specs: Tuple[Spec, ...]) -> List[int]:
    """Each chain's first weight in the flat weight list."""
    at, out = 0, []
    for spec in specs:
        out.append(at)
        at += _n_weights(spec)
    return out


def relu_convs_bwd(gzs: Sequence[Optional[Tensor]], u: Tensor, specs: Tuple[Spec, ...], weights: Sequence[Tensor],
                   r: Optional[Tensor] = None, ts: Sequence[Optional[Tensor]] = ()
                   ) -> Tuple[Optional[Tensor], List[Optional[Tensor]]]:
    """``(du, weight gradients)`` of :class:`SharedReluConvs`; ``r`` and ``ts`` as
    :func:`relu_convs_fwd` kept them, or recomputed here when not given."""
    ws = [_as(w, u.dtype) for w in weights]
    if r is None:
        r, ts = _layout(F.relu(u)), [None] * len(specs)
    dr = None
    grads: List[Optional[Tensor]] = [None] * len(weights)
    at = _offsets(specs)
    for g in _groups(specs, ws, r):
        if all(gzs[i] is None for i in g):
            continue
        if len(g) == 1:
            i, = g
            nw = _n_weights(specs[i])
            pair = list(ws[at[i]:at[i] + nw]) + [None] * (2 - nw)
            d, dw0, dw1 = _chain_bwd(_layout(_as(gzs[i], u.dtype)), r, specs[i], *pair, t=ts[i])
            grads[at[i]:at[i] + nw] = [grad_like(gr, w) for gr, w in zip((dw0, dw1)[:nw], weights[at[i]:at[i] + nw])]
        else:
            d, dw0s, dw1s = _group_bwd([None if gzs[i] is None else _layout(_as(gzs[i], u.dtype)) for i in g], r,
                                       specs[g[0]][1], specs[g[0]][3], [(ws[at[i]], ws[at[i] + 1]) for i in g],
                                       t=ts[g[0]])
            for i, dw0, dw1 in zip(g, dw0s, dw1s):
                if dw0 is not None:
                    grads[at[i]] = grad_like(dw0, weights[at[i]])
                    grads[at[i] + 1] = grad_like(dw1, weights[at[i] + 1])
        dr = d if dr is None else dr + d
    du = None if dr is None else dr * (u > 0)
    return du, grads


class SharedReluConvs(torch.autograd.Function):
    """``r = relu(u)`` once, then every chain of ``specs`` on ``r``: returns one ``z`` per chain.

    ``u: (B, n, H, W)``; ``weights``, in chain order: ``dwpw``: depthwise ``(n, 1, k, k)``
    and pointwise ``(n_out, n, 1, 1)``; ``fr``: two ``(n_out/2, n, 1, 1)``; ``conv``: one
    ``(n_out, n, k, k)``. Saved: ``u`` and the weights only; backward recomputes ``r`` once
    and each depthwise output in turn. With ``keep=True`` (a re-run inside backward) ``r``
    and the depthwise outputs are kept instead.
    """

    @staticmethod
    def forward(ctx, u: Tensor, specs: Tuple[Spec, ...], keep: bool, *weights: Tensor):
        zs, r, ts = relu_convs_fwd(u, specs, weights, keep)
        ctx.keep = keep
        if keep:
            ctx.save_for_backward(u, *weights, r, *ts)
        else:
            ctx.save_for_backward(u, *weights)
        ctx.specs = specs
        return tuple(zs)

    @staticmethod
    def backward(ctx, *gzs: Tensor):
        saved = ctx.saved_tensors
        u = saved[0]
        nw_all = sum(_n_weights(sp) for sp in ctx.specs)
        weights = saved[1:1 + nw_all]
        r, ts = (saved[1 + nw_all], saved[2 + nw_all:]) if ctx.keep else (None, ())
        du, grads = relu_convs_bwd(gzs, u, ctx.specs, weights, r, ts)
        return (du, None, None, *grads)


def bn_relu_dw_pw_fwd(u: Tensor, w_dw: Tensor, w_pw: Tensor, stride: int, padding: int, dilation: int,
                      training: bool, run_mean: Optional[Tensor], run_var: Optional[Tensor], eps: float,
                      keep: bool):
    """The computation of :class:`BnReluDwPw` without autograd: ``(z, mean, var, rstd, kept)``,
    ``kept = (h, t)`` (the normalised ReLU output and the depthwise output) when ``keep``, else ``()``."""
    mean, var, rstd = affine_free_stats(u, training, run_mean, run_var, eps)
    h = _layout(F.relu(((u.to(rstd.dtype) - channel(mean)) * channel(rstd)).to(u.dtype)))
    z, t = _chain_fwd(h, ("dwpw", stride, padding, dilation), _as(w_dw, u.dtype), _as(w_pw, u.dtype))
    return z, mean, var, rstd, ((h, t) if keep else ())


def bn_relu_dw_pw_bwd(gz: Tensor, u: Tensor, w_dw: Tensor, w_pw: Tensor, mean: Tensor, rstd: Tensor,
                      stride: int, padding: int, dilation: int, training: bool, kept=()):
    """``(du, dw_dw, dw_pw)`` of :class:`BnReluDwPw` (``kept`` as :func:`bn_relu_dw_pw_fwd` gave it)."""
    uh = (u.to(rstd.dtype) - channel(mean)) * channel(rstd)
    h, t = kept if kept else (_layout(F.relu(uh).to(u.dtype)), None)
    dh, dwd, dwp = _chain_bwd(_layout(_as(gz, u.dtype)), h, ("dwpw", stride, padding, dilation),
                              _as(w_dw, u.dtype), _as(w_pw, u.dtype), t=t)
    du = affine_free_backward(dh.to(rstd.dtype) * (uh > 0), uh, rstd, training).to(u.dtype)
    return du, grad_like(dwd, w_dw), grad_like(dwp, w_pw)


class BnReluDwPw(torch.autograd.Function):
    """``z = pw(dw(relu(BN(u))))`` with an affine-free BN: the second half of a ``sep_conv``.

    ``u: (B, n, H, W)`` (the first BN's input), ``w_dw: (n, 1, k, k)``, ``w_pw: (n_out, n, 1, 1)``
    -> ``z: (B, n_out, H', W')``, ``mean, var: (n,)`` the statistics used (batch statistics in
    training, ``run_mean, run_var`` in eval; not differentiable).

    Saved: ``u``, the weights and the per-channel ``mean, rstd``. Backward recomputes
    ``relu(BN(u))`` and the depthwise output (kept instead with ``keep=True``), then the two
    convolution backwards and the BN backward (with the batch statistics' terms in training).
    """

    @staticmethod
    def forward(ctx, u, w_dw, w_pw, stride: int, padding: int, dilation: int, training: bool,
                run_mean: Optional[Tensor], run_var: Optional[Tensor], eps: float, keep: bool):
        z, mean, var, rstd, kept = bn_relu_dw_pw_fwd(u, w_dw, w_pw, stride, padding, dilation, training,
                                                     run_mean, run_var, eps, keep)
        ctx.save_for_backward(u, w_dw, w_pw, mean, rstd, *kept)
        ctx.conf = (stride, padding, dilation, training)
        ctx.mark_non_differentiable(mean, var)
        return z, mean, var

    @staticmethod
    def backward(ctx, gz, _gm, _gv):
        u, w_dw, w_pw, mean, rstd, *kept = ctx.saved_tensors
        du, dwd, dwp = bn_relu_dw_pw_bwd(gz, u, w_dw, w_pw, mean, rstd, *ctx.conf, kept=kept)
        return du, dwd, dwp, None, None, None, None, None, None, None, None


def dwpw_spec(dw: nn.Conv2d) -> Spec:
    return ("dwpw", dw.stride[0], dw.padding[0], dw.dilation[0])


def bn_relu_dw_pw(u: Tensor, bn: nn.BatchNorm2d, dw: nn.Conv2d, pw: nn.Conv2d,
                  keep: bool = False) -> Tuple[Tensor, Tensor, Tensor]:
    """:class:`BnReluDwPw` with settings read from the modules
    (:func:`~adarts_kernels.nn.batchnorm.batchnorm_mode`). Returns ``(z, mean, var)``."""
    training, rm, rv = batchnorm_mode(bn)
    return BnReluDwPw.apply(u, dw.weight, pw.weight, dw.stride[0], dw.padding[0], dw.dilation[0],
                            training, rm, rv, bn.eps, keep)


# ----------------------------------------------------------------- the sep_convs' second halves, merged
#
# An edge's sep_convs (3x3 and 5x5) continue, each from its own first BN's input, with
# BN -> ReLU -> depthwise -> pointwise. Where merging pays (the caller's :func:`_merge_pays`
# decision for the edge), the depthwise convolutions of halves with one stride, dilation and
# output width run as one call on their inputs side by side (``groups = m * n``, kernels
# zero-padded to the largest; chain ``j``'s channels at ``j*n:(j+1)*n``). ``confs[i]`` is
# ``(stride, padding, dilation, training, eps)`` of half ``i``.


def sep_settings(halves: Sequence) -> Tuple[Tuple[tuple, ...], List[Optional[Tensor]], List[Optional[Tensor]]]:
    """``(confs, run_means, run_vars)`` of sep_conv second halves for :func:`seps_fwd`, each half
    given by its modules ``bn1`` and ``dw2`` (``SepConv.layers()``): ``confs[i] = (stride, padding,
    dilation, training, eps)``, the statistics as :func:`~adarts_kernels.nn.batchnorm.batchnorm_mode`."""
    modes = [batchnorm_mode(h.bn1) for h in halves]
    confs = tuple((h.dw2.stride[0], h.dw2.padding[0], h.dw2.dilation[0], md[0], h.bn1.eps)
                  for h, md in zip(halves, modes))
    return confs, [md[1] for md in modes], [md[2] for md in modes]


def _sep_groups(us: Sequence[Tensor], w_dws: Sequence[Tensor], w_pws: Sequence[Tensor], confs: Sequence[tuple],
                merge: bool) -> Tuple[Tuple[int, ...], ...]:
    """:func:`merge_groups` of the halves (of one input shape) when ``merge``, else one each."""
    if merge and all(u.shape == us[0].shape for u in us):
        specs = tuple(("dwpw", c[0], c[1], c[2]) for c in confs)
        ks = tuple(w.shape[-1] if w.shape[-1] == w.shape[-2] else -1 for w in w_dws)
        return merge_groups(specs, ks, tuple(w.shape[0] for w in w_pws))
    return tuple((i,) for i in range(len(us)))


def seps_fwd(us: Sequence[Tensor], w_dws: Sequence[Tensor], w_pws: Sequence[Tensor], confs: Sequence[tuple],
             run_means: Sequence[Optional[Tensor]], run_vars: Sequence[Optional[Tensor]], keep: bool, merge: bool
             ) -> List[tuple]:
    """Every half's :func:`bn_relu_dw_pw_fwd` result ``(z, mean, var, rstd, kept)``, merged halves'
    depthwise convolutions in one call (their ``kept``: the inputs side by side and the merged
    depthwise output)."""
    out: List[Optional[tuple]] = [None] * len(us)
    for g in _sep_groups(us, w_dws, w_pws, confs, merge):
        if len(g) == 1:
            i, = g
            s, p, d, training, eps = confs[i]
            out[i] = bn_relu_dw_pw_fwd(us[i], w_dws[i], w_pws[i], s, p, d, training, run_means[i], run_vars[i], eps,
                                       keep)
            continue
        stats, hs = [], []
        for i in g:
            u = us[i]
            mean, var, rstd = affine_free_stats(u, confs[i][3], run_means[i], run_vars[i], confs[i][4])
            stats.append((mean, var, rstd))
            hs.append(_layout(F.relu(((u.to(rstd.dtype) - channel(mean)) * channel(rstd)).to(u.dtype))))
        dt = us[g[0]].dtype
        h = _layout(torch.cat(hs, 1))
        del hs
        s, _, d = confs[g[0]][:3]
        zs, t = _group_fwd(h, s, d, [(_as(w_dws[i], dt), _as(w_pws[i], dt)) for i in g], side_by_side=True)
        for j, i in enumerate(g):
            out[i] = (zs[j], *stats[j], ((h, t) if keep else ()))
    return out


def seps_bwd(gzs: Sequence[Tensor], us: Sequence[Tensor], w_dws: Sequence[Tensor], w_pws: Sequence[Tensor],
             means: Sequence[Tensor], rstds: Sequence[Tensor], confs: Sequence[tuple], kepts: Sequence[tuple],
             merge: bool) -> List[Tuple[Tensor, Tensor, Tensor]]:
    """Every half's ``(du, dw_dw, dw_pw)`` (:func:`bn_relu_dw_pw_bwd`), grouped as :func:`seps_fwd`."""
    out: List[Optional[tuple]] = [None] * len(us)
    for g in _sep_groups(us, w_dws, w_pws, confs, merge):
        if len(g) == 1:
            i, = g
            out[i] = bn_relu_dw_pw_bwd(gzs[i], us[i], w_dws[i], w_pws[i], means[i], rstds[i], *confs[i][:4],
                                       kept=kepts[i])
            continue
        dt = us[g[0]].dtype
        uhs = [(us[i].to(rstds[i].dtype) - channel(means[i])) * channel(rstds[i]) for i in g]
        if kepts[g[0]]:
            h, t = kepts[g[0]]
        else:
            h, t = _layout(torch.cat([_layout(F.relu(uh).to(dt)) for uh in uhs], 1)), None
        s, _, d = confs[g[0]][:3]
        dh, dw0s, dw1s = _group_bwd([_layout(_as(gzs[i], dt)) for i in g], h, s, d,
                                    [(_as(w_dws[i], dt), _as(w_pws[i], dt)) for i in g], t, side_by_side=True)
        for j, i in enumerate(g):
            uh, rstd = uhs[j], rstds[i]
            du = affine_free_backward(_part(dh, j, len(g), True).to(rstd.dtype) * (uh > 0), uh, rstd, confs[i][3])
            out[i] = (du.to(dt), grad_like(dw0s[j], w_dws[i]), grad_like(dw1s[j], w_pws[i]))
    return out


class BnReluDwPwSeps(torch.autograd.Function):
    """Every sep_conv second half of an edge (:class:`BnReluDwPw` each), merged where ``merge``
    (see :func:`seps_fwd`): ``apply(confs, merge, keep, run_means, run_vars, *us, *w_dws, *w_pws)``
    -> ``(*zs, *means, *vars)`` (statistics not differentiable). Saved: each half's input, weights
    and ``mean, rstd`` (and with ``keep`` the kept intermediates)."""

    @staticmethod
    def forward(ctx, confs: tuple, merge: bool, keep: bool, run_means, run_vars, *tensors: Tensor):
        S = len(confs)
        us, wds, wps = tensors[:S], tensors[S:2 * S], tensors[2 * S:]
        res = seps_fwd(us, wds, wps, confs, run_means, run_vars, keep, merge)
        ctx.confs, ctx.merge, ctx.n_kept = confs, merge, [len(r[4]) for r in res]
        ctx.save_for_backward(*us, *wds, *wps, *[r[1] for r in res], *[r[3] for r in res],
                              *[t for r in res for t in r[4]])
        means, variances = [r[1] for r in res], [r[2] for r in res]
        ctx.mark_non_differentiable(*means, *variances)
        return (*[r[0] for r in res], *means, *variances)

    @staticmethod
    def backward(ctx, *grads):
        S = len(ctx.confs)
        saved = ctx.saved_tensors
        us, wds, wps, means, rstds = (saved[i * S:(i + 1) * S] for i in range(5))
        kepts, at = [], 5 * S
        for nk in ctx.n_kept:
            kepts.append(tuple(saved[at:at + nk]))
            at += nk
        res = seps_bwd(grads[:S], us, wds, wps, means, rstds, ctx.confs, kepts, ctx.merge)
        return (None,) * 5 + tuple(r[0] for r in res) + tuple(r[1] for r in res) + tuple(r[2] for r in res)
