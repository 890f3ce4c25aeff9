"""The retrain network built from a genotype (docs/method.md section 1), DARTS's NetworkCIFAR.

``EvalNetwork(C=36, num_classes=10, layers=20, auxiliary=True, genotype=genotypes.PC_DARTS)``:
input ``(B, 3, H, W)`` with H, W divisible by 4; ``forward`` returns
``(logits (B, num_classes), logits_aux (B, num_classes) or None)``: the auxiliary logits
only in training mode with ``auxiliary=True``.
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
        C_prev_prev, C_prev, C_curr = C_curr, C_curr, C
        self.cells = nn.ModuleList()
        reduction_prev = False
        C_aux = None
        for i in range(layers):
            reduction = i in (layers // 3, 2 * layers // 3)
            if reduction:
                C_curr *= 2
            cell = EvalCell(genotype, C_prev_prev, C_prev, C_curr, reduction, reduction_prev)
            reduction_prev = reduction
            self.cells.append(cell)
            C_prev_prev, C_prev = C_prev, cell.multiplier * C_curr
            if i == 2 * layers // 3:
                C_aux = C_prev
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
