"""Bounds-checked Triton launches in Triton's interpreter (``TRITON_INTERPRET=1``).

The interpreter performs ``tl.load`` / ``tl.store`` on raw addresses and checks none of
them: a load without its ``mask=`` reads past the end of a tensor unseen (the values it
reads are usually discarded, so no output changes). :class:`checked_triton` wraps the
interpreter's memory operations (``InterpreterBuilder.create_masked_load`` /
``create_masked_store``, which the unmasked ``create_load`` / ``create_store`` call too, and
the atomics) and, for every element whose mask is true, checks that its whole element lies
inside the byte extent of one tensor argument of the current launch::

    extent = [data_ptr + min_offset * itemsize, data_ptr + (max_offset + 1) * itemsize)

with the offsets from the tensor's sizes and strides (not its storage: a view's neighbours
in the same storage are out of bounds too). All the active elements of one access must lie
in the extent of a single argument (an access that starts in ``x`` and runs into the next
tensor is out of bounds of ``x``). A violation raises :class:`TritonOutOfBounds` naming the
kernel, the access, the program id, the argument nearest to the address and the offset in
elements relative to that argument; it is also recorded, and the context manager raises the first
one again on exit (unless ``quiet`` is set), even where the caller swallowed the launch's
exception.

Nothing is checked outside the interpreter (on a GPU the kernels are compiled).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import numpy as np


class TritonOutOfBounds(AssertionError):
    """A Triton kernel touched memory outside its tensor arguments."""


@dataclass
class _Span:
    name: str
    start: int          # first byte
    end: int            # one past the last byte
    base: int           # data_ptr()
    itemsize: int
    numel: int


@dataclass
class _Launch:
    kernel: str
    arg_names: List[str]
    spans: List[_Span] = field(default_factory=list)
    accesses: int = 0


def interpreted() -> bool:
    """Whether Triton kernels run in the interpreter here."""
    import os
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def tensor_span(name: str, t) -> Optional[_Span]:
    """The byte extent ``[start, end)`` of tensor ``t`` from its sizes and strides."""
    import torch
    if not isinstance(t, torch.Tensor) and isinstance(getattr(t, "base", None), torch.Tensor):
        t = t.base          # triton's TensorWrapper (a reinterpreted dtype)
    if not isinstance(t, torch.Tensor):
        return None
    ptr, item = t.data_ptr(), t.element_size()
    if t.numel() == 0:
        return _Span(name, ptr, ptr, ptr, item, 0)
    hi = sum((s - 1) * st for s, st in zip(t.shape, t.stride()) if st > 0)
    lo = sum((s - 1) * st for s, st in zip(t.shape, t.stride()) if st < 0)
    return _Span(name, ptr + lo * item, ptr + (hi + 1) * item, ptr, item, t.numel())


class checked_triton:
    """``with checked_triton() as guard:`` -- every interpreted Triton launch inside the block
    is bounds-checked (see the module's docstring); ``guard.launches`` counts the launches
    checked, ``guard.accesses`` the loads and stores. Re-entrant (an inner guard is a no-op)."""

    _active: Optional["checked_triton"] = None

    def __init__(self):
        self.launches = 0
        self.accesses = 0
        self.violations: List[str] = []
        self.quiet = False       # on exit, do not raise the violations again (already reported)
        self._stack: List[_Launch] = []
        self._saved: List[Tuple[object, str, object]] = []
        self._outer = False

    # ------------------------------------------------------------------ patching

    def __enter__(self):
        if checked_triton._active is not None or not interpreted():
            return self
        from triton.runtime import interpreter as I
        checked_triton._active, self._outer = self, True
        B, G = I.InterpreterBuilder, I.GridExecutor

        def patch(owner, name, make):
            orig = getattr(owner, name)
            self._saved.append((owner, name, orig))
            setattr(owner, name, functools.wraps(orig)(make(orig)))

        guard = self

        def masked_load(orig):
            def f(builder, ptrs, mask, other, cache_policy, is_volatile):
                guard._check("load", ptrs, mask, builder)
                return orig(builder, ptrs, mask, other, cache_policy, is_volatile)
            return f

        def masked_store(orig):
            def f(builder, ptrs, value, mask, cache_policy):
                guard._check("store", ptrs, mask, builder)
                return orig(builder, ptrs, value, mask, cache_policy)
            return f

        def atomic_rmw(orig):
            def f(builder, rmwOp, ptr, val, mask, *rest):
                guard._check("atomic", ptr, mask, builder)
                return orig(builder, rmwOp, ptr, val, mask, *rest)
            return f

        def atomic_cas(orig):
            def f(builder, ptr, cmp, val, *rest):
                guard._check("atomic_cas", ptr, None, builder)
                return orig(builder, ptr, cmp, val, *rest)
            return f

        def init_args(orig):
            def f(executor, args_dev, kwargs):
                args_hst, kwargs_hst = orig(executor, args_dev, kwargs)
                if guard._stack:
                    launch = guard._stack[-1]
                    bound = dict(zip(executor.arg_names, args_hst))
                    bound.update(kwargs_hst)
                    launch.spans = [s for s in (tensor_span(n, v) for n, v in bound.items()) if s is not None]
                return args_hst, kwargs_hst
            return f

        def call(orig):
            def f(executor, *args, **kwargs):
                launch = _Launch(getattr(executor.fn, "__name__", "?"), list(executor.arg_names))
                guard._stack.append(launch)
                before = len(guard.violations)
                try:
                    result = orig(executor, *args, **kwargs)
                except Exception as exc:
                    if len(guard.violations) > before:
                        raise TritonOutOfBounds(guard.violations[before]) from exc
                    raise
                finally:
                    guard._stack.pop()
                    guard.launches += 1
                return result
            return f

        patch(B, "create_masked_load", masked_load)
        patch(B, "create_masked_store", masked_store)
        patch(B, "create_atomic_rmw", atomic_rmw)
        patch(B, "create_atomic_cas", atomic_cas)
        patch(G, "_init_args_hst", init_args)
        patch(G, "__call__", call)
        return self

    def __exit__(self, exc_type, exc, tb):
        if self._outer:
            for owner, name, orig in reversed(self._saved):
                setattr(owner, name, orig)
            self._saved.clear()
            checked_triton._active, self._outer = None, False
        if self.violations and exc_type is None and not self.quiet:   # e.g. swallowed by the caller
            n = len(self.violations)
            raise TritonOutOfBounds(self.violations[0] + (f" (and {n - 1} more)" if n > 1 else ""))
        return False

    # ------------------------------------------------------------------ the check

    def _check(self, kind: str, ptrs, mask, builder) -> None:
        if not self._stack:
            return
        launch = self._stack[-1]
        self.accesses += 1
        launch.accesses += 1
        addr = np.asarray(ptrs.data).astype(np.uint64, copy=False)
        if mask is not None:
            m = np.broadcast_to(np.asarray(mask.data).astype(bool, copy=False), addr.shape)
            addr = addr[m]
        addr = addr.ravel()
        if addr.size == 0:
            return
        elem = ptrs.get_element_ty()
        item = max(getattr(elem, "primitive_bitwidth", 8) // 8, 1)
        lo, hi = int(addr.min()), int(addr.max()) + item
        for s in launch.spans:
            if s.start <= lo and hi <= s.end:
                return
        self._report(kind, launch, addr, item, builder)

    def _report(self, kind, launch: _Launch, addr: np.ndarray, item: int, builder) -> None:
        def inside(a):
            return [s for s in launch.spans if s.start <= a and a + item <= s.end]

        first = int(addr[0])
        home = inside(first)
        if home:   # the access starts inside an argument: the first element that leaves it
            s = home[0]
            bad = [int(a) for a in addr if not (s.start <= int(a) and int(a) + item <= s.end)]
        else:
            bad = [int(a) for a in addr if not inside(int(a))] or [first]
        a = bad[0]

        def distance(sp):
            if sp.start <= a < sp.end:
                return 0
            return min(abs(a - sp.start), abs(a - (sp.end - 1)))

        near = min(launch.spans, key=distance) if launch.spans else None
        pid = getattr(builder, "grid_idx", None)
        if near is None:
            where = f"address {a:#x} (the launch has no tensor arguments)"
        else:
            off = (a - near.base) / near.itemsize
            off_s = f"{int(off)}" if float(off).is_integer() else f"{off:.2f}"
            rel = "before its start" if a < near.start else ("past its end" if a >= near.end else "inside it")
            where = (f"{near.name}[{off_s}] ({rel}; {near.name} spans {near.numel} element(s) of "
                     f"{near.itemsize} byte(s), extent {(near.end - near.start) // max(near.itemsize, 1)})")
        msg = (f"Triton kernel {launch.kernel}: out-of-bounds {kind} at program {pid}: {where}; "
               f"{len(bad)} of {addr.size} active element(s) outside "
               + (f"the argument the access starts in ({home[0].name})" if home else "every tensor argument"))
        self.violations.append(msg)
        raise TritonOutOfBounds(msg)


class rtne_bfloat16:
    """``with rtne_bfloat16():`` -- the interpreter converts float32 to bfloat16 by rounding to
    nearest even, as compiled Triton does (triton 3.x's interpreter truncates toward zero
    there, an error of up to one unit in the last place that no GPU run has). Re-entrant."""

    _depth = 0

    def __enter__(self):
        if not interpreted():
            return self
        from triton.runtime import interpreter as I
        if rtne_bfloat16._depth == 0:
            import torch
            tl = I.tl
            orig = I.InterpreterBuilder.cast_impl

            @functools.wraps(orig)
            def cast_impl(builder, src, dst_type):
                if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
                    f32 = torch.from_numpy(np.ascontiguousarray(src.data, dtype=np.float32))
                    bits = f32.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
                    return I.TensorHandle(bits.reshape(np.shape(src.data)), dst_type.scalar)
                return orig(builder, src, dst_type)

            rtne_bfloat16._orig = orig
            I.InterpreterBuilder.cast_impl = cast_impl
        rtne_bfloat16._depth += 1
        return self

    def __exit__(self, *exc):
        if not interpreted():
            return False
        rtne_bfloat16._depth -= 1
        if rtne_bfloat16._depth == 0:
            from triton.runtime import interpreter as I
            I.InterpreterBuilder.cast_impl = rtne_bfloat16._orig
        return False
