"""The CUDA sources compile (no GPU needed: compile only, never run).

- each ``csrc/cuda/*.cu`` compiles with the flags of the real build (``csrc/cuda/nvcc_flags.py``:
  setup.py's own flags, release mode with ``-DNDEBUG``, plus the flags torch's extension build
  adds) for sm_80 and sm_90, and defines every launcher that ``csrc/cuda/kernels.h`` declares;
- ``ptxas -v`` reports no register spill in any kernel; its resource table (registers, stack,
  spills, shared memory per kernel and arch) is written to ``benchmarks/results/cuda_resources.md``;
- a debug build (``ADARTS_DEBUG=1``: no ``-DNDEBUG``, device asserts kept) compiles too;
- ``kernels.h`` is plain C++ (the torch binding includes it without nvcc);
- every torch binding ``csrc/cuda/*.cpp`` (``<op>_binding.cpp``) type-checks
  against the installed torch headers with ``-DWITH_CUDA`` (when the CUDA runtime headers are
  found next to nvcc).

Skipped when ``nvcc`` is not on PATH, unless ``ADARTS_REQUIRE_NVCC=1`` (then a failure).
The .cu files include no torch header, so a CPU-only torch is enough.
"""
import importlib.util
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
TIMEOUT_S = 600
RESOURCES_MD = ROOT / "benchmarks" / "results" / "cuda_resources.md"


