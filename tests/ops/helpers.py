"""Helpers shared by the per-op tests (``tests/ops/test_<op>.py``).

Every op test is parametrised over the backends with :func:`backend_params`: ``reference``
and ``cpp`` on CPU tensors, ``triton`` on CUDA tensors (or interpreted on CPU tensors with
``TRITON_INTERPRET=1``, which ``tests/conftest.py`` sets where no GPU is), ``cuda`` on CUDA
tensors. A backend that cannot run is skipped with the reason, or fails where CI demands it
(``ADARTS_REQUIRE_EXT=1`` for cpp, ``ADARTS_REQUIRE_TRITON=1`` for triton).
"""
from __future__ import annotations

import os
from typing import List, Optional

import pytest
import torch

from adarts_kernels.backend import why_unavailable

BACKENDS = ("reference", "cpp", "triton", "cuda")
LOW = (torch.bfloat16, torch.float16)
DTYPES = (torch.float64, torch.float32) + LOW

#: (rtol, atol) of a backend against the reference in the same dtype: both accumulate in
#: float32 (float64 for float64) and round once, so they differ by the reductions' order.
TOL = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}

_REQUIRED = {"cpp": "ADARTS_REQUIRE_EXT", "triton": "ADARTS_REQUIRE_TRITON"}


def device_of(impl: str) -> str:
    """The device a backend's tests run on: CUDA for ``cuda`` (and ``triton`` where a GPU
    is), CPU otherwise."""
    if impl == "cuda" or (impl == "triton" and torch.cuda.is_available()):
        return "cuda"
    return "cpu"


def unavailable(impl: str) -> Optional[str]:
    """Why ``impl`` cannot run its tests here, or ``None``."""
    dev = device_of(impl)
    if dev == "cuda" and not torch.cuda.is_available():
        return "no CUDA device visible to torch"
    return why_unavailable(impl, dev)


def backend_params(impls=BACKENDS) -> List:
    """``pytest.param`` per backend, ``gpu``-marked on CUDA. Use the argument name ``impl``:
    ``tests/ops/conftest.py`` then skips a backend that cannot run here (with the reason),
    or fails the test where the environment requires that backend (CI)."""
    return [pytest.param(impl, marks=[pytest.mark.gpu] if device_of(impl) == "cuda" else [], id=impl)
            for impl in impls]


def require(impl: str) -> None:
    """Inside a test: skip (or fail where required) when ``impl`` cannot run."""
    reason = unavailable(impl)
    if reason is None:
        return
    env = _REQUIRED.get(impl)
    if env is not None and os.environ.get(env) == "1" and device_of(impl) == "cpu":
        pytest.fail(f"{reason} [{env}=1]")
    pytest.skip(reason)


# ----------------------------------------------------------------------------- inputs

def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(shape, g: torch.Generator, dtype=torch.float32, device="cpu", scale: float = 1.0) -> torch.Tensor:
    """Fresh normal values, drawn in float64 on the CPU (the same values for every dtype)."""
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(device=device, dtype=dtype)


