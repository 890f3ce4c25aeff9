"""The search supernet (docs/method.md sections 1, 3 and 5) for the three edge kinds.

``SearchNetwork(C=16, num_classes=10, layers=8, edge="adarts", k=4)``:
input ``(B, 3, H, W)`` (H, W divisible by 4 so that both reductions halve evenly),
output logits ``(B, num_classes)``.

``SearchNetwork(C=16, num_classes=1000, layers=8, edge=..., stem="imagenet")``: PC-DARTS's
ImageNet supernet (two stride-2 stems, 224 -> 56 -> 28, k=2 by default), input H, W
divisible by 32; everything else (cells, architecture parameters, derivation) is shared.
"""
from __future__ import annotations

import contextlib
from typing import Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import backend
from ..nn.edges import AttentionMixedOp, MixedOp, PartialMixedOp
from ..nn.fused import FusedAttentionMixedOp, FusedFactorizedReduce, FusedReLUConvBN
from ..nn.recompute import recompute_edge
from ..nn.selection import ChannelSelectingEdge, ChannelSelector, selects_channels
from ..nn.operations import PRIMITIVES, FactorizedReduce, ReLUConvBN
from .eval_model import check_imagenet_input, imagenet_stems
from .genotypes import Genotype

EDGES = ("adarts", "pcdarts", "darts")
KERNELS = ("auto", "modules", "fused")
#: the fused ops an ADARTS edge runs (each on the backend its ``impl`` resolves to)
FUSED_OPS = ("attention_score", "attention_gather", "attention_writeback", "mixed_sum")
RECOMPUTE = ("none", "edge")
#: stem -> default k: ``"cifar"`` (one stride-1 Conv3x3 + BN) or ``"imagenet"`` (PC-DARTS's
#: ImageNet search: 1/2 of the channels through the candidates)
STEMS: Dict[str, int] = {"cifar": 4, "imagenet": 2}


def resolve_kernels(edge: str, kernels: str, recompute: str = "none") -> str:
    """The kernels a supernet of ``edge`` runs on: ``"auto"`` is ``"fused"`` for the ADARTS
    edge and ``"modules"`` (the plain-PyTorch modules) for the baselines. Raises ``ValueError``
    for an unknown choice (``"reference"`` is now called ``"modules"``: "reference" names only
    the reference backend of the ops, see ``impl``), an unknown ``recompute`` or fused kernels
    asked for a baseline edge."""
    if kernels == "reference":
        raise ValueError("kernels='reference' is now called kernels='modules' (the plain-PyTorch modules); "
                         "the reference backend of the fused ops is impl='reference'")
    if kernels not in KERNELS:
        raise ValueError(f"unknown kernels {kernels!r}; expected one of {list(KERNELS)}")
    if recompute not in RECOMPUTE:
        raise ValueError(f"unknown recompute {recompute!r}; expected one of {list(RECOMPUTE)}")
    if kernels == "auto":
        return "fused" if edge == "adarts" else "modules"
    if kernels == "fused" and edge != "adarts":
        raise ValueError(f"kernels='fused' exists for the adarts edge only, got edge={edge!r}")
    return kernels


def check_impl_name(impl: Optional[str]) -> Optional[str]:
    """``impl`` lower-cased, or ``None`` (the ``ADARTS_KERNELS_IMPL`` default, read when the ops
    run); ``ValueError`` for a name that is not a backend."""
    if impl is None:
        return None
    name = str(impl).strip().lower()
    if name not in backend.IMPLS:
        raise ValueError(f"unknown backend impl={impl!r}; expected one of {list(backend.IMPLS)}")
    return name


def _make_edge(kind: str, C: int, stride: int, k: int, kernels: str = "modules",
               impl: Optional[str] = None) -> nn.Module:
    if kind == "adarts":
        return FusedAttentionMixedOp(C, stride, k, impl=impl) if kernels == "fused" else AttentionMixedOp(C, stride, k)
    if kind == "pcdarts":
        return PartialMixedOp(C, stride, k)
    return MixedOp(C, stride)


def num_edges(steps: int) -> int:
    """Edges of a cell with ``steps`` intermediate nodes: node i takes i + 2 inputs."""
    return sum(2 + i for i in range(steps))


def normalized_betas(beta: torch.Tensor, steps: int) -> torch.Tensor:
    """Edge normalisation: softmax of beta over the edges entering each node.

    ``beta: (num_edges,) -> (num_edges,)``; node i's edges are the next ``i + 2`` entries.
    """
    parts, start = [], 0
    for i in range(steps):
        n = 2 + i
        parts.append(F.softmax(beta[start:start + n], dim=-1))
        start += n
    return torch.cat(parts)


