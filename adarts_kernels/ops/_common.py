"""Shared plumbing of the ``adarts::`` ops: argument checks and contiguous inputs."""
from __future__ import annotations

import contextlib

import torch



FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


_NO_CONTEXT = contextlib.nullcontext()


def autocast_off(device_type: str):
    """A context with autocast off for ``device_type``: ``torch.autocast(..., enabled=False)``
    when autocast is on, else a shared no-op context (entering a real one costs microseconds
    on every kernel call, and the kernels accumulate in float32 themselves either way)."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return _NO_CONTEXT


def check(cond: bool, op: str, msg: str, exc=ValueError) -> None:
    if not cond:
        raise exc(f"adarts {op}: {msg}")


def check_float(op: str, *, optional=(), **tensors) -> None:
    """Floating dtype, one dtype and one device for every named tensor. ``None`` is refused
    (``TypeError`` naming the op and the argument) except for the names in ``optional``."""
    first = None
    for name, t in tensors.items():
        if t is None and name in optional:
            continue
        check(isinstance(t, torch.Tensor), op, f"{name} must be a tensor, got {type(t).__name__}", TypeError)
        check(t.dtype in FLOATS, op, f"{name} must be float16/bfloat16/float32/float64, got {t.dtype}", TypeError)
        if first is None:
            first = (name, t)
            continue
        check(t.dtype == first[1].dtype, op,
              f"dtype mismatch: {first[0]} is {first[1].dtype} but {name} is {t.dtype}", TypeError)
        check(t.device == first[1].device, op,
              f"device mismatch: {first[0]} is on {first[1].device} but {name} is on {t.device}")


def check_idx_meta(op: str, idx: torch.Tensor, x: torch.Tensor, C: int) -> None:
    """Shape, dtype and device of ``idx`` (values are checked where the data lives)."""
    check(isinstance(idx, torch.Tensor) and idx.dtype == torch.int64, op,
          f"idx must be an int64 tensor, got {getattr(idx, 'dtype', type(idx).__name__)}", TypeError)
    check(idx.dim() == 1 and 1 <= idx.shape[0] <= C, op,
          f"idx must have shape (n,) with 1 <= n <= C={C}, got {tuple(idx.shape)}")
    check(idx.device == x.device, op, f"device mismatch: x is on {x.device} but idx is on {idx.device}")


def on_host(t: torch.Tensor) -> bool:
    """True for a CPU tensor, whose values can be read without a device synchronisation
    (the one device check of :func:`check_idx_values`; tests replace it to run the device path)."""
    return t.device.type == "cpu"


def check_idx_values(op: str, idx: torch.Tensor, C: int) -> None:
    """Indices in ``[0, C)`` and distinct. On CPU a plain check; on a GPU an asynchronous
    device-side assert (no host synchronisation)."""
    if idx.numel() == 0:
        return
    if on_host(idx):
        check(bool(((idx >= 0) & (idx < C)).all()), op, f"idx values must lie in [0, {C}), got {idx.tolist()}")
        check(idx.unique().numel() == idx.numel(), op, f"idx values must be distinct, got {idx.tolist()}")
    else:
        torch._assert_async(((idx >= 0) & (idx < C)).all(), f"adarts {op}: idx values must lie in [0, {C})")
        s = idx.sort().values
        torch._assert_async((s[1:] != s[:-1]).all(), f"adarts {op}: idx values must be distinct")


def contiguous(*ts):
    """Each tensor argument made contiguous, and each tensor inside a list argument (the
    compiled ops take ``Tensor[]`` as lists of contiguous tensors); anything else unchanged."""
    def one(t):
        if isinstance(t, torch.Tensor):
            return t.contiguous()
        if isinstance(t, (list, tuple)) and t and all(isinstance(u, torch.Tensor) for u in t):
            return [u.contiguous() for u in t]
        return t
    return [one(t) for t in ts]


def no_double_backward(backward_op, op: str) -> None:
    """Give the registered backward op ``adarts::_<op>_backward`` an autograd formula that
    refuses: a gradient of the gradient (``create_graph=True``, then backward through the
    result) raises a ``RuntimeError`` naming ``op``, instead of torch's generic "no autograd
    formula was registered". First-order gradients are unaffected (the backward op runs
    without a graph unless ``create_graph=True``, and the formula runs only when the
    gradient's own gradient is asked for)."""
    def setup_context(ctx, inputs, output):
        pass

    def backward(ctx, *grads):
        raise RuntimeError(f"adarts {op}: double backward is not supported (the backward kernels have no "
                           "gradient of their own); use the plain-PyTorch edge (AttentionMixedOp) or the "
                           "functions of adarts_kernels.ops.reference for higher-order gradients")

    backward_op.register_autograd(backward, setup_context=setup_context)
