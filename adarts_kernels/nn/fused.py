"""``FusedAttentionMixedOp``: the ADARTS edge on the fused ``adarts::`` ops.

A drop-in for :class:`~adarts_kernels.nn.AttentionMixedOp`: same constructor, same
``forward(x, weights, edge_weight=None)``, same ``state_dict`` keys (checkpoints move both
ways), same function. Inside:

- ``adarts::attention_score`` for the channel attention and the top-k selection;
- ``adarts::attention_gather`` for ``x_sel = (x * a)[:, idx]`` (``x * a`` is never formed);
- the convolution candidates on ``x_sel`` with one ReLU shared by all four (and by the
  FactorizedReduce of ``skip_connect`` at stride 2), keeping only ``x_sel`` and recomputing
  ReLU and depthwise outputs in backward (``nn/_units.py``); the first BN of each
  ``sep_conv`` is folded into its second half the same way;
- ``adarts::mixed_sum`` for the weighted sum with every candidate's trailing affine-free
  BatchNorm folded in (pooling recomputed in backward, ``none`` skipped);
- ``adarts::attention_writeback`` for the write-back fused with edge normalisation (the
  edge output is not kept for backward; at stride 2 no pooling indices are stored).

Saved for backward per edge, in units of ``|x_sel| = |x| / k``: ``x_sel`` (1), the BN inputs
(2 inside the sep_convs + 4 final, + 1/4 for the FactorizedReduce at stride 2), the mixed
output ``y`` (1), and ``a: (B, C)``; the edge input ``x`` is the node state, shared with the
other edges. BatchNorm running statistics are updated exactly as ``BatchNorm2d`` does.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from ..ops import attention_gather, attention_score, attention_writeback, mixed_sum
from ._units import (SharedReluConvs, batch_norm_keep_output, bn_mode, bn_relu_dw_pw, dwpw_spec,
                     update_running_stats)
from .edges import ChannelAttention, _Candidates, _check_edge_input, _check_k
from .operations import FactorizedReduce, ReLUConvBN


class FusedAttentionMixedOp(nn.Module):
    """The ADARTS edge (SPEC section 2) computed with the fused ops.

    ``x: (B, C, H, W)``, ``weights: (8,)`` (softmax of the edge's alpha row), optional
    ``edge_weight`` (0-dim, the normalised beta) -> ``(B, C, H/stride, W/stride)``.
    ``impl`` picks the backend of the fused ops (default: ``ADARTS_KERNELS_IMPL`` / auto).
    """

    #: BatchNorm statistics move only through ``update_running_stats`` (never a BN module's
    #: own forward), which a replay (``nn/recompute.py``) freezes: no buffer snapshot needed.
    stats_through_units = True

    def __init__(self, C: int, stride: int, k: int = 4, impl: Optional[str] = None):
        super().__init__()
        _check_k("FusedAttentionMixedOp", C, k)
        if stride not in (1, 2):
            raise ValueError(f"FusedAttentionMixedOp: stride must be 1 or 2, got {stride}")
        self.C, self.stride, self.k, self.impl = C, stride, k, impl
        self.attention = ChannelAttention(C)   # same parameters and keys as the reference
        self.cands = _Candidates(C // k, stride)
        self.last_idx: Optional[torch.Tensor] = None

    def forward(self, x, weights, edge_weight: Optional[torch.Tensor] = None):
        _check_edge_input("FusedAttentionMixedOp", x, weights, self.C, self.stride)
        mlp = self.attention.mlp
        # Under autocast the states may be bfloat16/float16 while weights, alpha and beta stay
        # float32: the fused ops take one dtype, the state's (a no-op in plain float32).
        dt = x.dtype
        a, idx = attention_score(x, mlp[0].weight.to(dt), mlp[2].weight.to(dt), self.C // self.k, impl=self.impl)
        self.last_idx = idx
        x_sel = attention_gather(x, a, idx, impl=self.impl)
        y = self._mixed(x_sel, weights.to(dt))
        ew = None if edge_weight is None else edge_weight.to(dt)
        return attention_writeback(x, a, idx, y, ew, self.stride, impl=self.impl)

    def _mixed(self, xs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """``sum_o weights[o] * op_o(xs)`` over the 8 candidates: ``(B, n, H/s, W/s)``."""
        ops = self.cands._ops
        s2 = self.stride == 2
        seps, dils = (ops[4].op, ops[5].op), (ops[6].op, ops[7].op)
        specs = tuple(dwpw_spec(m[1]) for m in seps + dils)
        wts = [w for m in seps + dils for w in (m[1].weight, m[2].weight)]
        if s2:
            specs = (("fr",),) + specs
            wts = [ops[3].conv_1.weight, ops[3].conv_2.weight] + wts
        first = list(SharedReluConvs.apply(xs, specs, *wts))   # [z_fr], z_sep3, z_sep5, z_dil3, z_dil5
        count = xs.shape[0] * (xs.shape[2] // self.stride) * (xs.shape[3] // self.stride)
        at = int(s2)
        for i, seq in enumerate(seps):        # second half of each sep_conv, its first BN folded in
            first[at + i], m1, v1 = bn_relu_dw_pw(first[at + i], seq[3], seq[5], seq[6])
            update_running_stats([seq[3]], m1[None], v1[None], count)       # no-op in eval mode
        bns = [ops[1][1], ops[2][1]] + ([ops[3].bn] if s2 else []) + [seps[0][7], seps[1][7], dils[0][3], dils[1][3]]
        training, _, _ = bn_mode(bns[0])
        zw, pw, iw = (weights[3:8], weights[1:3], None) if s2 else (weights[4:8], weights[1:3], weights[3])
        if training:
            y, mean, var = mixed_sum(first, xs, zw, pw, iw, self.stride, bns[0].eps, impl=self.impl)
            update_running_stats(bns, mean, var, count)
        else:
            rm = torch.stack([bn.running_mean for bn in bns])
            rv = torch.stack([bn.running_var for bn in bns])
            y, _, _ = mixed_sum(first, xs, zw, pw, iw, self.stride, bns[0].eps, rm, rv, impl=self.impl)
        return y

    def extra_repr(self) -> str:
        return f"C={self.C}, stride={self.stride}, k={self.k}, impl={self.impl}"


def _bn(z: torch.Tensor, bn: nn.BatchNorm2d) -> torch.Tensor:
    return bn(z) if bn.affine else batch_norm_keep_output(z, bn)


class FusedReLUConvBN(ReLUConvBN):
    """:class:`~adarts_kernels.nn.operations.ReLUConvBN` (same parameters, keys and function)
    that keeps for backward only its input and, when the BN is affine-free, the BN output
    (the cell state, which the edges keep anyway): ReLU output and BN input are not kept."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv, bn = self.op[1], self.op[2]
        (z,) = SharedReluConvs.apply(x, (("conv", conv.stride[0], conv.padding[0]),), conv.weight)
        return _bn(z, bn)


class FusedFactorizedReduce(FactorizedReduce):
    """:class:`~adarts_kernels.nn.operations.FactorizedReduce` (same parameters, keys and
    function) that keeps only its input and (affine-free BN) its output, as :class:`FusedReLUConvBN`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % 2 or x.shape[-2] % 2:
            raise ValueError(f"FactorizedReduce needs even H and W, got input of shape {tuple(x.shape)}")
        (z,) = SharedReluConvs.apply(x, (("fr",),), self.conv_1.weight, self.conv_2.weight)
        return _bn(z, self.bn)
