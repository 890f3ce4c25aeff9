"""Backend selection: which implementation of the fused ops runs.

``impl`` is one of ``"auto" | "reference" | "cpp" | "cuda" | "triton"``; the default comes
from the ``ADARTS_KERNELS_IMPL`` environment variable (``"auto"`` when unset).

- ``auto`` never fails: on a CUDA tensor it takes the compiled CUDA kernels if built, else
  Triton, else the reference; on a CPU tensor the compiled C++ kernels if built, else the
  reference. (CUDA is preferred over Triton on GPU until the device benchmarks say
  otherwise.)
- an explicit choice that cannot run raises ``RuntimeError`` saying why (extension not
  built, no Triton, no GPU, a CPU tensor given to ``cuda``...).

Resolution reads only Python state (never device data), so it is safe to call while
``torch.compile`` traces: the result is a constant string passed to the ops.
"""
from __future__ import annotations

import os
from typing import Dict, Optional, Tuple

import torch

IMPLS = ("auto", "reference", "cpp", "cuda", "triton")
ENV = "ADARTS_KERNELS_IMPL"


def default_impl() -> str:
    """The ``ADARTS_KERNELS_IMPL`` environment default (``"auto"`` when unset)."""
    name = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if name not in IMPLS:
        raise ValueError(f"{ENV}={name!r} is not a backend; expected one of {list(IMPLS)}")
    return name


def _ext_state() -> Tuple[bool, Optional[str], bool]:
    """(loaded, why not, with CUDA kernels). The first call outside torch.compile tracing makes
    the compiled ops available if it can (:func:`adarts_kernels._ext.ensure`: the installed
    library, else the first-use build), and warns once (or raises, with ADARTS_REQUIRE_EXT=1)
    when they fall back to the reference (then every call raises). While tracing only the
    Python flags are read: the build happens at the first eager call (or at ``backends()``)."""
    from . import _ext
    if not _ext.HAS_EXT and not torch.compiler.is_compiling():
        _ext.ensure()
    return _ext.HAS_EXT, _ext.EXT_ERROR, _ext.has_cuda_kernels()


def prepare(impl: Optional[str] = None) -> None:
    """Make the compiled ops available now, eagerly, when backend ``impl`` (or the environment
    default) may use them: a module calls this when it is built, so that a forward traced by
    torch.compile before any eager call finds them too (tracing never builds). Warns or raises
    as the first resolution would (:func:`_ext_state`)."""
    name = default_impl() if impl is None else str(impl).strip().lower()
    if name in ("auto", "cpp", "cuda") and not torch.compiler.is_compiling():
        _ext_state()


def _triton_state() -> Tuple[bool, Optional[str]]:
    from . import triton as _tr
    return _tr.HAS_TRITON, _tr.TRITON_ERROR


def triton_interpreted() -> bool:
    """True when ``TRITON_INTERPRET=1``: Triton kernels then run on CPU tensors (slowly)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def why_unavailable(name: str, device_type: str) -> Optional[str]:
    """``None`` when backend ``name`` can run on ``device_type`` tensors, else the reason."""
    if name == "reference":
        return None
    if name == "cpp":
        has_ext, err, _ = _ext_state()
        if not has_ext:
            return f"the compiled extension adarts_kernels._C is not available ({err})"
        if device_type != "cpu":
            return f"cpp runs on CPU tensors, got {device_type} tensors"
        return None
    if name == "cuda":
        has_ext, err, has_cuda = _ext_state()
        if not has_ext:
            return f"the compiled extension adarts_kernels._C is not available ({err})"
        if not has_cuda:
            return "the extension was built without CUDA kernels (CPU-only torch or no nvcc at build time)"
        if device_type != "cuda":
            return f"cuda runs on CUDA tensors, got {device_type} tensors"
        return None
    if name == "triton":
        ok, err = _triton_state()
        if not ok:
            return f"triton is not importable ({err})"
        if device_type == "cuda":
            return None
        if device_type == "cpu" and triton_interpreted():
            return None
        return f"triton kernels need CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors), got {device_type} tensors"
    raise ValueError(f"unknown backend {name!r}; expected one of {list(IMPLS)}")


def resolve(impl: Optional[str], device: torch.device) -> str:
    """The concrete backend for tensors on ``device``: ``impl`` (or the environment default)
    checked, or ``auto`` resolved. Raises ``RuntimeError`` for an explicit choice that cannot run."""
    name = default_impl() if impl is None else str(impl).lower()
    if name not in IMPLS:
        raise ValueError(f"unknown backend {impl!r}; expected one of {list(IMPLS)}")
    dev = torch.device(device).type
    if name == "auto":
        order = ("cuda", "triton", "reference") if dev == "cuda" else ("cpp", "reference")
        for cand in order:
            if why_unavailable(cand, dev) is None:
                return cand
        return "reference"
    reason = why_unavailable(name, dev)
    if reason is not None:
        raise RuntimeError(f"backend {name!r} cannot run here: {reason}")
    return name


#: What is not yet measured about the GPU backends: ``auto`` prefers cuda over triton on CUDA
#: tensors by design, not by a timing on a GPU. Drop an entry (and its "note" in
#: :func:`backends`) once benchmarks/device_suite.sh has compared the two on a GPU.
UNMEASURED_ON_GPU: Dict[str, str] = {
    "cuda": "preferred by auto on CUDA tensors; speed against triton not yet measured on a GPU",
    "triton": "auto's choice on CUDA tensors only without the cuda kernels; speed against cuda "
              "not yet measured on a GPU",
}


def backends() -> Dict[str, dict]:
    """For each backend, whether it is available on this install and, if not, why.

    ``{"reference": {"available": True, "reason": None}, "cpp": {...}, "cuda": {...}, "triton": {...}}``;
    cuda and triton are judged for CUDA tensors, cpp for CPU tensors. cuda and triton also
    carry a ``"note"`` (:data:`UNMEASURED_ON_GPU`) while their speed on a GPU is unmeasured:
    ``auto``'s order on CUDA tensors is not yet a measured decision.
    """
    out = {}
    for name, dev in (("reference", "cpu"), ("cpp", "cpu"), ("cuda", "cuda"), ("triton", "cuda")):
        reason = why_unavailable(name, dev)
        if reason is None and dev == "cuda" and not torch.cuda.is_available():
            reason = "no CUDA device visible to torch"
        out[name] = {"available": reason is None, "reason": reason}
        if name in UNMEASURED_ON_GPU:
            out[name]["note"] = UNMEASURED_ON_GPU[name]
    return out
