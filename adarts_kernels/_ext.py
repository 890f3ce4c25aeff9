"""The compiled adarts_C operators: found, loaded or built once, and the reason when not.

Two ways the operators arrive, tried in this order:

1. **The installed library** ``adarts_kernels._C`` (built by setup.py), loaded when this module
   is imported, but only when its build record (``_C_build.json`` beside it, see
   ``csrc/build_config.py``) names the running torch and CUDA versions. A library built against
   another torch is never loaded: a C++ extension does not survive a torch upgrade (undefined
   symbols, or a crash), so it is rebuilt instead. A library without a record (built before
   records existed) is tried, and an import error sends it to the same rebuild.
2. **The first-use build** (:func:`ensure`, called by the backend resolution the first time a
   fused op or ``backends()`` asks): ``torch.utils.cpp_extension.load`` compiles the package's
   copy of ``csrc/`` (``adarts_kernels/_csrc`` in a wheel, ``csrc/`` beside the package in a
   checkout) with the flags of setup.py into a per-user cache,
   ``$ADARTS_CACHE_DIR`` or ``~/.cache/adarts_kernels`` (``$XDG_CACHE_HOME`` respected), one
   folder per torch version, CUDA version, Python, compiler and source hash. A file lock makes
   concurrent processes (torchrun ranks) build once: the others wait, then load the result. A
   later process loads the cached library in milliseconds. One line on stderr says what is built
   and one how long it took. With CUDA torch and nvcc the CUDA kernels are built too.

When neither works (no compiler, no ninja, no sources, ``ADARTS_JIT=0``, a failed build), one
:class:`ExtensionFallbackWarning` names the consequence: the fused ops run on the plain-PyTorch
reference, same results, slower. ``ADARTS_REQUIRE_EXT=1`` turns that fallback into a
``RuntimeError`` (CI sets it). ``HAS_EXT`` and ``EXT_ERROR`` (the reason) describe the state;
importing this module never builds, never raises and never warns.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import warnings
from typing import Callable, Optional

HAS_EXT: bool = False
EXT_ERROR: Optional[str] = None
#: Where the loaded operators came from: ``"prebuilt"`` (adarts_kernels._C), ``"cached"`` (a
#: library of the first-use build made earlier), ``"built"`` (built by this process), or None.
EXT_ORIGIN: Optional[str] = None
#: The path of the loaded library, or None.
EXT_PATH: Optional[str] = None
_HAS_CUDA_KERNELS: bool = False
_ENSURED: bool = False
_WARNED: bool = False

NOT_BUILT = "not built (this install has no prebuilt adarts_kernels._C)"
ENV_JIT = "ADARTS_JIT"
ENV_REQUIRE = "ADARTS_REQUIRE_EXT"
ENV_CACHE = "ADARTS_CACHE_DIR"
#: The name of the first-use build's library (torch.utils.cpp_extension.load name=).
JIT_NAME = "adarts_kernels_C"
OP_NAMES = (
    "attention_score_fwd", "attention_score_bwd",
    "attention_gather_fwd", "attention_gather_bwd",
    "attention_writeback_fwd", "attention_writeback_bwd",
    "mixed_sum_fwd", "mixed_sum_bwd",
)
#: Search step of the fused supernet on the reference backend over the same step on the
#: compiled C++ kernels: benchmarks/results/reference_vs_cpp_cpu.json (C=16, 8 cells, 32x32,
#: batch 16, 2 threads). Quoted by the fallback warning.
REFERENCE_SLOWDOWN = "about 1.4x"

_PKG = os.path.dirname(os.path.abspath(__file__))
_lock = threading.RLock()


class ExtensionFallbackWarning(UserWarning):
    """The compiled kernels are unavailable: the fused ops run on the reference implementation."""


def _env_flag(name: str, default: str = "") -> str:
    return os.environ.get(name, default).strip().lower()


def require_ext() -> bool:
    """True when ``ADARTS_REQUIRE_EXT=1``: any fallback to the reference is an error."""
    return _env_flag(ENV_REQUIRE) in ("1", "true", "yes", "on")


def jit_enabled() -> bool:
    """False when ``ADARTS_JIT=0`` (or false/no/off): no first-use build."""
    return _env_flag(ENV_JIT, "1") not in ("0", "false", "no", "off")


# ----------------------------------------------------------------------------- loading state

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
    """True when the loaded library registers CUDA kernels for every adarts_C operator (built
    with WITH_CUDA from csrc/cuda/); False for a CPU-only build or no library.

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


