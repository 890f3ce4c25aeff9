"""The three supernet edges: DARTS ``MixedOp``, PC-DARTS ``PartialMixedOp`` and the
ADARTS reference ``AttentionMixedOp`` (docs/method.md sections 2 and 5).

All three share one call signature, ``edge(x, weights, edge_weight=None)``:

- ``x``: ``(B, C, H, W)``, the edge input;
- ``weights``: ``(8,)``, the softmax of this edge's row of alpha, in ``PRIMITIVES`` order;
- ``edge_weight``: optional 0-dim tensor, the edge's normalised beta; when given, the
  edge returns ``edge_weight * out`` (edge normalisation, docs/method.md section 2, step 8).

The output is ``(B, C, H, W)`` at stride 1 and ``(B, C, H/2, W/2)`` at stride 2.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .operations import PRIMITIVES, make_search_op
from .selection import ChannelSelectingEdge, ChannelSelector, select_channels


def check_edge_input(name: str, x: torch.Tensor, weights: torch.Tensor, C: int, stride: int,
                     n_ops: int = len(PRIMITIVES)) -> None:
    """Shape, dtype and device checks of an edge's ``x: (B, C, H, W)`` and ``weights: (n_ops,)``,
    raising with the edge's ``name``. Shape-only: no device data is read (no host synchronisation)."""
    if x.dim() != 4:
        raise ValueError(f"{name}: expected x of shape (B, C, H, W), got a {x.dim()}-d tensor of shape {tuple(x.shape)}")
    if x.shape[1] != C:
        raise ValueError(f"{name}: built for C={C} channels, got x with {x.shape[1]} channels (shape {tuple(x.shape)})")
    if stride == 2 and (x.shape[2] % 2 or x.shape[3] % 2):
        raise ValueError(f"{name}: a stride-2 edge needs even H and W, got {tuple(x.shape)}")
    if weights.shape != (n_ops,):
        raise ValueError(f"{name}: weights must have shape ({n_ops},), one per candidate, "
                         f"got {tuple(weights.shape)}")
    if weights.device != x.device:
        raise ValueError(f"{name}: weights on {weights.device} but x on {x.device}")
    if not x.is_floating_point():
        raise TypeError(f"{name}: x must be a floating-point tensor, got {x.dtype}")


def check_k(name: str, C: int, k: int) -> None:
    """``k`` a positive integer dividing ``C`` (the 1/k partial channel connection)."""
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"{name}: k must be a positive integer, got {k!r}")
    if C % k != 0:
        raise ValueError(f"{name}: C={C} channels are not divisible by k={k}")