def attention_values(B: int, C: int, g: torch.Generator, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """A channel attention ``a: (B, C)`` in ``(0.05, 0.95)`` (a sigmoid's range, away from 0)."""
    return (torch.rand(B, C, generator=g, dtype=torch.float64) * 0.9 + 0.05).to(device=device, dtype=dtype)


def rand_idx(C: int, n: int, g: torch.Generator, device="cpu") -> torch.Tensor:
    """``n`` distinct channels of ``C`` in random (unsorted) order, int64."""
    return torch.randperm(C, generator=g)[:n].to(device)


def noncontig(t: torch.Tensor) -> torch.Tensor:
    """The same values in a non-contiguous layout (channels last in memory for 4-d tensors,
    a strided view otherwise; 0-d tensors are returned as they are)."""
    if t.dim() == 0:
        return t
    if t.dim() == 4:
        v = t.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
        if v.is_contiguous():   # a size-1 dimension: fall back to a strided view
            v = torch.stack([t, torch.zeros_like(t)], dim=-1)[..., 0]
    else:
        v = torch.stack([t, torch.zeros_like(t)], dim=-1)[..., 0]
    assert torch.equal(v, t)
    return v


def misaligned(t: torch.Tensor) -> torch.Tensor:
    """The same values at a storage offset of one element (no vectorised path applies)."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    v = buf[1:].view(t.shape)
    v.copy_(t)
    return v


def poison_heap(*like: torch.Tensor) -> None:
    """Allocate NaN-filled blocks of the outputs' sizes and free them, so that an output
    buffer the allocator hands out again starts as NaN: an element a kernel forgets to write
    shows up in the whole-tensor comparisons."""
    for t in like:
        for dt in (torch.float64, torch.float32, torch.float16):
            torch.full((max(t.numel(), 1),), float("nan"), dtype=dt, device=t.device)


def upcast(t):
    """Floating tensors (also inside lists) as float64; anything else unchanged: the inputs of
    the float64 reference that low-precision results are measured against."""
    if isinstance(t, (list, tuple)):
        return [upcast(u) for u in t]
    if isinstance(t, torch.Tensor) and t.is_floating_point():
        return t.double()
    return t


# ----------------------------------------------------------------------------- comparisons

def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str = "",
                 equal_nan: bool = False) -> None:
    """Same shape, dtype and device type; values within :data:`TOL` of ``dtype``."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} vs {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} vs {expected.dtype}"
    if not actual.is_floating_point():
        assert torch.equal(actual.cpu(), expected.cpu()), f"{what}: {actual.tolist()} vs {expected.tolist()}"
        return
    if not equal_nan:
        assert not torch.isnan(actual).any() or torch.isnan(expected).any(), f"{what}: NaN (an element never written?)"
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(actual.cpu(), expected.cpu(), rtol=rtol, atol=atol, equal_nan=equal_nan,
                               msg=lambda m: f"{what}: {m}")


#: Past correct rounding, a low-precision result may err by at most this many units in the
#: last place of the output's largest value (plus twice the reference's own excess): what a
#: float32 accumulation in another order adds. A 1e-4 relative error before the final
#: rounding to float16 (0.1 to 0.2 ulp) or a float16 accumulation exceeds it.
EXCESS_ULP = 1 / 64


def ulp(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of ``dtype`` at each value of ``t`` (float64): ``eps * 2**floor(log2|t|)``,
    the subnormal spacing below ``tiny``."""
    fi = torch.finfo(dtype)
    mag = t.abs().clamp_min(fi.tiny)
    return torch.exp2(torch.floor(torch.log2(mag))) * fi.eps


def rounding_excess(v: torch.Tensor, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """How far each value of ``v`` lies beyond the correctly rounded ``t`` (float64): its error
    against ``t`` less half a unit in the last place of ``dtype`` at ``t``, at least 0."""
    return ((v.double() - t).abs() - ulp(t, dtype) / 2).clamp_min(0)


def assert_low_precision(ours, ref, truth, dtype: torch.dtype, what: str = "") -> None:
    """bfloat16 / float16: ``truth`` is the reference in float64 on the same rounded inputs
    (:func:`upcast`); ``ref`` the reference's own result in ``dtype`` (float32 accumulation,
    one rounding). For each output, in its own dtype (low-precision statistics are float32):

    - the largest error of ``ours`` against ``truth`` is at most twice that of ``ref`` plus
      one unit in the last place of the largest value;
    - outputs in ``dtype`` (rounded once from a float32 accumulation): the largest excess past correct rounding (:func:`rounding_excess`) is at most twice that
      of ``ref`` plus :data:`EXCESS_ULP` units in the last place of the largest value.

    The second bound is what a small systematic error (a 1e-4 relative gradient error, a
    half-precision accumulation) fails: correct rounding leaves at most half a unit in the
    last place, which hides such errors from any bound on the error itself."""
    for i, (o, r, t) in enumerate(zip(ours, ref, truth)):
        assert o.dtype == r.dtype and o.shape == r.shape, (what, i, o.dtype, o.shape, r.dtype, r.shape)
        if not o.is_floating_point():
            assert torch.equal(o.cpu(), r.cpu()), (what, i)
            continue
        if not o.numel():
            continue
        odt = o.dtype
        o, r, t = o.cpu().double(), r.cpu().double(), t.cpu().double()
        top = t.abs().max().item()
        unit = torch.finfo(odt).eps * top + 1e-300
        err, base = (o - t).abs().max().item(), (r - t).abs().max().item()
        assert err <= 2 * base + unit, f"{what}[{i}] {dtype}: error {err:.3g} vs the reference's own {base:.3g}"
        if odt != dtype:     # float32 statistics: accumulated in their own dtype, no final rounding
            continue
        ex_o = rounding_excess(o, t, odt).max().item()
        ex_r = rounding_excess(r, t, odt).max().item()
        assert ex_o <= 2 * ex_r + EXCESS_ULP * unit, (
            f"{what}[{i}] {dtype}: {ex_o / unit:.3g} ulp (of the largest value {top:.3g}) past correct rounding "
            f"vs the reference's own {ex_r / unit:.3g} ulp")


def assert_topk(idx: torch.Tensor, ref_idx: torch.Tensor, score: torch.Tensor, tol: float) -> None:
    """``idx`` equal to ``ref_idx``, except where the two positions hold scores equal within ``tol``."""
    assert idx.dtype == torch.int64 and idx.shape == ref_idx.shape
    idx, ref_idx, score = idx.cpu(), ref_idx.cpu(), score.cpu()
    if torch.equal(idx, ref_idx):
        return
    diff = (score[idx] - score[ref_idx]).abs().max().item()
    assert diff <= tol, f"top-k differs beyond near-ties: {idx.tolist()} vs {ref_idx.tolist()}"


# attention ops

def entry(impl: str, name: str):
    """Backend ``impl``'s own entry point ``name`` (``"attention_gather_fwd"``...): the
    reference function, ``torch.ops.adarts_C.<name>`` for cpp / cuda, or the Triton launcher
    from its kernel module (``adarts_kernels.triton.attention_gather``...)."""
    from adarts_kernels.ops import reference as R
    if impl == "reference":
        return getattr(R, name)
    if impl in ("cpp", "cuda"):
        return getattr(torch.ops.adarts_C, name)
    if impl == "triton":
        import importlib
        module = importlib.import_module("adarts_kernels.triton." + name.rsplit("_", 1)[0])
        return getattr(module, name)
    raise ValueError(f"unknown backend {impl!r}")


def backend_cases(cases) -> List:
    """Like :func:`backend_params` for tests parametrised over ``impl`` and a case together
    (one backend may need other shapes than another): ``cases`` holds ``(impl, case_id,
    *values)``; each becomes ``pytest.param(impl, *values)``, ``gpu``-marked on CUDA."""
    return [pytest.param(impl, *values, marks=[pytest.mark.gpu] if device_of(impl) == "cuda" else [],
                         id=f"{impl}-{case_id}")
            for impl, case_id, *values in cases]


#: The layouts a backend's entry point takes beyond the contiguous one: Triton launchers
#: accept strided tensors, the CUDA kernels have scalar paths for misaligned storage.
LAYOUTS = {"reference": ("contiguous",), "cpp": ("contiguous",), "triton": ("contiguous", "noncontig"),
           "cuda": ("contiguous", "misaligned")}


def laid_out(t: torch.Tensor, layout: str) -> torch.Tensor:
    """``t`` (same values) contiguous, non-contiguous or at a misaligned storage offset."""
    if layout == "noncontig":
        return noncontig(t)
    if layout == "misaligned":
        return misaligned(t)
    return t


def n_values(C: int, impl: str = "cpp") -> List[int]:
    """Selection sizes to try: 1, about C/4 and C (interpreted Triton: only the middle one
    where C > 4, to stay fast)."""
    vals = sorted({1, max(C // 4, 1), C})
    if interpreted(impl) and C > 4:
        return [max(C // 4, 1)]
    return vals


def interpreted(impl: str) -> bool:
    """``impl`` runs in Triton's interpreter here (slow: keep its cases few and tiny)."""
    return impl == "triton" and device_of(impl) == "cpu"


def score_weights(C: int, g: torch.Generator, dtype=torch.float32, device="cpu"):
    """The scoring MLP ``w1: (C // 2, C)``, ``w2: (C, C // 2)`` (at least one hidden unit),
    scaled to keep the pre-activations of order one."""
    R_ = max(C // 2, 1)
    return randn((R_, C), g, dtype, device, scale=C ** -0.5), randn((C, R_), g, dtype, device, scale=R_ ** -0.5)


class kernel_call:
    """Around a direct call of a backend's entry point: outputs start poisoned (NaN), so an
    element the kernel never writes fails the comparison (Triton: the launchers' own
    ``POISON_OUTPUTS``; cpp / cuda: :func:`poison_heap` of blocks the size of ``like``), and on
    ``cuda`` any host synchronisation inside raises."""

    def __init__(self, impl: str, *like: torch.Tensor):
        self.impl, self.like, self.inner, self.before = impl, like, None, None

    def __enter__(self):
        if self.impl == "triton":
            import adarts_kernels.triton as tr
            self.before, tr.POISON_OUTPUTS = tr.POISON_OUTPUTS, True
            return self
        poison_heap(*self.like)
        if self.impl == "cuda":
            from gpu_helpers import no_host_sync
            self.inner = no_host_sync()
            self.inner.__enter__()
        return self

    def __exit__(self, *exc):
        if self.impl == "triton":
            import adarts_kernels.triton as tr
            tr.POISON_OUTPUTS = self.before
        if self.inner is not None:
            self.inner.__exit__(*exc)
        return False


def close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str = "",
          scale: float = 1.0, equal_nan: bool = False) -> None:
    """:func:`assert_close` with the absolute tolerance times ``scale`` (sums of many terms)."""
    if scale == 1.0 or not actual.is_floating_point():
        return assert_close(actual, expected, dtype, what, equal_nan)
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, (what, actual.shape, expected.shape)
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(actual.cpu(), expected.cpu(), rtol=rtol, atol=atol * scale, equal_nan=equal_nan,
                               msg=lambda m: f"{what}: {m}")


def check_outputs(ours, ref_fn, args, dtype: torch.dtype, what: str = "", scales=None) -> None:
    """``ours`` (a tuple of tensors) against ``ref_fn(*args)``, the reference on the same
    inputs: float64 / float32 within :data:`TOL` (absolute tolerance times ``scales[i]``);
    bfloat16 / float16 by the rules of :func:`assert_low_precision` against the reference in
    float64 on the same rounded inputs."""
    ref = tuple(ref_fn(*args))
    assert len(ours) == len(ref), (what, len(ours), len(ref))
    if dtype in LOW:
        assert_low_precision(ours, ref, tuple(ref_fn(*upcast(list(args)))), dtype, what)
        return
    for i, (o, r) in enumerate(zip(ours, ref)):
        close(o, r, dtype, f"{what}[{i}]", scale=1.0 if scales is None else scales[i])


def scores(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """The channel scores ``a.sum(0)`` the top-k ranks, in float64 on the CPU."""
    from adarts_kernels.ops import reference as R
    return R.attention_score_fwd(x.double().cpu(), w1.double().cpu(), w2.double().cpu(), x.shape[1])[0].sum(0)


def assert_refused(exc, op: str, words: str, fn) -> None:
    """``fn()`` raises ``exc`` whose message names ``op`` and contains ``words``."""
    with pytest.raises(exc) as info:
        fn()
    msg = str(info.value)
    assert op in msg and words in msg, msg
