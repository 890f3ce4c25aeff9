"""Activation checkpointing peers for the benchmarks: a built
:class:`~adarts_kernels.nas.SearchNetwork` with ``torch.utils.checkpoint`` (non-reentrant)
around each cell or each edge, what a user who wants memory would try first.

The network's code is untouched: each cell (or edge) is replaced by a :class:`Checkpointed`
wrapper that calls ``checkpoint(inner, *args, use_reentrant=False)``. Attributes the network
reads from its cells (``reduction``, ``_ops``) fall through to the wrapped module, and the
parameters keep their order, so a wrapped network built from the same seed has the same
weights as the plain one.

What a user gets, and what these peers therefore measure:

- the recomputation in backward runs the wrapped module's forward again, so its
  ``BatchNorm2d`` layers update their running statistics **twice** per step (the outputs
  are unchanged: in training mode BatchNorm normalises with the batch statistics);
- an ADARTS edge re-selects its channels on recompute; the selection is the top-k of the
  same inputs and is the same (``checkpoint`` also restores the RNG state);
- ``torch.utils.checkpoint`` keeps its inputs outside ``saved_tensors_hooks``, so
  :func:`~adarts_kernels.profiling.saved_activation_bytes` undercounts these networks:
  measure them with :class:`~adarts_kernels.profiling.peak.PeakMemoryMode` (peak of live
  tensors) instead;
- an ADARTS edge inside a wrapper is not listed by ``SearchNetwork.selecting_edges`` (a
  custom selector cannot be set on it; the built-in top-k runs).
"""
from __future__ import annotations

import torch.nn as nn
from torch.utils.checkpoint import checkpoint

#: where the checkpoints go
GRANULARITIES = ("cell", "edge")


class Checkpointed(nn.Module):
    """``forward(*args)`` = ``checkpoint(inner, *args, use_reentrant=False)``; unknown
    attributes are read from ``inner``."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, *args):
        return checkpoint(self.inner, *args, use_reentrant=False)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules", {})
            if name == "inner" or "inner" not in modules:
                raise
            return getattr(modules["inner"], name)


def checkpoint_supernet(net: nn.Module, per: str) -> nn.Module:
    """Wrap every cell (``per="cell"``) or every edge (``per="edge"``) of the supernet ``net``
    in :class:`Checkpointed`, in place; returns ``net``."""
    if per not in GRANULARITIES:
        raise ValueError(f"unknown checkpoint granularity {per!r}; expected one of {list(GRANULARITIES)}")
    for i, cell in enumerate(net.cells):
        if isinstance(cell, Checkpointed):
            raise ValueError("the network is already checkpointed")
        if per == "cell":
            net.cells[i] = Checkpointed(cell)
        else:
            for j, edge in enumerate(cell._ops):
                cell._ops[j] = Checkpointed(edge)
    return net
