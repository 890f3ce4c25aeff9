"""The retrain networks built from a genotype (docs/method.md section 1): DARTS's
NetworkCIFAR and NetworkImageNet, and the ImageNet stems the search supernet shares.

``EvalNetwork(C=36, num_classes=10, layers=20, auxiliary=True, genotype=genotypes.PC_DARTS)``:
input ``(B, 3, H, W)`` with H, W divisible by 4; ``forward`` returns
``(logits (B, num_classes), logits_aux (B, num_classes) or None)``: the auxiliary logits
only in training mode with ``auxiliary=True``.

``NetworkImageNet(C=48, num_classes=1000, layers=14, auxiliary=True, genotype=genotypes.DARTS_V2)``:
input ``(B, 3, H, W)`` with H, W divisible by 32 (224 in the published setting), same output.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn

from ..nn.operations import FactorizedReduce, Identity, ReLUConvBN, make_op
from .genotypes import Genotype, validate


def drop_path(x: torch.Tensor, drop_prob: float) -> torch.Tensor:
    """Zero whole samples with probability ``drop_prob``, scale the rest by ``1/(1-drop_prob)``.

    ``x: (B, ...)``; the mask is drawn from the global torch generator (saved in checkpoints).
    """
    if drop_prob <= 0.0:
        return x
    keep = 1.0 - drop_prob
    mask = torch.empty(x.shape[0], 1, 1, 1, device=x.device, dtype=x.dtype).bernoulli_(keep)
    return x / keep * mask


class EvalCell(nn.Module):
    """A discrete cell: 2 inputs -> ``(B, len(concat) * C, H', W')``."""

    def __init__(self, genotype: Genotype, C_prev_prev, C_prev, C, reduction, reduction_prev):
        super().__init__()
        if reduction_prev:
            self.preprocess0 = FactorizedReduce(C_prev_prev, C)
        else:
            self.preprocess0 = ReLUConvBN(C_prev_prev, C, 1, 1, 0)
        self.preprocess1 = ReLUConvBN(C_prev, C, 1, 1, 0)
        pairs, concat = (genotype.reduce, genotype.reduce_concat) if reduction else \
            (genotype.normal, genotype.normal_concat)
        op_names, indices = zip(*pairs)
        self.reduction = reduction
        self._steps = len(op_names) // 2
        self._concat = list(concat)
        self.multiplier = len(concat)
        self._indices = list(indices)
        self._ops = nn.ModuleList()
        for name, index in zip(op_names, indices):
            stride = 2 if reduction and index < 2 else 1
            self._ops.append(make_op(name, C, stride, affine=True))

    def forward(self, s0, s1, drop_prob: float):
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        for i in range(self._steps):
            hs = []
            for j in (2 * i, 2 * i + 1):
                op = self._ops[j]
                h = op(states[self._indices[j]])
                if self.training and drop_prob > 0.0 and not isinstance(op, Identity):
                    h = drop_path(h, drop_prob)
                hs.append(h)
            states.append(hs[0] + hs[1])
        return torch.cat([states[i] for i in self._concat], dim=1)


class AuxiliaryHead(nn.Module):
    """DARTS's CIFAR auxiliary head, for the 8x8 maps after the second reduction.

    ``(B, C, S, S) -> (B, num_classes)``. At S = 8 it is exactly DARTS's head
    (avg pool 5, stride 3 -> 2x2); other sizes are pooled adaptively to 2x2.
    """

    def __init__(self, C: int, num_classes: int, spatial: int = 8):
        super().__init__()
        pool = (nn.AvgPool2d(5, stride=3, padding=0, count_include_pad=False) if spatial == 8
                else nn.AdaptiveAvgPool2d(2))
        self.features = nn.Sequential(
            nn.ReLU(inplace=True), pool,
            nn.Conv2d(C, 128, 1, bias=False), nn.BatchNorm2d(128), nn.ReLU(inplace=True),
            nn.Conv2d(128, 768, 2, bias=False), nn.BatchNorm2d(768), nn.ReLU(inplace=True),
        )
        self.classifier = nn.Linear(768, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


def eval_cells(genotype: Genotype, C_stem: int, C: int, layers: int,
               reduction_prev: bool) -> Tuple[nn.ModuleList, int, int]:
    """The ``layers`` cells of a retrain network after a stem of ``C_stem`` channels, ``C``
    channels per node in the first cells, reductions (channels doubled) at ``layers//3`` and
    ``2*layers//3``; ``reduction_prev``: cell 0's first input is twice the size of its second
    (the ImageNet stems). Returns ``(cells, C_final, C_aux)``: the channels of the last cell's
    output and of cell ``2*layers//3``'s, where the auxiliary head reads."""
    C_prev_prev, C_prev, C_curr = C_stem, C_stem, C
    cells = nn.ModuleList()
    C_aux = None
    for i in range(layers):
        reduction = i in (layers // 3, 2 * layers // 3)
        if reduction:
            C_curr *= 2
        cell = EvalCell(genotype, C_prev_prev, C_prev, C_curr, reduction, reduction_prev)
        reduction_prev = reduction
        cells.append(cell)
        C_prev_prev, C_prev = C_prev, cell.multiplier * C_curr
        if i == 2 * layers // 3:
            C_aux = C_prev
    return cells, C_prev, C_aux


class EvalNetwork(nn.Module):
    """Retrain network: stem Conv3x3(3 -> 3C) + BN, ``layers`` cells of ``genotype``
    (reductions at ``layers//3`` and ``2*layers//3``), optional auxiliary head after cell
    ``2*layers//3``, global average pool, linear classifier. ``drop_path_prob`` is set by
    the trainer each epoch (ramped linearly)."""

    def __init__(self, C: int = 36, num_classes: int = 10, layers: int = 20, auxiliary: bool = True,
                 genotype: Genotype = None, image_size: int = 32, stem_multiplier: int = 3):
        super().__init__()
        if genotype is None:
            raise ValueError("EvalNetwork needs a genotype (e.g. genotypes.PC_DARTS)")
        validate(genotype)
        if layers < 3:
            raise ValueError(f"EvalNetwork needs at least 3 layers (two reductions), got {layers}")
        self._layers, self._auxiliary = layers, auxiliary
        self.drop_path_prob = 0.0
        C_curr = stem_multiplier * C
        self.stem = nn.Sequential(nn.Conv2d(3, C_curr, 3, padding=1, bias=False), nn.BatchNorm2d(C_curr))
        self.cells, C_prev, C_aux = eval_cells(genotype, C_curr, C, layers, reduction_prev=False)
        self.auxiliary_head = AuxiliaryHead(C_aux, num_classes, spatial=image_size // 4) if auxiliary else None
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(C_prev, num_classes)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"EvalNetwork: expected images of shape (B, 3, H, W), got {tuple(x.shape)}")
        if x.shape[2] % 4 or x.shape[3] % 4:
            raise ValueError(f"EvalNetwork: H and W must be divisible by 4 (two reductions), got {tuple(x.shape)}")
        logits_aux = None
        s0 = s1 = self.stem(x)
        for i, cell in enumerate(self.cells):
            s0, s1 = s1, cell(s0, s1, self.drop_path_prob)
            if i == 2 * self._layers // 3 and self.auxiliary_head is not None and self.training:
                logits_aux = self.auxiliary_head(s1)
        logits = self.classifier(self.global_pooling(s1).flatten(1))
        return logits, logits_aux


def count_parameters(model: nn.Module, exclude_auxiliary: bool = True) -> int:
    """Number of weights, the auxiliary head left out by default (as published counts do)."""
    return sum(p.numel() for n, p in model.named_parameters()
               if not (exclude_auxiliary and n.startswith("auxiliary_head")))


# ---------------------------------------------------------------------------- ImageNet
def imagenet_stems(C: int) -> Tuple[nn.Sequential, nn.Sequential]:
    """The two ImageNet stems of DARTS's NetworkImageNet and PC-DARTS's ImageNet supernet, for
    ``C`` output channels (even): three stride-2 3x3 convs take 224x224 to 28x28.

    ``stem0``: Conv3x3 s2 (3 -> C//2), BN, ReLU, Conv3x3 s2 (C//2 -> C), BN:
    ``(B, 3, H, W) -> (B, C, H/4, W/4)``; ``stem1``: ReLU, Conv3x3 s2 (C -> C), BN:
    ``-> (B, C, H/8, W/8)``. The cells get ``s0 = stem0(x)`` and ``s1 = stem1(s0)``.
    The retrain network passes C = 48; the search supernet ``stem_multiplier * C``
    (3 * 16 = 48: 3 -> 24 -> 48, then 48 -> 48).

    The reference code starts stem1 with ``ReLU(inplace=True)``, which rectifies ``s0`` in
    place as well; the only other reader of ``s0`` is cell 0's FactorizedReduce, which begins
    with a ReLU, so an out-of-place ReLU here computes the same function and gradients.
    """
    if C % 2 or C < 2:
        raise ValueError(f"the ImageNet stems need an even number of channels, got {C}")
    stem0 = nn.Sequential(
        nn.Conv2d(3, C // 2, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(C // 2), nn.ReLU(inplace=True),
        nn.Conv2d(C // 2, C, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(C),
    )
    stem1 = nn.Sequential(nn.ReLU(inplace=False), nn.Conv2d(C, C, 3, stride=2, padding=1, bias=False),
                          nn.BatchNorm2d(C))
    return stem0, stem1


def check_imagenet_input(x: torch.Tensor, who: str) -> None:
    """``ValueError`` unless ``x`` is ``(B, 3, H, W)`` with H, W divisible by 32 (stems /8,
    then two reductions, each FactorizedReduce needing an even map)."""
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"{who}: expected images of shape (B, 3, H, W), got {tuple(x.shape)}")
    if x.shape[2] % 32 or x.shape[3] % 32:
        raise ValueError(f"{who}: H and W must be divisible by 32 (ImageNet stems /8, then two reductions), "
                         f"got {tuple(x.shape)}")


class AuxiliaryHeadImageNet(nn.Module):
    """DARTS's ImageNet auxiliary head, for the 7x7 maps after the second reduction at 224.

    ``(B, C, S, S) -> (B, num_classes)``: ReLU, AvgPool2d(5, stride 2, no padding,
    count_include_pad=False) (7x7 -> 2x2), Conv1x1 (C -> 128), BN, ReLU, Conv2x2 (128 -> 768),
    ReLU, Linear(768, num_classes). As in DARTS's AuxiliaryHeadImageNet there is no BN after
    the 2x2 conv (its code leaves it out, for consistency with the published experiments).
    Other sizes than ``spatial = 7`` are pooled adaptively to 2x2.
    """

    def __init__(self, C: int, num_classes: int, spatial: int = 7):
        super().__init__()
        pool = (nn.AvgPool2d(5, stride=2, padding=0, count_include_pad=False) if spatial == 7
                else nn.AdaptiveAvgPool2d(2))
        self.features = nn.Sequential(
            nn.ReLU(inplace=False), pool,
            nn.Conv2d(C, 128, 1, bias=False), nn.BatchNorm2d(128), nn.ReLU(inplace=True),
            nn.Conv2d(128, 768, 2, bias=False), nn.ReLU(inplace=True),
        )
        self.classifier = nn.Linear(768, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


class NetworkImageNet(nn.Module):
    """DARTS's ImageNet retrain network: :func:`imagenet_stems` with ``C`` channels (224 ->
    56 -> 28), ``layers`` cells of ``genotype`` (cell 0's preprocess0 a FactorizedReduce of the
    56x56 stem0 output; reductions at ``layers//3`` and ``2*layers//3``: 28 -> 14 -> 7),
    optional :class:`AuxiliaryHeadImageNet` after cell ``2*layers//3``, global average pool
    (adaptive: DARTS's AvgPool2d(7) at 224) and a linear classifier. Drop path as
    :class:`EvalNetwork` (``drop_path_prob``, set by the trainer). ``image_size`` picks the
    auxiliary head's pooling (its input is ``image_size // 32`` wide)."""

    def __init__(self, C: int = 48, num_classes: int = 1000, layers: int = 14, auxiliary: bool = True,
                 genotype: Genotype = None, image_size: int = 224):
        super().__init__()
        if genotype is None:
            raise ValueError("NetworkImageNet needs a genotype (e.g. genotypes.DARTS_V2)")
        validate(genotype)
        if layers < 3:
            raise ValueError(f"NetworkImageNet needs at least 3 layers (two reductions), got {layers}")
        self._layers, self._auxiliary = layers, auxiliary
        self.drop_path_prob = 0.0
        self.stem0, self.stem1 = imagenet_stems(C)
        # s0 is twice as large as s1: cell 0 reduces s0 (reduction_prev)
        self.cells, C_prev, C_aux = eval_cells(genotype, C, C, layers, reduction_prev=True)
        self.auxiliary_head = (AuxiliaryHeadImageNet(C_aux, num_classes, spatial=image_size // 32)
                               if auxiliary else None)
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(C_prev, num_classes)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        check_imagenet_input(x, "NetworkImageNet")
        logits_aux = None
        s0 = self.stem0(x)
        s1 = self.stem1(s0)
        for i, cell in enumerate(self.cells):
            s0, s1 = s1, cell(s0, s1, self.drop_path_prob)
            if i == 2 * self._layers // 3 and self.auxiliary_head is not None and self.training:
                logits_aux = self.auxiliary_head(s1)
        logits = self.classifier(self.global_pooling(s1).flatten(1))
        return logits, logits_aux