class SearchCell(nn.Module):
    """A supernet cell: 2 inputs ``(B, C_pp, H, W)``, ``(B, C_p, H, W)`` -> ``(B, 4C, H', W')``."""

    def __init__(self, steps, multiplier, C_prev_prev, C_prev, C, reduction, reduction_prev, edge, k,
                 kernels="modules", recompute="none", impl=None):
        super().__init__()
        self.reduction = reduction
        self.recompute = recompute
        fused = kernels == "fused"
        if reduction_prev:
            self.preprocess0 = (FusedFactorizedReduce if fused else FactorizedReduce)(C_prev_prev, C, affine=False)
        else:
            self.preprocess0 = (FusedReLUConvBN if fused else ReLUConvBN)(C_prev_prev, C, 1, 1, 0, affine=False)
        self.preprocess1 = (FusedReLUConvBN if fused else ReLUConvBN)(C_prev, C, 1, 1, 0, affine=False)
        self._steps = steps
        self._multiplier = multiplier
        self._ops = nn.ModuleList()
        for i in range(steps):
            for j in range(2 + i):
                stride = 2 if reduction and j < 2 else 1
                self._ops.append(_make_edge(edge, C, stride, k, kernels, impl))

    def forward(self, s0, s1, weights, edge_weights: Optional[torch.Tensor]):
        s0 = self.preprocess0(s0)
        s1 = self.preprocess1(s1)
        states = [s0, s1]
        offset = 0
        run = recompute_edge if self.recompute == "edge" else (lambda e, *a: e(*a))
        for _ in range(self._steps):
            s = sum(run(self._ops[offset + j], h, weights[offset + j],
                        None if edge_weights is None else edge_weights[offset + j])
                    for j, h in enumerate(states))
            offset += len(states)
            states.append(s)
        return torch.cat(states[-self._multiplier:], dim=1)