class Candidates(nn.Module):
    """The search candidates for ``C`` channels (``PRIMITIVES`` by default: the column order
    of alpha) and their weighted sum. Keys ``_ops.<i>.*``, ``i`` the candidate's column."""

    def __init__(self, C: int, stride: int, primitives: Sequence[str] = PRIMITIVES):
        super().__init__()
        self.primitives = tuple(primitives)
        self._ops = nn.ModuleList(make_search_op(p, C, stride) for p in self.primitives)

    def mixed(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """``sum_o weights[o] * op_o(x)``, the DARTS mixed operation."""
        return sum(w * op(x) for w, op in zip(weights, self._ops))


class MixedOp(Candidates):
    """DARTS edge: every candidate on all ``C`` channels."""

    def __init__(self, C: int, stride: int, primitives: Sequence[str] = PRIMITIVES):
        super().__init__(C, stride, primitives)
        self.C, self.stride = C, stride

    def forward(self, x, weights, edge_weight: Optional[torch.Tensor] = None):
        check_edge_input("MixedOp", x, weights, self.C, self.stride, len(self.primitives))
        out = self.mixed(x, weights)
        return out if edge_weight is None else edge_weight * out


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """``(B, C, H, W)``: view as ``(B, groups, C/groups, H, W)``, swap the two channel axes."""
    b, c, h, w = x.shape
    x = x.view(b, groups, c // groups, h, w).transpose(1, 2).contiguous()
    return x.view(b, c, h, w)


class PartialMixedOp(nn.Module):
    """PC-DARTS edge: the first ``C/k`` channels through the candidates, the rest bypass
    (max-pooled 2x2 at stride 2); concat, then channel shuffle with ``k`` groups."""

    def __init__(self, C: int, stride: int, k: int = 4, primitives: Sequence[str] = PRIMITIVES):
        super().__init__()
        check_k("PartialMixedOp", C, k)
        self.C, self.stride, self.k = C, stride, k
        self.mp = nn.MaxPool2d(2, 2)
        self.cands = Candidates(C // k, stride, primitives)

    def forward(self, x, weights, edge_weight: Optional[torch.Tensor] = None):
        check_edge_input("PartialMixedOp", x, weights, self.C, self.stride, len(self.cands.primitives))
        c_sel = self.C // self.k
        xtemp, xtemp2 = x[:, :c_sel], x[:, c_sel:]
        temp1 = self.cands.mixed(xtemp, weights)
        bypass = xtemp2 if self.stride == 1 else self.mp(xtemp2)
        out = channel_shuffle(torch.cat([temp1, bypass], dim=1), self.k)
        return out if edge_weight is None else edge_weight * out


class ChannelAttention(nn.Module):
    """CBAM channel attention: ``a = sigmoid(MLP(avgpool(x)) + MLP(maxpool(x)))``.

    ``x: (B, C, H, W) -> a: (B, C)``; the shared MLP is Conv1x1(C -> C/2, no bias), ReLU,
    Conv1x1(C/2 -> C, no bias). Its weights are ordinary network weights.
    """

    def __init__(self, C: int):
        super().__init__()
        if C < 2:
            raise ValueError(f"ChannelAttention needs C >= 2 channels, got {C}")
        self.mlp = nn.Sequential(
            nn.Conv2d(C, C // 2, 1, bias=False),
            nn.ReLU(inplace=False),
            nn.Conv2d(C // 2, C, 1, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        avg = F.adaptive_avg_pool2d(x, 1)
        mx = F.adaptive_max_pool2d(x, 1)
        return torch.sigmoid(self.mlp(avg) + self.mlp(mx)).flatten(1)


class AttentionMixedOp(ChannelSelectingEdge):
    """The reference ADARTS edge (docs/method.md section 2), plain PyTorch.

    ``x: (B, C, H, W)``, ``weights: (8,)``, optional ``edge_weight`` (0-dim).

    1. ``a = ChannelAttention(x)``: ``(B, C)``;  2. ``xa = x * a``;
    3. ``s = a.sum(0)``: ``(C,)``;  4. ``idx = topk(s, C/k)``, ties to the lower index;
    5. ``x_sel = xa[:, idx]``: ``(B, C/k, H, W)``;
    6. ``y = sum_o weights[o] * op_o(x_sel)`` (candidates built for ``C/k`` channels);
    7. ``out = xa`` (stride 1) or ``maxpool2x2(xa)`` (stride 2), then ``out[:, idx] = y``;
    8. returns ``edge_weight * out`` when ``edge_weight`` is given, else ``out``.

    The selection is recomputed at every forward, in train and eval mode, and stays on
    the device. ``last_idx`` holds the indices of the latest forward (for inspection).

    ``selector`` (:mod:`~adarts_kernels.nn.selection`): ``None`` for step 4 as written, or a
    callable ``selector(score, n) -> idx`` called once per forward on ``score =
    a.detach().sum(0)`` (accumulation dtype), ``n = C/k``; its ``idx`` replaces step 4.
    ``forward(..., idx=idx)`` uses the given channels and selects none (a re-run).
    """

    def __init__(self, C: int, stride: int, k: int = 4, primitives: Sequence[str] = PRIMITIVES,
                 selector: Optional[ChannelSelector] = None):
        super().__init__()
        check_k("AttentionMixedOp", C, k)
        if stride not in (1, 2):
            raise ValueError(f"AttentionMixedOp: stride must be 1 or 2, got {stride}")
        self.C, self.stride, self.k = C, stride, k
        self.attention = ChannelAttention(C)
        self.cands = Candidates(C // k, stride, primitives)
        self.selector = selector
        self.last_idx: Optional[torch.Tensor] = None

    def forward(self, x, weights, edge_weight: Optional[torch.Tensor] = None, *,
                idx: Optional[torch.Tensor] = None):
        check_edge_input("AttentionMixedOp", x, weights, self.C, self.stride, len(self.cands.primitives))
        a = self.attention(x)                                   # (B, C)
        xa = x * a[:, :, None, None]                            # (B, C, H, W)
        n = self.C // self.k
        idx = self._choose(a, n, idx, lambda: select_channels(a.detach().sum(dim=0), n))  # (C/k,)
        x_sel = xa.index_select(1, idx)                         # (B, C/k, H, W)
        y = self.cands.mixed(x_sel, weights)                    # (B, C/k, H', W')
        base = xa if self.stride == 1 else F.max_pool2d(xa, 2, 2)
        out = base.index_copy(1, idx, y)
        return out if edge_weight is None else edge_weight * out

    def extra_repr(self) -> str:
        return f"C={self.C}, stride={self.stride}, k={self.k}"
