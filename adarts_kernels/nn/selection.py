"""Channel selection of the ADARTS edges (docs/method.md section 2, step 4), pluggable.

A *selector* is a callable ``selector(score, n) -> idx``:

- ``score: (C,)``: the edge's batch-summed attention score on this process,
  ``a.detach()`` summed over the batch in the accumulation dtype
  (:func:`adarts_kernels.ops.reference.acc_dtype`: float32 for half precision, else
  ``a``'s dtype);
- ``n``: the number of channels to select (``C / k``);
- ``idx: (n,)`` int64 on ``score``'s device: the selected channels, distinct, in ``[0, C)``;
  their order is the order the candidates see them in.

The default, :func:`local_selector`, is the stable-sort top-k of this process's score.
A data-parallel search passes one that sums the score over all processes first (a
collective), so that every process selects the same channels.

An edge that selects channels (:class:`ChannelSelectingEdge`) calls its selector exactly
once per forward, or not at all when the forward is given ``idx`` (a re-run, as
:func:`~adarts_kernels.nn.recompute.recompute_edge` makes in backward).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn as nn

from ..ops.reference import acc_dtype

#: ``selector(score: (C,), n: int) -> idx: (n,) int64`` on ``score``'s device. A selector
#: whose attribute ``trusted`` is ``True`` promises distinct indices in ``[0, C)`` (e.g. a
#: sort's prefix, :class:`adarts_kernels.distributed.GlobalSelector`): the fused edge then
#: skips the value check of its idx; any other selector's answer is checked by the ops.
ChannelSelector = Callable[[torch.Tensor, int], torch.Tensor]


def select_channels(score: torch.Tensor, n: int) -> torch.Tensor:
    """Indices of the ``n`` highest scores, ordered by descending score.

    Tie rule (every backend follows it): among equal scores the lower channel index comes
    first. A stable descending sort gives exactly that, on the device, with no host
    synchronisation. ``score: (C,) -> idx: (n,) int64``.
    """
    order = torch.sort(score, dim=0, descending=True, stable=True).indices
    return order[:n]


#: The default selector: the top-k of this process's score (:func:`select_channels`).
local_selector: ChannelSelector = select_channels


def batch_score(a: torch.Tensor) -> torch.Tensor:
    """``a: (B, C)`` -> the score a selector receives: ``a.detach()`` summed over the batch
    in the accumulation dtype, ``(C,)``."""
    return a.detach().sum(dim=0, dtype=acc_dtype(a.dtype))


def check_selected(name: str, idx, n: int, device: torch.device, what: str = "the channel selector's answer") -> None:
    """``idx`` (a selector's answer, or the ``idx`` a forward is given: ``what``) must be an
    int64 tensor of shape ``(n,)`` on ``device``; raises with the edge's ``name``. Shape, dtype
    and device only: no device data is read."""
    if not isinstance(idx, torch.Tensor):
        raise TypeError(f"{name}: {what} must be a tensor of channel indices, got {type(idx).__name__}")
    if idx.dtype != torch.int64:
        raise TypeError(f"{name}: {what} must hold int64 channel indices, got {idx.dtype}")
    if idx.shape != (n,):
        raise ValueError(f"{name}: {what} must have shape ({n},) (C/k channels), got {tuple(idx.shape)}")
    if idx.device != device:
        raise ValueError(f"{name}: {what} is on {idx.device}, the edge runs on {device}")


class ChannelSelectingEdge(nn.Module):
    """An edge that selects ``C/k`` channels by attention (the ADARTS edges).

    ``selector``: ``None`` (the built-in top-k, exactly as without this hook) or a
    :data:`ChannelSelector`; settable at any time, kept as a plain attribute (never a
    submodule, so ``state_dict`` keys do not depend on it). ``last_idx`` holds the indices
    of the latest forward. Subclasses take ``forward(..., *, idx=None)``: with ``idx`` given,
    those channels are used and no selection is made.

    This base class is the mark :func:`~adarts_kernels.nn.recompute.recompute_edge` and
    ``SearchNetwork.set_selector`` look for (:func:`selects_channels`).
    """

    selector: Optional[ChannelSelector] = None
    last_idx: Optional[torch.Tensor] = None

    def __setattr__(self, name: str, value) -> None:
        if name == "selector":
            if value is not None and not callable(value):
                raise TypeError(f"{type(self).__name__}: selector must be None or a callable "
                                f"selector(score, n) -> idx, got {type(value).__name__}")
            object.__setattr__(self, name, value)   # not registered as a submodule
        else:
            super().__setattr__(name, value)

    def _choose(self, a: torch.Tensor, n: int, idx: Optional[torch.Tensor],
                builtin: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The channels of this forward, from ``a: (B, C)``: the given ``idx`` (a re-run), else
        the selector's answer on :func:`batch_score` (called once), else ``builtin()`` (the
        edge's own top-k, as without a selector). Kept in ``last_idx``."""
        name = type(self).__name__
        if idx is not None:
            check_selected(name, idx, n, a.device, "the given idx")
        elif self.selector is not None:
            idx = self.selector(batch_score(a), n)
            check_selected(name, idx, n, a.device)
        else:
            idx = builtin()
        self.last_idx = idx
        return idx


def selects_channels(module: nn.Module) -> bool:
    """Whether ``module`` is a channel-selecting edge (takes a selector and ``idx=``)."""
    return isinstance(module, ChannelSelectingEdge)
