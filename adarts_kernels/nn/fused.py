"""``FusedAttentionMixedOp``: the ADARTS edge on the fused ``adarts::`` ops.

A drop-in for :class:`~adarts_kernels.nn.AttentionMixedOp`: same constructor, same
``forward(x, weights, edge_weight=None)``, same ``state_dict`` keys (checkpoints move both
ways), same function. Inside:

- ``adarts::attention_score`` for the channel attention and the top-k selection;
- ``adarts::attention_gather`` for ``x_sel = (x * a)[:, idx]`` (``x * a`` is never formed);
- the candidate operations on ``x_sel``, as in the reference (plain PyTorch);
- ``adarts::attention_writeback`` for the write-back fused with edge normalisation (the
  edge output is not kept for backward; at stride 2 no pooling indices are stored).

Not yet fused: the candidates' shared ReLU, their BatchNorms and the weighted sum.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from ..ops import attention_gather, attention_score, attention_writeback
from .edges import ChannelAttention, _Candidates, _check_edge_input, _check_k


class FusedAttentionMixedOp(nn.Module):
    """The ADARTS edge (SPEC section 2) computed with the fused ops.

    ``x: (B, C, H, W)``, ``weights: (8,)`` (softmax of the edge's alpha row), optional
    ``edge_weight`` (0-dim, the normalised beta) -> ``(B, C, H/stride, W/stride)``.
    ``impl`` picks the backend of the fused ops (default: ``ADARTS_KERNELS_IMPL`` / auto).
    """

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
        a, idx = attention_score(x, mlp[0].weight, mlp[2].weight, self.C // self.k, impl=self.impl)
        self.last_idx = idx
        x_sel = attention_gather(x, a, idx, impl=self.impl)
        y = self.cands.mixed(x_sel, weights)
        return attention_writeback(x, a, idx, y, edge_weight, self.stride, impl=self.impl)

    def extra_repr(self) -> str:
        return f"C={self.C}, stride={self.stride}, k={self.k}, impl={self.impl}"