class SearchNetwork(nn.Module):
    """The search supernet: stem Conv3x3(3 -> stem_multiplier*C) + BN, ``layers`` cells
    (reductions at ``layers//3`` and ``2*layers//3``), global average pool, linear classifier.

    ``stem``: ``"cifar"`` (the default, the stem above) or ``"imagenet"``: PC-DARTS's ImageNet
    search supernet, whose stems (:func:`~adarts_kernels.nas.eval_model.imagenet_stems` with
    ``S = stem_multiplier * C`` channels) are ``stem0`` = Conv3x3 s2 (3 -> S//2), BN, ReLU,
    Conv3x3 s2 (S//2 -> S), BN and ``stem1`` = ReLU, Conv3x3 s2 (S -> S), BN: for C = 16,
    3 -> 24 -> 48 and 48 -> 48, 224x224 -> 56x56 (s0) -> 28x28 (s1). Cell 0 then gets the
    56x56 ``s0`` and the 28x28 ``s1``, so its preprocess0 is a FactorizedReduce; with 8 cells
    the reductions (cells 2 and 5) take 28 -> 14 -> 7. Input H and W must be divisible by 32.
    Every edge kind and kernel choice works on either stem.

    ``k``: 1/k of each edge's channels go through the candidates; ``None`` (the default):
    4 with the CIFAR stem, 2 with the ImageNet stem (PC-DARTS's ImageNet setting).

    ``edge``: ``"adarts"`` (attention-selected partial channels), ``"pcdarts"`` (first C/k
    channels + shuffle) or ``"darts"`` (all channels). ADARTS and PC-DARTS use edge
    normalisation (beta); DARTS has no beta.

    ``kernels``: ``"auto"`` (the default: fused for the ADARTS edge, the plain-PyTorch modules
    for the baselines), ``"modules"`` (plain PyTorch edges) or ``"fused"`` (the ADARTS edge as
    :class:`~adarts_kernels.nn.FusedAttentionMixedOp`: same parameters, same function, less
    memory; the cells' ReLU-Conv-BN preprocessing then keeps no ReLU output either); the fused
    kernels exist for the ADARTS edge only.

    ``impl``: the backend every fused op runs on, one of ``"auto" | "reference" | "cpp" |
    "cuda" | "triton"`` (:mod:`adarts_kernels.backend`); ``None`` (the default) reads the
    ``ADARTS_KERNELS_IMPL`` environment variable when the ops run. :meth:`backends` says what
    each op resolves to on a device. Ignored by the plain-PyTorch modules.

    ``recompute``: ``"none"`` or ``"edge"``: every edge keeps only its inputs for backward and
    is re-run there (:func:`~adarts_kernels.nn.recompute.recompute_edge`), for the largest
    batches; works with every edge kind.

    Architecture parameters: ``alphas_normal``, ``alphas_reduce`` ``(14, 8)`` and, except for
    DARTS, ``betas_normal``, ``betas_reduce`` ``(14,)``, initialised ``1e-3 * randn``. They are
    registered parameters (saved in ``state_dict``, seen by data parallelism) but kept apart
    from the weights: use :meth:`weight_parameters` and :meth:`arch_parameters`.
    """

    def __init__(self, C: int = 16, num_classes: int = 10, layers: int = 8, edge: str = "adarts",
                 k: Optional[int] = None, steps: int = 4, multiplier: int = 4, stem_multiplier: int = 3,
                 kernels: str = "auto", recompute: str = "none", impl: Optional[str] = None, stem: str = "cifar"):
        super().__init__()
        if edge not in EDGES:
            raise ValueError(f"unknown edge kind {edge!r}; expected one of {list(EDGES)}")
        if stem not in STEMS:
            raise ValueError(f"unknown stem {stem!r}; expected one of {list(STEMS)}")
        k = STEMS[stem] if k is None else k
        kernels = resolve_kernels(edge, kernels, recompute)
        impl = check_impl_name(impl)
        if edge != "darts" and (C % k != 0):
            raise ValueError(f"C={C} channels are not divisible by k={k}")
        if layers < 1 or C < 1 or num_classes < 1:
            raise ValueError(f"C, num_classes and layers must be positive, got C={C}, "
                             f"num_classes={num_classes}, layers={layers}")
        self._C, self._num_classes, self._layers = C, num_classes, layers
        self._steps, self._multiplier = steps, multiplier
        self.edge, self.k, self.kernels, self.recompute, self.impl = edge, k, kernels, recompute, impl
        self.stem_kind = stem
        #: ``None`` (float32, the default) or a dtype (``torch.bfloat16``) the forward runs
        #: under autocast with; logits and loss are then float32 (without autocast the
        #: logits have the network's dtype).
        self.autocast_dtype: Optional[torch.dtype] = None

        C_curr = stem_multiplier * C
        if stem == "imagenet":
            self.stem0, self.stem1 = imagenet_stems(C_curr)
        else:
            self.stem = nn.Sequential(nn.Conv2d(3, C_curr, 3, padding=1, bias=False), nn.BatchNorm2d(C_curr))
        C_prev_prev, C_prev, C_curr = C_curr, C_curr, C
        self.cells = nn.ModuleList()
        reduction_prev = stem == "imagenet"     # the ImageNet s0 is twice as large as s1
        for i in range(layers):
            reduction = i in (layers // 3, 2 * layers // 3)
            if reduction:
                C_curr *= 2
            cell = SearchCell(steps, multiplier, C_prev_prev, C_prev, C_curr, reduction, reduction_prev, edge, k,
                              kernels, recompute, impl)
            reduction_prev = reduction
            self.cells.append(cell)
            C_prev_prev, C_prev = C_prev, multiplier * C_curr
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(C_prev, num_classes)

        n_edges, n_ops = num_edges(steps), len(PRIMITIVES)
        self.alphas_normal = nn.Parameter(1e-3 * torch.randn(n_edges, n_ops))
        self.alphas_reduce = nn.Parameter(1e-3 * torch.randn(n_edges, n_ops))
        if edge != "darts":
            self.betas_normal = nn.Parameter(1e-3 * torch.randn(n_edges))
            self.betas_reduce = nn.Parameter(1e-3 * torch.randn(n_edges))
        else:
            self.betas_normal = self.betas_reduce = None
        self._arch_names = {"alphas_normal", "alphas_reduce", "betas_normal", "betas_reduce"}

    # -- parameter groups ---------------------------------------------------------------
    def arch_parameters(self) -> List[nn.Parameter]:
        """The alpha and beta tensors only."""
        return [p for p in (self.alphas_normal, self.alphas_reduce, self.betas_normal, self.betas_reduce)
                if p is not None]

    def arch_parameter_names(self) -> List[str]:
        """The names of :meth:`arch_parameters` (``alphas_normal``, ...): what data
        parallelism leaves out of the weights' gradient all-reduce."""
        return [name for name, _ in self.named_parameters() if name in self._arch_names]

    def weight_parameters(self) -> Iterator[nn.Parameter]:
        """Every network weight (attention MLPs included), no architecture parameter."""
        for name, p in self.named_parameters():
            if name not in self._arch_names:
                yield p

    def backends(self, device=None) -> Optional[Dict[str, str]]:
        """The backend each fused op runs on for tensors on ``device`` (default: where the
        parameters are), e.g. ``{"attention_score": "cpp", ..., "mixed_sum": "cpp"}``;
        ``None`` for the plain-PyTorch modules. Raises ``RuntimeError`` when an explicit
        ``impl`` cannot run there (:func:`adarts_kernels.backend.resolve`)."""
        if self.kernels != "fused":
            return None
        dev = torch.device(device) if device is not None else self.classifier.weight.device
        name = backend.resolve(self.impl, dev)
        return {op: name for op in FUSED_OPS}

    # -- channel selection --------------------------------------------------------------
    def selecting_edges(self) -> Iterator[Tuple[str, ChannelSelectingEdge]]:
        """``(name, edge)`` for every channel-selecting edge (the ADARTS edges, any kernels),
        in forward order (cell by cell, edge by edge); none for the baselines."""
        for cell_i, cell in enumerate(self.cells):
            for edge_i, edge in enumerate(cell._ops):
                if selects_channels(edge):
                    yield f"cells.{cell_i}._ops.{edge_i}", edge

    def set_selector(self, selector: Optional[ChannelSelector]) -> None:
        """Give every channel-selecting edge ``selector`` (``None``: the built-in top-k);
        see :mod:`adarts_kernels.nn.selection`. A no-op for the baselines."""
        for _, edge in self.selecting_edges():
            edge.selector = selector

    @contextlib.contextmanager
    def selector_scope(self, selector: Optional[ChannelSelector]) -> Iterator[None]:
        """:meth:`set_selector` for the ``with`` block; on exit (error or not) each edge gets
        back the selector it had before."""
        edges = [edge for _, edge in self.selecting_edges()]
        before = [edge.selector for edge in edges]
        try:
            for edge in edges:
                edge.selector = selector
            yield
        finally:
            for edge, old in zip(edges, before):
                edge.selector = old

    # -- forward ------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x: (B, 3, H, W)`` -> logits ``(B, num_classes)``."""
        if self.stem_kind == "imagenet":
            check_imagenet_input(x, "SearchNetwork")
        elif x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"SearchNetwork: expected images of shape (B, 3, H, W), got {tuple(x.shape)}")
        elif x.shape[2] % 4 or x.shape[3] % 4:
            raise ValueError(f"SearchNetwork: H and W must be divisible by 4 (two reductions), got {tuple(x.shape)}")
        w_normal = F.softmax(self.alphas_normal, dim=-1)
        w_reduce = F.softmax(self.alphas_reduce, dim=-1)
        if self.betas_normal is not None:
            e_normal = normalized_betas(self.betas_normal, self._steps)
            e_reduce = normalized_betas(self.betas_reduce, self._steps)
        else:
            e_normal = e_reduce = None
        amp = self.autocast_dtype
        with torch.autocast(x.device.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
            if self.stem_kind == "imagenet":
                s0 = self.stem0(x)
                s1 = self.stem1(s0)
            else:
                s0 = s1 = self.stem(x)
            for cell in self.cells:
                if cell.reduction:
                    s0, s1 = s1, cell(s0, s1, w_reduce, e_reduce)
                else:
                    s0, s1 = s1, cell(s0, s1, w_normal, e_normal)
            out = self.global_pooling(s1)
            logits = self.classifier(out.flatten(1))
        # under autocast the classifier gives half-precision logits: float32 for the loss;
        # otherwise the logits keep the network's dtype (float64 stays float64)
        return logits.float() if amp is not None else logits

    def loss(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of ``self(x)`` against ``target: (B,)`` int64 (in the logits' dtype)."""
        return F.cross_entropy(self(x), target)

    # -- derivation ---------------------------------------------------------------------
    def edge_weights(self, reduce: bool) -> torch.Tensor:
        """``(14, 8)``: softmax(alpha), times the node-normalised beta where the edge has one."""
        alpha = self.alphas_reduce if reduce else self.alphas_normal
        beta = self.betas_reduce if reduce else self.betas_normal
        w = F.softmax(alpha.detach(), dim=-1)
        if beta is not None:
            w = w * normalized_betas(beta.detach(), self._steps)[:, None]
        return w

    def genotype(self) -> Genotype:
        """Derive the discrete cell (docs/method.md section 3)."""
        from .genotypes import derive
        concat = list(range(2 + self._steps - self._multiplier, self._steps + 2))
        return Genotype(
            normal=derive(self.edge_weights(False), self._steps), normal_concat=concat,
            reduce=derive(self.edge_weights(True), self._steps), reduce_concat=concat,
        )