def _loaded(origin: str, path: Optional[str]) -> None:
    global HAS_EXT, EXT_ERROR, EXT_ORIGIN, EXT_PATH, _HAS_CUDA_KERNELS
    HAS_EXT, EXT_ERROR, EXT_ORIGIN, EXT_PATH = True, None, origin, path
    _HAS_CUDA_KERNELS = _query_cuda_kernels()


def runtime_versions() -> dict:
    """The running torch: ``{"torch": torch.__version__, "cuda": torch.version.cuda}``."""
    import torch
    return {"torch": str(torch.__version__), "cuda": torch.version.cuda}


def record_mismatch(record: Optional[dict], running: dict) -> Optional[str]:
    """None when a build record fits the running torch (or there is no record), else why not."""
    if not record:
        return None
    built = (record.get("torch"), record.get("cuda"))
    if built == (running["torch"], running["cuda"]):
        return None
    return (f"the prebuilt adarts_kernels._C was built for torch {built[0]} (CUDA {built[1]}), "
            f"this is torch {running['torch']} (CUDA {running['cuda']})")


def _read_record(folder: str) -> Optional[dict]:
    try:
        with open(os.path.join(folder, "_C_build.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _load_prebuilt() -> None:
    """Import adarts_kernels._C when it is installed and fits the running torch; else set why not."""
    global EXT_ERROR
    try:
        import torch  # noqa: F401  (loads libtorch, which the library links against)
        spec = importlib.util.find_spec("adarts_kernels._C")
    except Exception as e:
        EXT_ERROR = f"{type(e).__name__}: {e}"
        return
    if spec is None or not spec.origin:
        EXT_ERROR = NOT_BUILT
        return
    mismatch = record_mismatch(_read_record(os.path.dirname(spec.origin)), runtime_versions())
    if mismatch:
        EXT_ERROR = mismatch
        return
    try:
        importlib.import_module("adarts_kernels._C")
    except Exception as e:  # ImportError (undefined symbol, ABI mismatch), OSError, ...
        EXT_ERROR = f"the prebuilt adarts_kernels._C does not load ({type(e).__name__}: {e})"
        return
    missing = _missing_ops()
    if missing:
        EXT_ERROR = f"adarts_kernels._C loaded but does not register {', '.join(missing)} (stale build?)"
        return
    _loaded("prebuilt", spec.origin)


# ----------------------------------------------------------------------------- first-use build

class JitUnavailable(RuntimeError):
    """The first-use build cannot run or failed; the message is the reason."""


def source_dir(pkg: str = _PKG) -> Optional[str]:
    """The folder with the extension's sources: a wheel's copy ``adarts_kernels/_csrc``, else a
    checkout's ``csrc/`` beside the package; None when neither is there."""
    for folder in (os.path.join(pkg, "_csrc"), os.path.join(os.path.dirname(pkg), "csrc")):
        if os.path.isfile(os.path.join(folder, "adarts.cpp")):
            return folder
    return None


def cache_root() -> str:
    """``$ADARTS_CACHE_DIR``, else ``$XDG_CACHE_HOME/adarts_kernels``, else ``~/.cache/adarts_kernels``."""
    if os.environ.get(ENV_CACHE):
        return os.path.abspath(os.path.expanduser(os.environ[ENV_CACHE]))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "adarts_kernels")


def _load_file(name: str, path: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def compiler() -> Optional[str]:
    """The C++ compiler torch's build uses ($CXX, else c++), when it is on PATH; else None."""
    cxx = (os.environ.get("CXX") or ("cl" if os.name == "nt" else "c++")).split()[0]
    return shutil.which(cxx)


def _compiler_id(cxx: str) -> str:
    try:
        out = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60)
        first = (out.stdout or out.stderr).strip().splitlines()
        return first[0] if first else cxx
    except (OSError, subprocess.SubprocessError):
        return cxx


def _short_compiler(ident: str) -> str:
    m = re.search(r"(g\+\+|gcc|clang|c\+\+)[^\d]*(\d+(?:\.\d+)*)", ident)
    return f"{m.group(1)} {m.group(2)}" if m else ident.split()[0]


def jit_plan(csrc: str, torch_mod=None, cuda_home: Optional[str] = "auto", cxx_id: str = "") -> dict:
    """What the first-use build compiles and where it goes: a dict of the arguments of
    ``torch.utils.cpp_extension.load`` plus ``key`` (the cache folder's name) and ``label``.

    The key hashes every input that changes the binary: the sources and flag files, the flags,
    torch's version and git hash and C++ ABI, the CUDA version, the Python version, the machine
    and the compiler's ``--version`` line. ``torch_mod``/``cuda_home`` are injectable so that the
    CUDA arm of this function runs in CPU tests.
    """
    import platform

    if torch_mod is None:
        import torch as torch_mod
    if cuda_home == "auto":
        from torch.utils.cpp_extension import CUDA_HOME as cuda_home
    bc = _load_file("adarts_build_config", os.path.join(csrc, "build_config.py"))
    nv = _load_file("adarts_nvcc_flags", os.path.join(csrc, "cuda", "nvcc_flags.py"))
    debug = nv.debug_build()
    info = torch_mod.__config__.parallel_info()
    cflags = bc.cxx_flags(sys.platform, info, debug)
    ldflags = bc.link_flags(sys.platform, info, debug)
    sources = bc.cpu_sources(csrc)
    cuda = bc.cuda_sources(csrc) if torch_mod.version.cuda is not None and cuda_home is not None else []
    cuda_cflags = []
    if cuda:
        cflags = cflags + ["-DWITH_CUDA"]
        cuda_cflags = ["-DWITH_CUDA"] + nv.nvcc_flags(debug)
        sources = sources + cuda
    h = hashlib.sha256()
    for path in sorted(set(bc.build_files(csrc))):
        h.update(os.path.relpath(path, csrc).encode() + b"\0")
        with open(path, "rb") as f:
            h.update(f.read())
    abi = getattr(torch_mod._C, "_GLIBCXX_USE_CXX11_ABI", None)
    for part in (cflags, ldflags, cuda_cflags, torch_mod.__version__, torch_mod.version.git_version, abi,
                 torch_mod.version.cuda, sys.version_info[:2], platform.machine(), cxx_id,
                 os.environ.get("TORCH_CUDA_ARCH_LIST", "") if cuda else ""):
        h.update(repr(part).encode() + b"\0")
    cuda_tag = f"cu{torch_mod.version.cuda}" if cuda else "cpu"
    key = f"torch{torch_mod.__version__}-{cuda_tag}-py{sys.version_info[0]}{sys.version_info[1]}-{h.hexdigest()[:16]}"
    key = re.sub(r"[^A-Za-z0-9._+-]", "_", key)
    label = f"the C++ CPU{' and CUDA' if cuda else ''} kernels for torch {torch_mod.__version__}"
    if cxx_id:
        label += f" with {_short_compiler(cxx_id)}"
    return {"name": JIT_NAME, "sources": sources, "extra_cflags": cflags, "extra_ldflags": ldflags,
            "extra_include_paths": [csrc], "with_cuda": bool(cuda),
            "extra_cuda_cflags": cuda_cflags, "key": key, "label": label}


@contextlib.contextmanager
def _file_lock(path: str, waiting: Callable[[], None]):
    """An exclusive lock on ``path`` held by this process (released by the system if it dies);
    calls ``waiting()`` once when another process holds it."""
    try:
        import fcntl
    except ImportError:                      # no flock: torch's own build lock still applies
        yield
        return
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            waiting()
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _say(msg: str) -> None:
    print(f"adarts_kernels: {msg}", file=sys.stderr, flush=True)


def _lib_path(folder: str) -> str:
    return os.path.join(folder, JIT_NAME + (".pyd" if os.name == "nt" else ".so"))


def jit_build(verbose: bool = False, *, load: Optional[Callable] = None, csrc: Optional[str] = None) -> bool:
    """Build (or load from the cache) the operators from the package's sources and register them
    in this process. Returns True when the ops are available afterwards (at once when they
    already are); raises :class:`JitUnavailable` with the reason otherwise.

    ``load`` replaces ``torch.utils.cpp_extension.load`` (tests). The library lands in
    ``cache_root()/<jit_plan key>/``, with ``build.json`` written last as the mark of a
    complete build.
    """
    with _lock:
        if HAS_EXT:
            return True
        csrc = csrc or source_dir()
        if csrc is None:
            raise JitUnavailable(f"the C++ sources are not in this install (neither {_PKG}/_csrc nor a checkout's "
                                 "csrc/ beside the package)")
        cxx = compiler()
        if cxx is None:
            raise JitUnavailable("no C++ compiler found ($CXX, else c++, on PATH)")
        import torch
        from torch.utils import cpp_extension

        if load is None:
            if not cpp_extension.is_ninja_available():
                raise JitUnavailable("ninja is not installed (pip install ninja)")
            load = cpp_extension.load
        plan = jit_plan(csrc, cxx_id=_compiler_id(cxx))
        folder = os.path.join(cache_root(), plan.pop("key"))
        label = plan.pop("label")
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as e:
            raise JitUnavailable(f"cannot create the build cache {folder} ({e}); set {ENV_CACHE}") from e
        done = os.path.join(folder, "build.json")
        with _file_lock(folder + ".lock", lambda: _say(f"waiting for another process building {label} in {folder}")):
            lib = _lib_path(folder)
            if os.path.isfile(done) and os.path.isfile(lib):
                try:
                    torch.ops.load_library(lib)
                except Exception as e:
                    raise JitUnavailable(f"the cached library {lib} does not load ({type(e).__name__}: {e}); "
                                         f"delete {folder} to rebuild") from e
                origin = "cached"
            else:
                # We hold the lock: a 'lock' file of torch's build in this folder is left over
                # from a process that died mid-build, and would make torch wait forever.
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(folder, "lock"))
                _say(f"building {label} into {folder} (about a minute, once per torch version) ...")
                t0 = time.perf_counter()
                try:
                    lib = load(build_directory=folder, is_python_module=False, verbose=verbose, **plan) or lib
                except Exception as e:
                    raise JitUnavailable(f"the build of {label} failed ({type(e).__name__}: {e})") from e
                seconds = time.perf_counter() - t0
                tmp = f"{done}.tmp{os.getpid()}"
                with open(tmp, "w") as f:
                    json.dump({**runtime_versions(), "seconds": round(seconds, 1), "library": lib,
                               "with_cuda": plan["with_cuda"]}, f, indent=1)
                os.replace(tmp, done)
                _say(f"built {label} in {seconds:.0f} s ({lib})")
                origin = "built"
        missing = _missing_ops()
        if missing:
            raise JitUnavailable(f"the built library {lib} does not register {', '.join(missing)}")
        _loaded(origin, lib)
        return True


