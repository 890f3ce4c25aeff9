"""The compiled adarts_C operators: load once, report what is available.

``HAS_EXT`` is True when ``torch.ops.adarts_C.*`` are registered (by the installed
``adarts_kernels._C`` or by :func:`jit_build`); otherwise ``EXT_ERROR`` says why. Importing
this module never raises and never warns: the caller decides what a missing extension means.
"""
from __future__ import annotations

import glob
import importlib
import os
import threading
from typing import Optional

HAS_EXT: bool = False
EXT_ERROR: Optional[str] = None
_HAS_CUDA_KERNELS: bool = False

NOT_BUILT = "not built (installed with ADARTS_SKIP_EXT=1 or no compiler)"
OP_NAMES = (
    "attention_score_fwd", "attention_score_bwd",
    "attention_gather_fwd", "attention_gather_bwd",
    "attention_writeback_fwd", "attention_writeback_bwd",
    "mixed_sum_fwd", "mixed_sum_bwd",
)

_CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")
_lock = threading.Lock()


def _missing_ops() -> list:
    """Names of the adarts_C operators that have no registration (all of them on failure)."""
    try:
        import torch
        ns = torch.ops.adarts_C
    except Exception:
        return list(OP_NAMES)
    missing = []
    for name in OP_NAMES:
        try:
            getattr(ns, name)
        except (AttributeError, RuntimeError):
            missing.append(name)
    return missing


def has_cuda_kernels() -> bool:
    """True when the loaded extension registers CUDA kernels for every adarts_C operator
    (built with WITH_CUDA from csrc/cuda/); False for a CPU-only build or no extension.

    A plain Python flag, computed once when the library is loaded: backend resolution calls
    this while torch.compile traces, where a dispatcher query could not be traced."""
    return HAS_EXT and _HAS_CUDA_KERNELS


def _query_cuda_kernels() -> bool:
    try:
        import torch
        has = torch._C._dispatch_has_kernel_for_dispatch_key
        return all(has(f"adarts_C::{name}", "CUDA") for name in OP_NAMES)
    except Exception:
        return False


def _load() -> None:
    global HAS_EXT, EXT_ERROR, _HAS_CUDA_KERNELS
    try:
        import torch  # noqa: F401  (loads libtorch, which the extension links against)
        importlib.import_module("adarts_kernels._C")
    except ModuleNotFoundError as e:
        EXT_ERROR = NOT_BUILT if e.name == "adarts_kernels._C" else f"{type(e).__name__}: {e}"
        return
    except Exception as e:  # ImportError (undefined symbol, ABI mismatch), OSError, ...
        EXT_ERROR = f"{type(e).__name__}: {e}"
        return
    missing = _missing_ops()
    if missing:
        EXT_ERROR = f"adarts_kernels._C loaded but does not register {', '.join(missing)} (stale build?)"
        return
    HAS_EXT, EXT_ERROR = True, None
    _HAS_CUDA_KERNELS = _query_cuda_kernels()


def jit_build(verbose: bool = False) -> bool:
    """Development build: compile csrc/ with torch.utils.cpp_extension.load and register the
    same operators in this process. Returns True when the ops are available afterwards
    (immediately when they already are); raises RuntimeError with the reason otherwise.

    Needs a source checkout (csrc/ next to the package), a C++ compiler and ninja. The build
    goes to torch's extension cache (TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions)
    and is reused while the sources are unchanged.
    """
    global HAS_EXT, EXT_ERROR, _HAS_CUDA_KERNELS
    with _lock:
        if HAS_EXT:
            return True
        sources = [os.path.join(_CSRC, "adarts.cpp")] + sorted(glob.glob(os.path.join(_CSRC, "cpu", "*.cpp")))
        if not os.path.isfile(sources[0]) or len(sources) < 2:
            raise RuntimeError(f"adarts jit_build: C++ sources not found under {_CSRC} (needs a source checkout)")
        try:
            from torch.utils.cpp_extension import load

            load(
                name="adarts_kernels_C_jit",
                sources=sources,
                extra_cflags=["-O3"],
                extra_include_paths=[_CSRC],
                is_python_module=False,
                verbose=verbose,
            )
        except Exception as e:
            raise RuntimeError(f"adarts jit_build failed: {type(e).__name__}: {e}") from e
        missing = _missing_ops()
        if missing:
            raise RuntimeError(f"adarts jit_build: the built library does not register {', '.join(missing)}")
        HAS_EXT, EXT_ERROR = True, None
        _HAS_CUDA_KERNELS = _query_cuda_kernels()   # False: the JIT build is CPU-only
        return True


_load()