def _load_flags():
    spec = importlib.util.spec_from_file_location("adarts_nvcc_flags", CUDA_DIR / "nvcc_flags.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


NV = _load_flags()


def nvcc_compile_flags(debug=False, archs=NV.TEST_ARCHS):
    """The flags of the real build (setup.py's and torch's) for archs, compile only, ptxas verbose."""
    return ["-c", "-std=c++17", *NV.nvcc_flags(debug), *NV.TORCH_NVCC_FLAGS, *NV.arch_flags(archs),
            "-Xptxas", "-v"]


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
        cmd = [nvcc, *nvcc_compile_flags(), "-o", str(obj), str(CUDA_DIR / name)]
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


def test_flags_match_torch_and_setup():
    """The list torch adds to nvcc is the one the test compiles with; release builds define
    NDEBUG, ADARTS_DEBUG=1 builds do not; setup.py takes its nvcc flags from the same module."""
    from torch.utils import cpp_extension

    assert list(NV.TORCH_NVCC_FLAGS) == list(cpp_extension.COMMON_NVCC_FLAGS)
    assert "-DNDEBUG" in NV.nvcc_flags(debug=False)
    assert "-DNDEBUG" not in NV.nvcc_flags(debug=True)
    assert NV.debug_build({"ADARTS_DEBUG": "1"}) and not NV.debug_build({}) and not NV.debug_build({"ADARTS_DEBUG": "0"})
    assert set(NV.TEST_ARCHS) >= {"80", "90"}
    setup_py = (ROOT / "setup.py").read_text()
    assert "nv.nvcc_flags(debug)" in setup_py and "nvcc_flags.py" in setup_py


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


_ENTRY = re.compile(r"Compiling entry function '(\S+)' for '(sm_\d+a?)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas(log: str):
    """Rows (kernel, arch, registers, stack, spill_stores, spill_loads, smem) of a ``ptxas -v`` log,
    one per entry function and arch (mangled names)."""
    rows, cur = [], None
    for line in log.splitlines():
        m = _ENTRY.search(line)
        if m:
            cur = {"kernel": m.group(1), "arch": m.group(2), "registers": None, "stack": 0, "spill_stores": 0,
                   "spill_loads": 0, "smem": 0}
            rows.append(cur)
            continue
        if cur is None:
            continue
        m = _FRAME.search(line)
        if m:
            cur["stack"], cur["spill_stores"], cur["spill_loads"] = (int(v) for v in m.groups())
        m = _USED.search(line)
        if m:
            cur["registers"] = int(m.group(1))
            m = _SMEM.search(line)
            cur["smem"] = int(m.group(1)) if m else 0
    return rows


def test_parse_ptxas():
    log = (
        "ptxas info    : Compiling entry function '_Z1kPf' for 'sm_90'\n"
        "ptxas info    : Function properties for _Z1kPf\n"
        "    16 bytes stack frame, 24 bytes spill stores, 44 bytes spill loads\n"
        "ptxas info    : Used 80 registers, used 1 barriers, 16 bytes cumulative stack size, 256 bytes smem\n"
        "ptxas info    : Compiling entry function '_Z1gv' for 'sm_80'\n"
        "ptxas info    : Function properties for _Z1gv\n"
        "    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n"
        "ptxas info    : Used 12 registers, used 0 barriers, 448 bytes cmem[0]\n"
    )
    assert parse_ptxas(log) == [
        {"kernel": "_Z1kPf", "arch": "sm_90", "registers": 80, "stack": 16, "spill_stores": 24, "spill_loads": 44,
         "smem": 256},
        {"kernel": "_Z1gv", "arch": "sm_80", "registers": 12, "stack": 0, "spill_stores": 0, "spill_loads": 0,
         "smem": 0},
    ]


def _short_names(mangled):
    """Demangled kernel names without the namespaces and the parameter list."""
    cxxfilt = shutil.which("c++filt")
    if cxxfilt is None:
        return list(mangled)
    proc = subprocess.run([cxxfilt], input="\n".join(mangled), capture_output=True, text=True, timeout=60)
    names = proc.stdout.splitlines()
    if proc.returncode != 0 or len(names) != len(mangled):
        return list(mangled)
    out = []
    for n in names:
        n = n.replace("adarts::cuda::", "").replace("(anonymous namespace)::", "")
        n = n[len("void "):] if n.startswith("void ") else n
        depth, cut = 0, len(n)
        for i, ch in enumerate(n):  # drop the parameter list: the first '(' outside template brackets
            if ch == "<":
                depth += 1
            elif ch == ">":
                depth -= 1
            elif ch == "(" and depth == 0:
                cut = i
                break
        out.append(n[:cut])
    return out


def test_no_register_spills(compiled):
    """Every kernel of every .cu file, at every test arch: no spill stores or loads. Writes the
    resource table to benchmarks/results/cuda_resources.md."""
    rows = []
    for name, (_, _, rc, log) in sorted(compiled.items()):
        assert rc == 0, f"nvcc failed for {name}:\n{log}"
        parsed = parse_ptxas(log)
        assert parsed, f"no ptxas -v report for {name}:\n{log}"
        for r in parsed:
            r["file"] = name
        rows += parsed
    for r, short in zip(rows, _short_names([r["kernel"] for r in rows])):
        r["name"] = short
    rows.sort(key=lambda r: (r["file"], r["name"], r["arch"]))
    version = subprocess.run([_nvcc(), "--version"], capture_output=True, text=True, timeout=60).stdout
    release = next((ln.strip() for ln in version.splitlines() if "release" in ln), "nvcc")
    lines = [
        "# CUDA kernels: ptxas resource usage",
        "",
        "Written by `tests/test_cuda_compile.py::test_no_register_spills` (compile only, no GPU), from",
        f"`nvcc {' '.join(nvcc_compile_flags())}` ({release}).",
        "Registers per thread; stack frame, spill stores / loads and static shared memory in bytes.",
        "The test fails on any spill.",
        "",
        "| file | kernel | arch | registers | stack | spill stores | spill loads | smem |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        name = r["name"].replace("|", "\\|")
        lines.append(f"| {r['file']} | `{name}` | {r['arch']} | {r['registers']} | {r['stack']} | "
                     f"{r['spill_stores']} | {r['spill_loads']} | {r['smem']} |")
    text = "\n".join(lines) + "\n"
    RESOURCES_MD.parent.mkdir(parents=True, exist_ok=True)
    if not RESOURCES_MD.exists() or RESOURCES_MD.read_text() != text:
        RESOURCES_MD.write_text(text)
    archs = {r["arch"] for r in rows}
    assert archs == {f"sm_{a}" for a in NV.TEST_ARCHS}, archs
    spills = [f"{r['file']} {r['name']} {r['arch']}: {r['spill_stores']} B stores, {r['spill_loads']} B loads"
              for r in rows if r["spill_stores"] or r["spill_loads"]]
    assert not spills, "register spills:\n" + "\n".join(spills)


def test_debug_build_compiles(tmp_path):
    """ADARTS_DEBUG=1 (no -DNDEBUG: the device asserts and their printf are compiled in), one
    kernel source that uses them, one arch."""
    nvcc = _nvcc()
    obj = tmp_path / "gather_debug.o"
    flags = [f for f in nvcc_compile_flags(debug=True, archs=NV.TEST_ARCHS[-1:]) if f not in ("-Xptxas", "-v")]
    proc, _ = _run([nvcc, *flags, "-o", str(obj), str(CUDA_DIR / "attention_gather_kernel.cu")])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert obj.stat().st_size > 0


WS_SHAPES = [  # B, C, H, W, stride, k, P
    (1, 8, 3, 5, 1, 4, 0), (4, 16, 8, 8, 2, 4, 4), (64, 64, 32, 32, 1, 4, 4), (1024, 64, 32, 32, 1, 4, 5),
    (7, 12, 6, 10, 2, 3, 2), (0, 8, 4, 4, 1, 4, 1),
]
WS_KEYS = ["attention_score_fwd", "attention_score_bwd", "attention_gather_bwd", "attention_writeback_fwd",
           "attention_writeback_bwd", "mixed_sum_fwd", "mixed_sum_bwd"]


def test_workspace_formulas_match_memory_report(compiled, tmp_path):
    """The memory report's transient-workspace formulas (adarts_kernels/profiling/report.py)
    are the launchers' *_workspace_bytes, linked from the compiled objects and called on the host."""
    from adarts_kernels.profiling.report import cuda_workspace_bytes

    nvcc = _nvcc()
    for name, (_, _, rc, log) in compiled.items():
        assert rc == 0, f"nvcc failed for {name}:\n{log}"
    rows = ",\n".join("{" + ", ".join(str(v) for v in s) + "}" for s in WS_SHAPES)
    src = tmp_path / "ws.cpp"
    src.write_text(
        '#include "kernels.h"\n#include <cstdio>\nusing namespace adarts::cuda;\n'
        f"static const long long S[][7] = {{{rows}}};\n"
        "int main() {\n"
        "  for (const auto& s : S) {\n"
        "    const long long B = s[0], C = s[1], H = s[2], W = s[3], k = s[5];\n"
        "    const int st = static_cast<int>(s[4]), P = static_cast<int>(s[6]);\n"
        "    const long long n = C / k, Ch = C / 2;\n"
        "    const DType dts[] = {DType::F32, DType::F64};\n"
        "    for (DType dt : dts) {\n"
        "      std::printf(\"%zu %zu %zu %zu %zu %zu %zu\\n\", attention_score_fwd_workspace_bytes(dt, B, C, Ch),\n"
        "                  attention_score_bwd_workspace_bytes(dt, B, C, Ch), attention_gather_bwd_workspace_bytes(C),\n"
        "                  attention_writeback_fwd_workspace_bytes(C), attention_writeback_bwd_workspace_bytes(dt, B, C),\n"
        "                  mixed_sum_fwd_workspace_bytes(dt, B, n, P),\n"
        "                  mixed_sum_bwd_workspace_bytes(dt, B, n, H, W, st, P));\n"
        "    }\n  }\n  return 0;\n}\n")
    exe = tmp_path / "ws"
    objs = [str(obj) for _, obj, _, _ in compiled.values()]
    proc, _ = _run([nvcc, f"-I{CUDA_DIR}", "-o", str(exe), str(src), *objs])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.split("\n")
    i = 0
    for B, C, H, W, stride, k, P in WS_SHAPES:
        for acc in (4, 8):
            got = [int(v) for v in lines[i].split()]
            i += 1
            want = cuda_workspace_bytes(B, C, H, W, stride, k, P, acc_size=acc)
            assert got == [want[key] for key in WS_KEYS], ((B, C, H, W, stride, k, P, acc), got, want)


def _header_constants():
    """The ``constexpr int64_t`` constants of kernels.h, evaluated in order."""
    text = (CUDA_DIR / "kernels.h").read_text()
    env = {}
    for name, expr in re.findall(r"^constexpr int64_t (\w+) = ([^;]+);", text, flags=re.M):
        expr = re.sub(r"int64_t\((\d+)\)", r"\1", expr)
        env[name] = eval(expr, {"__builtins__": {}}, dict(env))  # noqa: S307 (integer literals and names)
    return env


def test_size_limits_are_consistent():
    """The launchers' size limits live in kernels.h (the CUDA grid and int-index limits), the
    launchers and the bindings use them by name, and every binding checks them before launching."""
    k = _header_constants()
    int_max = 2 ** 31 - 1
    assert k["kMaxInt"] == int_max
    assert k["kMaxPlane"] <= int_max and k["kMaxChannels"] <= int_max and k["kMaxPlanes"] <= int_max
    assert k["kMaxGridY"] == 65535   # CUDA's gridDim.y limit
    assert k["kMaxGemmRows"] == k["kGemmTile"] * k["kMaxGridY"]
    score = (CUDA_DIR / "attention_score_kernel.cu").read_text()
    ts = int(re.search(r"constexpr int TS = (\d+);", score).group(1))
    assert ts == k["kGemmTile"] and "static_assert(TS == kGemmTile" in score
    # no bare limit in the launchers or the bindings: the named constants only
    for p in sorted(CUDA_DIR.glob("*_kernel.cu")) + sorted(CUDA_DIR.glob("*_binding.cpp")):
        text = p.read_text()
        for bare in ("65535", "INT_MAX", "1 << 31", "1) << 31"):
            code = "\n".join(ln for ln in text.splitlines() if not ln.lstrip().startswith("//") and "INT_MAX;" not in ln
                             and "? si[lane] : INT_MAX" not in ln)
            assert bare not in code, f"{p.name}: bare size limit {bare!r}; use the constants of kernels.h"
    for name in ("attention_gather", "attention_writeback", "mixed_sum"):
        text = (CUDA_DIR / f"{name}_kernel.cu").read_text()
        assert "kMaxPlanes" in text and ("kMaxPlane " in text or "kMaxPlane;" in text), name
    binding_h = (CUDA_DIR / "binding.h").read_text()
    assert "is too large for the CUDA kernels (limit " in binding_h
    for c in ("kMaxPlane", "kMaxChannels", "kMaxPlanes"):
        assert f"cuda::{c}" in binding_h, c
    for p in sorted(CUDA_DIR.glob("*_binding.cpp")):
        text = p.read_text()
        assert "check_x(" in text or "check_x_a(" in text or "check_plane_limits(" in text, p.name
    assert "cuda::kMaxGemmRows" in (CUDA_DIR / "attention_score_binding.cpp").read_text()


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