def fallback_message(reason: str, required: bool = False) -> str:
    """The warning of a fallback to the reference, or the error under ADARTS_REQUIRE_EXT=1."""
    if required:
        return (f"adarts_kernels: the compiled kernels are required ({ENV_REQUIRE}=1) but not available: "
                f"{reason}")
    return (f"adarts_kernels: the compiled kernels are not available ({reason}): the fused ops run on the "
            f"reference implementation: {REFERENCE_SLOWDOWN} slower search steps on CPU, same results. "
            f"{ENV_REQUIRE}=1 makes this an error.")


def ensure() -> bool:
    """Make the compiled operators available if at all possible; True when they are.

    Called at the first use of a fused op (backend resolution) and by ``backends()``. The first
    call tries the first-use build (unless ``ADARTS_JIT=0``); later calls return at once. On
    failure: one :class:`ExtensionFallbackWarning` (the first time), or, with
    ``ADARTS_REQUIRE_EXT=1``, a ``RuntimeError`` on every call.
    """
    global _ENSURED, EXT_ERROR, _WARNED
    if not _ENSURED:
        with _lock:                          # other threads wait for the first one's build
            if not _ENSURED:
                try:
                    if not HAS_EXT and not jit_enabled():
                        EXT_ERROR = f"{EXT_ERROR}; {ENV_JIT}=0 turns the first-use build off"
                    elif not HAS_EXT:
                        try:
                            jit_build()
                        except JitUnavailable as e:
                            EXT_ERROR = f"{EXT_ERROR}; first-use build: {e}"
                finally:
                    _ENSURED = True
    if HAS_EXT:
        return True
    if require_ext():
        raise RuntimeError(fallback_message(EXT_ERROR, required=True))
    if not _WARNED:
        _WARNED = True
        warnings.warn(fallback_message(EXT_ERROR), ExtensionFallbackWarning, stacklevel=3)
    return False


_load_prebuilt()
