"""Edge-level recomputation (checkpointing) that memory accounting can see.

``recompute_edge(edge, x, weights, edge_weight)`` runs the edge without building its
graph and keeps only the edge's inputs (``x``, the node state, is shared with the other
edges reading it); backward re-runs the edge with autograd and differentiates it.

Unlike ``torch.utils.checkpoint``, the kept inputs go through ``ctx.save_for_backward``, so
saved-tensor hooks (``adarts_kernels.profiling.saved_activation_bytes``) count them. The
recomputation replays the forward's autocast state and does not move BatchNorm running
statistics a second time:

- a :class:`ReplayableEdge` (the fused edge) is re-run as ``edge(x, weights, edge_weight,
  replay=True)``: it then moves no statistics and keeps its units' intermediates (the
  re-run graph lives only until its gradients are out);
- any other edge (the plain-PyTorch edges, whose ``BatchNorm2d`` modules update their
  buffers in their own forward) is re-run as a plain call, and its BatchNorm buffers are
  restored afterwards.

A channel-selecting edge (:class:`~adarts_kernels.nn.selection.ChannelSelectingEdge`, the
ADARTS edges) is re-run with the channels of its forward, ``edge(..., idx=last_idx)``, kept
through ``ctx.save_for_backward`` (``C/k`` int64 values): the replay makes no selection and
never calls the edge's selector (under data parallelism a collective) a second time.

The edge must otherwise be deterministic.
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn as nn

from .selection import selects_channels

Tensor = torch.Tensor


class ReplayableEdge(nn.Module):
    """An edge whose forward takes ``replay``: ``forward(x, weights, edge_weight=None, *,
    replay=False)``. With ``replay=True`` the forward is a re-run of one already made (by
    :func:`recompute_edge`, inside backward): it must compute the same function, move no
    BatchNorm running statistics and may keep intermediates instead of recomputing them."""

    def forward(self, x: Tensor, weights: Tensor, edge_weight: Optional[Tensor] = None, *,
                replay: bool = False) -> Tensor:
        raise NotImplementedError


def _bn_buffers(edge: nn.Module) -> List[Tensor]:
    return [b for m in edge.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) for b in m.buffers()]


def selected_only(idx: Tensor) -> Tensor:
    """``idx`` to keep for a re-run: a view into the top-k's full sort is cloned, so that only
    the ``C/k`` selected indices are kept."""
    return idx.clone() if idx.untyped_storage().nbytes() != idx.nbytes else idx


class _EdgeRecompute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, edge: nn.Module, x: Tensor, weights: Tensor, edge_weight: Optional[Tensor],
                *params: Tensor):
        dev = x.device.type
        ctx.autocast = (torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev), dev)
        with torch.no_grad():
            out = edge(x, weights, edge_weight)
        ctx.edge = edge
        idx = edge.last_idx if selects_channels(edge) else None    # the channels of this forward
        if idx is not None:
            idx = selected_only(idx)
        ctx.save_for_backward(x, weights, edge_weight, idx, *params)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weights, edge_weight, idx, *params = ctx.saved_tensors
        edge = ctx.edge
        ins = [None if t is None else t.detach().requires_grad_(t.requires_grad) for t in (x, weights, edge_weight)]
        enabled, dtype, dev = ctx.autocast
        replayable = isinstance(edge, ReplayableEdge)
        kw = {} if idx is None else {"idx": idx}
        if replayable:
            kw["replay"] = True
        snapshot = None if replayable else [b.clone() for b in _bn_buffers(edge)]
        try:
            with torch.enable_grad(), torch.autocast(dev, dtype=dtype, enabled=enabled):
                out = edge(*ins, **kw)
            wrt = [t for t in (*ins, *params) if t is not None and t.requires_grad]
            got = iter(torch.autograd.grad(out, wrt, grad, allow_unused=True))
            grads = [next(got) if (t is not None and t.requires_grad) else None for t in (*ins, *params)]
        finally:   # after the gradients: BatchNorm's backward may read the buffers it saw
            if snapshot is not None:
                with torch.no_grad():
                    for b, s in zip(_bn_buffers(edge), snapshot):
                        b.copy_(s)
        return (None, *grads)


def recompute_edge(edge: nn.Module, x: Tensor, weights: Tensor, edge_weight: Optional[Tensor] = None) -> Tensor:
    """``edge(x, weights, edge_weight)`` keeping only ``x``, ``weights`` and ``edge_weight`` for
    backward (plus the parameters, which exist anyway, and a channel-selecting edge's ``idx``);
    the edge is re-run in backward. Without grad mode it is a plain call.

    An edge with ``recomputes_itself = True`` (the fused edge) is called as
    ``edge(x, weights, edge_weight, recompute=True)``: it keeps the same inputs and re-runs
    itself inside its own backward node, without a second autograd graph; any other edge
    goes through :func:`checkpoint_edge`."""
    if not torch.is_grad_enabled():
        return edge(x, weights, edge_weight)
    if getattr(edge, "recomputes_itself", False) is True:
        return edge(x, weights, edge_weight, recompute=True)
    return checkpoint_edge(edge, x, weights, edge_weight)


def checkpoint_edge(edge: nn.Module, x: Tensor, weights: Tensor, edge_weight: Optional[Tensor] = None) -> Tensor:
    """The generic recomputation of :func:`recompute_edge`: ``edge`` is run without a graph,
    then re-run with autograd inside backward (a :class:`ReplayableEdge` with ``replay=True``)
    and differentiated there. Grad mode must be on."""
    params = [p for p in edge.parameters() if p.requires_grad]
    return _EdgeRecompute.apply(edge, x, weights, edge_weight, *params)
