"""Peak memory of live tensors on any device, CPU included: the analogue of
``torch.cuda.max_memory_allocated`` for a piece of code (e.g. one full search step).

:class:`PeakMemoryMode` is a ``TorchDispatchMode``. For every aten op run while it is
active it looks at the op's tensor outputs and registers each *new* untyped storage (one
that is neither already registered nor the storage of one of the op's inputs) with its
``nbytes()`` as live; a weak reference on the storage object removes it again when the
storage dies (PyTorch keeps one Python object per storage, so the reference fires when the
last tensor or view using the storage goes, not when one tensor does). It keeps the
running sum and its maximum. So:

- a view (``x[:10]``, ``x.t()``, ``detach``) shares its input's storage and is not counted
  again; an in-place op (``x.add_(1)``, ``out=``) returns its input and is not counted again;
- a storage counts from the op that returns it until its last user is gone, whatever the
  Python object holding it (autograd's saved tensors, ``.grad``, optimizer state);
- ops that run inside backward (on CPU in the calling thread) and the recomputation of
  ``torch.utils.checkpoint`` are seen like any other op.

What exists before the mode is entered (parameters, buffers, optimizer state, gradients of
an earlier step, the batch) is no op output and is therefore **not** counted by
``peak_new_bytes``. Pass such tensors as ``baseline`` to count them too: their storages are
live from the start and leave when they die (e.g. old ``.grad`` tensors freed by
``zero_grad(set_to_none=True)``); ``peak_bytes`` is then the maximum of baseline + new, the
number closest to ``max_memory_allocated`` (which counts everything allocated).

Not seen: memory an op allocates and frees inside its own kernel (a custom C++ op's
scratch buffers), allocator rounding and caching, storages created outside the dispatcher
(``torch.from_numpy``), and a registered storage that is resized in place (it keeps the
size it had when registered).

    with PeakMemoryMode(baseline=state) as pm:
        step()
    pm.peak_new_bytes, pm.peak_bytes, pm.baseline_bytes
"""
from __future__ import annotations

import weakref
from typing import Any, Dict, Iterable, Optional, Set

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def _storage(t: torch.Tensor) -> Optional[torch.UntypedStorage]:
    if t.layout != torch.strided or t.device.type == "meta":
        return None
    try:
        return t.untyped_storage()
    except (RuntimeError, NotImplementedError):
        return None


class PeakMemoryMode(TorchDispatchMode):
    """Tracks live tensor storages created while active (see the module docstring).

    ``baseline``: tensors that exist before (counted live from the start, until they die).
    After the block: ``peak_new_bytes`` (maximum over time of the bytes of live storages
    created inside the block), ``peak_bytes`` (maximum of baseline + new), ``baseline_bytes``
    (the baseline at entry), ``live_new_bytes`` / ``live_bytes`` (now), ``allocations``
    (storages registered).
    """

    def __init__(self, baseline: Iterable[Any] = ()):
        super().__init__()
        self._baseline_in = list(baseline)
        self._refs: Dict[int, weakref.ref] = {}       # id(storage) -> weak reference
        self._size: Dict[int, int] = {}              # id(storage) -> bytes counted
        self._new: Set[int] = set()                  # ids of the storages created inside
        self.baseline_bytes = 0
        self.live_bytes = 0
        self.live_new_bytes = 0
        self.peak_bytes = 0
        self.peak_new_bytes = 0
        self.allocations = 0

    # -- bookkeeping -------------------------------------------------------------------
    def _dead(self, key: int) -> None:
        n = self._size.pop(key, 0)
        self._refs.pop(key, None)
        self.live_bytes -= n
        if key in self._new:
            self._new.discard(key)
            self.live_new_bytes -= n

    def _register(self, s: torch.UntypedStorage, new: bool) -> None:
        key = id(s)
        if key in self._size:
            return
        n = s.nbytes()
        if n == 0:
            return

        self_ref = weakref.ref(self)

        def gone(_ref, key=key):
            me = self_ref()
            if me is not None:
                me._dead(key)
        self._refs[key] = weakref.ref(s, gone)
        self._size[key] = n
        self.live_bytes += n
        if new:
            self._new.add(key)
            self.live_new_bytes += n
            self.allocations += 1
            self.peak_new_bytes = max(self.peak_new_bytes, self.live_new_bytes)
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)

    def _register_baseline(self, objs: Iterable[Any]) -> None:
        leaves, _ = tree_flatten(list(objs))
        for t in leaves:
            if isinstance(t, torch.Tensor):
                s = _storage(t)
                if s is not None:
                    self._register(s, new=False)

    # -- the mode ----------------------------------------------------------------------
    def __enter__(self):
        self._register_baseline(self._baseline_in)
        self._baseline_in = []
        self.baseline_bytes = self.live_bytes
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs, _ = tree_flatten((args, kwargs))
        seen = {id(s) for t in inputs if isinstance(t, torch.Tensor) for s in [_storage(t)] if s is not None}
        outs, _ = tree_flatten(out)
        for t in outs:
            if isinstance(t, torch.Tensor):
                s = _storage(t)
                if s is not None and id(s) not in seen:
                    self._register(s, new=True)
        return out


def peak_memory(fn, baseline: Iterable[Any] = ()) -> PeakMemoryMode:
    """Run ``fn()`` under a :class:`PeakMemoryMode` and return the mode (its counters)."""
    with PeakMemoryMode(baseline) as pm:
        fn()
    return pm


def step_state(*objs: Any) -> list:
    """The tensors a step starts from, for ``baseline``: of each ``torch.nn.Module`` its
    parameters, their ``.grad`` and buffers; of each ``torch.optim.Optimizer`` its state
    tensors; any tensor (a batch) as it is."""
    out = []
    for o in objs:
        if isinstance(o, torch.nn.Module):
            for p in o.parameters():
                out.append(p)
                if p.grad is not None:
                    out.append(p.grad)
            out.extend(o.buffers())
        elif isinstance(o, torch.optim.Optimizer):
            for st in o.state.values():
                out.extend(v for v in st.values() if isinstance(v, torch.Tensor))
        elif isinstance(o, torch.Tensor):
            out.append(o)
    return out
