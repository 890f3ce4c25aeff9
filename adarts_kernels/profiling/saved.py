"""Deterministic memory accounting: bytes an autograd graph keeps for backward (docs/method.md section 8)."""
from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, Optional, Tuple

import torch
import torch.nn as nn


def _storage_key(t: torch.Tensor) -> Tuple[str, int]:
    s = t.untyped_storage()
    return (str(t.device), s.data_ptr())


class SavedTensorCounter:
    """Counts, each storage once, what autograd saves for backward while active.

    Parameters (leaf tensors that require grad) and any tensor whose storage belongs to
    ``exclude`` (e.g. a module's parameters and buffers) are not counted: they exist
    whether or not a backward is coming. Everything else is: activations, inputs,
    indices, statistics.

    Use as a context manager; ``nbytes`` is the total, ``by_dtype`` a breakdown.
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = ()):
        self._exclude = {_storage_key(t) for t in exclude}
        self._seen: Dict[Tuple[str, int], int] = {}
        self.by_dtype: Dict[str, int] = {}
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _pack(self, t: torch.Tensor) -> Any:
        if not (t.is_leaf and t.requires_grad) and t.layout == torch.strided:
            key = _storage_key(t)
            if key not in self._exclude and key not in self._seen:
                n = t.untyped_storage().nbytes()
                self._seen[key] = n
                name = str(t.dtype).replace("torch.", "")
                self.by_dtype[name] = self.by_dtype.get(name, 0) + n
        return t

    @staticmethod
    def _unpack(t: torch.Tensor) -> torch.Tensor:
        return t

    @property
    def nbytes(self) -> int:
        return sum(self._seen.values())

    def __enter__(self) -> "SavedTensorCounter":
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._ctx.__exit__(*exc)


def module_tensors(*modules: nn.Module) -> Iterable[torch.Tensor]:
    """Every parameter and buffer of ``modules``, to pass as ``exclude``."""
    for m in modules:
        yield from m.parameters()
        yield from m.buffers()


def saved_activation_bytes(fn: Callable[[], Any], exclude: Iterable[torch.Tensor] = (),
                           module: Optional[nn.Module] = None) -> int:
    """Bytes saved for backward while ``fn()`` runs, each storage counted once.

    Parameters (leaves requiring grad) are never counted; pass ``module`` (or ``exclude``)
    to leave out that module's parameters and buffers too. The graph ``fn`` builds is
    dropped afterwards; call it under ``torch.no_grad()`` and the answer is 0.
    """
    ex = list(exclude)
    if module is not None:
        ex.extend(module_tensors(module))
    with SavedTensorCounter(ex) as counter:
        out = fn()
    del out
    return counter.nbytes
