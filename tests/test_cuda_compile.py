"""The CUDA sources compile (no GPU needed: compile only, never run).

- each ``csrc/cuda/*.cu`` compiles with ``nvcc -c -std=c++17 -arch=sm_90 -O2`` and defines
  every launcher that ``csrc/cuda/kernels.h`` declares;
- ``kernels.h`` is plain C++ (the torch binding includes it without nvcc);
- every torch binding ``csrc/cuda/*.cpp`` (``<op>_binding.cpp``) type-checks
  against the installed torch headers with ``-DWITH_CUDA`` (when the CUDA runtime headers are
  found next to nvcc).

Skipped when ``nvcc`` is not on PATH, unless ``ADARTS_REQUIRE_NVCC=1`` (then a failure).
The .cu files include no torch header, so a CPU-only torch is enough.
"""
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CUDA_DIR = ROOT / "csrc" / "cuda"
CU_FILES = sorted(p.name for p in CUDA_DIR.glob("*.cu"))  # every kernel source (setup.py builds them all)
BINDING_FILES = sorted(p.name for p in CUDA_DIR.glob("*.cpp"))  # every torch binding (setup.py builds them all)
NVCC_FLAGS = ["-c", "-std=c++17", "-arch=sm_90", "-O2"]
TIMEOUT_S = 300


def _nvcc() -> str:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        if os.environ.get("ADARTS_REQUIRE_NVCC") == "1":
            pytest.fail("ADARTS_REQUIRE_NVCC=1 but nvcc is not on PATH")
        pytest.skip("nvcc is not on PATH (set ADARTS_REQUIRE_NVCC=1 to make this a failure)")
    return nvcc


def _run(cmd, **kw):
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, **kw)
    return proc, time.perf_counter() - t0


def _declared_launchers():
    """Names of the functions kernels.h declares (``int name(`` / ``size_t name(``)."""
    text = (CUDA_DIR / "kernels.h").read_text()
    names = re.findall(r"^(?:int|size_t)\s+(\w+)\s*\(", text, flags=re.M)
    assert len(names) >= 10, f"could not parse the launchers of kernels.h: {names}"
    return names


def _defined_symbols(obj: Path):
    nm = shutil.which("nm")
    if nm is None:
        return None
    proc = subprocess.run([nm, "-C", "--defined-only", str(obj)], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        return None
    return proc.stdout


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """Compiles the .cu files concurrently (one nvcc per file, one arch each)."""
    nvcc = _nvcc()
    out = tmp_path_factory.mktemp("nvcc")
    t0 = time.perf_counter()
    procs = {}
    for name in CU_FILES:
        obj = out / (Path(name).stem + ".o")
        cmd = [nvcc, *NVCC_FLAGS, "-o", str(obj), str(CUDA_DIR / name)]
        procs[name] = (cmd, obj, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = {}
    for name, (cmd, obj, p) in procs.items():
        try:
            so, se = p.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            p.kill()
            so, se = p.communicate()
            se += f"\n(killed after {TIMEOUT_S} s)"
        results[name] = (cmd, obj, p.returncode, so + se)
    elapsed = time.perf_counter() - t0
    print(f"\nnvcc: compiled {len(CU_FILES)} files in {elapsed:.1f} s (concurrently)", file=sys.stderr)
    return results


def test_every_kernel_source_is_compiled():
    """The glob picks up each operator's kernel source (no nvcc needed)."""
    for name in ("attention_score_kernel.cu", "attention_gather_kernel.cu", "attention_writeback_kernel.cu",
                 "mixed_sum_kernel.cu"):
        assert name in CU_FILES, (name, CU_FILES)
    for name in ("attention_score_binding.cpp", "attention_gather_binding.cpp", "attention_writeback_binding.cpp",
                 "mixed_sum_binding.cpp"):
        assert name in BINDING_FILES, (name, BINDING_FILES)


@pytest.mark.parametrize("name", CU_FILES)
def test_cu_compiles(compiled, name):
    cmd, obj, rc, log = compiled[name]
    assert rc == 0, f"nvcc failed ({rc}) for {name}:\n$ {' '.join(cmd)}\n{log}"
    assert obj.exists() and obj.stat().st_size > 0
    if "warning" in log.lower():
        print(f"nvcc warnings for {name}:\n{log}", file=sys.stderr)


def test_every_declared_launcher_is_defined(compiled):
    for name, (_, _, rc, log) in compiled.items():
        assert rc == 0, f"nvcc failed for {name}:\n{log}"
    symbols = []
    for _, obj, _, _ in compiled.values():
        s = _defined_symbols(obj)
        if s is None:
            pytest.skip("nm is not available to list the object files' symbols")
        symbols.append(s)
    text = "\n".join(symbols)
    missing = [n for n in _declared_launchers() if f"adarts::cuda::{n}(" not in text]
    assert not missing, f"declared in kernels.h but defined in no .cu file: {missing}"


def test_kernels_header_is_plain_cpp(tmp_path):
    """kernels.h compiles with the host C++ compiler alone (no CUDA or torch include path)."""
    _nvcc()
    cxx = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no host C++ compiler")
    src = tmp_path / "use_header.cpp"
    src.write_text('#include "kernels.h"\nint main() { return static_cast<int>(adarts::cuda::DType::F64) - 3; }\n')
    proc, _ = _run([cxx, "-std=c++17", "-fsyntax-only", "-Wall", "-Werror", f"-I{CUDA_DIR}", str(src)])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _cuda_include_dir(nvcc: str):
    """The CUDA runtime headers' directory, as nvcc itself reports it."""
    src_dir = Path(os.environ.get("TMPDIR", "/tmp"))
    proc = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull], capture_output=True,
                          text=True, timeout=60, cwd=src_dir)
    for m in re.finditer(r'INCLUDES="?-I"?([^"\s]+)', proc.stdout + proc.stderr):
        d = Path(m.group(1))
        if (d / "cuda_runtime_api.h").exists():
            return d
    for env in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(env) and (Path(os.environ[env]) / "include" / "cuda_runtime_api.h").exists():
            return Path(os.environ[env]) / "include"
    return None


@pytest.mark.parametrize("name", BINDING_FILES)
def test_bindings_typecheck(tmp_path, name):
    """A binding (-DWITH_CUDA) against the installed torch headers: a syntax and type
    check only. A CPU-only torch lacks one generated CUDA header, which is stubbed here."""
    nvcc = _nvcc()
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no host C++ compiler")
    cuda_inc = _cuda_include_dir(nvcc)
    if cuda_inc is None:
        pytest.skip("could not locate cuda_runtime_api.h next to nvcc")
    from torch.utils.cpp_extension import include_paths

    incs = include_paths()
    stub = tmp_path / "stub"
    if not any((Path(p) / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").exists() for p in incs):
        (stub / "c10" / "cuda" / "impl").mkdir(parents=True)
        (stub / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").write_text("#pragma once\n")
    cmd = [cxx, "-std=c++20", "-fsyntax-only", "-DWITH_CUDA", f"-I{stub}", f"-I{CUDA_DIR}"]
    for p in incs:
        cmd += ["-isystem", p]
    cmd += ["-isystem", str(cuda_inc), str(CUDA_DIR / name)]
    proc, elapsed = _run(cmd)
    print(f"\n{name} type-check: {elapsed:.1f} s", file=sys.stderr)
    assert proc.returncode == 0, f"$ {' '.join(cmd)}\n{proc.stdout}{proc.stderr}"
