"""The DARTS candidate operations and the building blocks of cells.

Every module here is the plain-PyTorch definition used by DARTS, PC-DARTS and ADARTS
(docs/method.md section 1). Shapes: inputs ``(B, C_in, H, W)``; a stride-2 op returns
``(B, C_out, ceil(H/2), ceil(W/2))`` (``FactorizedReduce``: ``H/2``, needs even H, W).

``affine=False`` everywhere in the search supernet; the retrain network uses
``affine=True``.
"""
from __future__ import annotations

from typing import Callable, Dict, NamedTuple

import torch
import torch.nn as nn

#: The candidate operations, in the column order of alpha (docs/method.md section 1).
PRIMITIVES = (
    "none",
    "max_pool_3x3",
    "avg_pool_3x3",
    "skip_connect",
    "sep_conv_3x3",
    "sep_conv_5x5",
    "dil_conv_3x3",
    "dil_conv_5x5",
)


class ReLUConvBN(nn.Module):
    """ReLU -> Conv(kxk, stride, padding) -> BN. ``(B, C_in, H, W) -> (B, C_out, H', W')``."""

    def __init__(self, C_in: int, C_out: int, kernel_size: int, stride: int, padding: int, affine: bool = True):
        super().__init__()
        self.op = nn.Sequential(
            nn.ReLU(inplace=False),
            nn.Conv2d(C_in, C_out, kernel_size, stride=stride, padding=padding, bias=False),
            nn.BatchNorm2d(C_out, affine=affine),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class DilConv(nn.Module):
    """ReLU -> depthwise kxk (dilation, stride) -> pointwise 1x1 -> BN."""

    def __init__(self, C_in, C_out, kernel_size, stride, padding, dilation, affine=True):
        super().__init__()
        self.op = nn.Sequential(
            nn.ReLU(inplace=False),
            nn.Conv2d(C_in, C_in, kernel_size, stride, padding, dilation=dilation, groups=C_in, bias=False),
            nn.Conv2d(C_in, C_out, kernel_size=1, padding=0, bias=False),
            nn.BatchNorm2d(C_out, affine=affine),
        )

    def forward(self, x):
        return self.op(x)

    def layers(self) -> "DilConvLayers":
        """The layers by name (the positions in ``self.op`` are known here only)."""
        return DilConvLayers(dw=self.op[1], pw=self.op[2], bn=self.op[3])


class DilConvLayers(NamedTuple):
    dw: nn.Conv2d
    pw: nn.Conv2d
    bn: nn.BatchNorm2d


class SepConv(nn.Module):
    """Two [ReLU, depthwise kxk, pointwise 1x1, BN] blocks; the first depthwise has the stride."""

    def __init__(self, C_in, C_out, kernel_size, stride, padding, affine=True):
        super().__init__()
        self.op = nn.Sequential(
            nn.ReLU(inplace=False),
            nn.Conv2d(C_in, C_in, kernel_size, stride, padding, groups=C_in, bias=False),
            nn.Conv2d(C_in, C_in, kernel_size=1, padding=0, bias=False),
            nn.BatchNorm2d(C_in, affine=affine),
            nn.ReLU(inplace=False),
            nn.Conv2d(C_in, C_in, kernel_size, 1, padding, groups=C_in, bias=False),
            nn.Conv2d(C_in, C_out, kernel_size=1, padding=0, bias=False),
            nn.BatchNorm2d(C_out, affine=affine),
        )

    def forward(self, x):
        return self.op(x)

    def layers(self) -> "SepConvLayers":
        """The layers by name (the positions in ``self.op`` are known here only)."""
        return SepConvLayers(dw1=self.op[1], pw1=self.op[2], bn1=self.op[3], dw2=self.op[5], pw2=self.op[6],
                             bn2=self.op[7])


class SepConvLayers(NamedTuple):
    dw1: nn.Conv2d
    pw1: nn.Conv2d
    bn1: nn.BatchNorm2d
    dw2: nn.Conv2d
    pw2: nn.Conv2d
    bn2: nn.BatchNorm2d


class PoolBN(nn.Sequential):
    """A pooling candidate of the search supernet: the pooling, then ``BatchNorm2d(C,
    affine=False)`` (docs/method.md section 1). A ``Sequential`` (keys ``0.*``, ``1.*``) with the two
    layers by name."""

    def __init__(self, pool: nn.Module, bn: nn.BatchNorm2d):
        super().__init__(pool, bn)

    @property
    def pool(self) -> nn.Module:
        return self[0]

    @property
    def bn(self) -> nn.BatchNorm2d:
        return self[1]


class Identity(nn.Module):
    """``skip_connect`` at stride 1."""

    def forward(self, x):
        return x


class Zero(nn.Module):
    """``none``: zeros of the (strided) input shape."""

    def __init__(self, stride: int):
        super().__init__()
        self.stride = stride

    def forward(self, x):
        if self.stride == 1:
            return x.mul(0.0)
        return x[:, :, :: self.stride, :: self.stride].mul(0.0)


class FactorizedReduce(nn.Module):
    """Halve H and W with two offset stride-2 1x1 convs, concatenated: ``C_out`` must be even."""

    def __init__(self, C_in: int, C_out: int, affine: bool = True):
        super().__init__()
        if C_out % 2 != 0:
            raise ValueError(f"FactorizedReduce needs an even number of output channels, got {C_out}")
        self.relu = nn.ReLU(inplace=False)
        self.conv_1 = nn.Conv2d(C_in, C_out // 2, 1, stride=2, padding=0, bias=False)
        self.conv_2 = nn.Conv2d(C_in, C_out // 2, 1, stride=2, padding=0, bias=False)
        self.bn = nn.BatchNorm2d(C_out, affine=affine)

    def forward(self, x):
        if x.shape[-1] % 2 or x.shape[-2] % 2:
            raise ValueError(f"FactorizedReduce needs even H and W, got input of shape {tuple(x.shape)}")
        x = self.relu(x)
        out = torch.cat([self.conv_1(x), self.conv_2(x[:, :, 1:, 1:])], dim=1)
        return self.bn(out)


OPS: Dict[str, Callable[[int, int, bool], nn.Module]] = {
    "none": lambda C, stride, affine: Zero(stride),
    "avg_pool_3x3": lambda C, stride, affine: nn.AvgPool2d(3, stride=stride, padding=1, count_include_pad=False),
    "max_pool_3x3": lambda C, stride, affine: nn.MaxPool2d(3, stride=stride, padding=1),
    "skip_connect": lambda C, stride, affine: Identity() if stride == 1 else FactorizedReduce(C, C, affine=affine),
    "sep_conv_3x3": lambda C, stride, affine: SepConv(C, C, 3, stride, 1, affine=affine),
    "sep_conv_5x5": lambda C, stride, affine: SepConv(C, C, 5, stride, 2, affine=affine),
    "dil_conv_3x3": lambda C, stride, affine: DilConv(C, C, 3, stride, 2, 2, affine=affine),
    "dil_conv_5x5": lambda C, stride, affine: DilConv(C, C, 5, stride, 4, 2, affine=affine),
}
assert set(OPS) == set(PRIMITIVES)


def make_op(name: str, C: int, stride: int, affine: bool) -> nn.Module:
    """Build candidate ``name`` for ``C`` channels; raises ``ValueError`` for an unknown name."""
    if name not in OPS:
        raise ValueError(f"unknown operation {name!r}; expected one of {list(PRIMITIVES)}")
    if stride not in (1, 2):
        raise ValueError(f"stride must be 1 or 2, got {stride}")
    return OPS[name](C, stride, affine)


def make_search_op(name: str, C: int, stride: int) -> nn.Module:
    """A candidate as the search supernet holds it: affine-free, pooling followed by
    ``BatchNorm2d(C, affine=False)`` (docs/method.md section 1)."""
    op = make_op(name, C, stride, affine=False)
    if "pool" in name:
        op = PoolBN(op, nn.BatchNorm2d(C, affine=False))
    return op
