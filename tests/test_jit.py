"""The compiled ops arrive or the user is told: adarts_kernels._ext's build record check, the
first-use build (its plan, cache, lock and messages) and the fallback warning / error.

The fast cases inject the build function or the compiler lookup and reset the module's state
with monkeypatch; ``test_stale_library_rebuilt_once_by_two_processes`` runs the real build
(about a minute on 2 cores) in two processes at once, from a copy of the package laid out as a
wheel installs it, whose prebuilt library records another torch version.
"""
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from adarts_kernels import _ext, backend

REPO = Path(__file__).resolve().parents[1]
CSRC = REPO / "csrc"
REQUIRE_EXT = _ext.require_ext()


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """_ext as if nothing were loaded yet, with its cache in tmp_path and no REQUIRE flag."""
    monkeypatch.setattr(_ext, "HAS_EXT", False)
    monkeypatch.setattr(_ext, "EXT_ERROR", _ext.NOT_BUILT)
    monkeypatch.setattr(_ext, "EXT_ORIGIN", None)
    monkeypatch.setattr(_ext, "EXT_PATH", None)
    monkeypatch.setattr(_ext, "_ENSURED", False)
    monkeypatch.setattr(_ext, "_WARNED", False)
    monkeypatch.setenv(_ext.ENV_CACHE, str(tmp_path / "cache"))
    monkeypatch.delenv(_ext.ENV_REQUIRE, raising=False)
    monkeypatch.delenv(_ext.ENV_JIT, raising=False)
    return tmp_path


def _ensure_warning():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _ext.ensure() is False
    fallbacks = [w for w in caught if issubclass(w.category, _ext.ExtensionFallbackWarning)]
    assert len(fallbacks) == 1, [str(w.message) for w in caught]
    return str(fallbacks[0].message)


# ----------------------------------------------------------------------------- the record

def test_record_mismatch():
    running = {"torch": "2.13.0+cpu", "cuda": None}
    assert _ext.record_mismatch(None, running) is None
    assert _ext.record_mismatch({"torch": "2.13.0+cpu", "cuda": None, "debug": False}, running) is None
    why = _ext.record_mismatch({"torch": "2.11.0+cu130", "cuda": "13.0"}, running)
    assert "built for torch 2.11.0+cu130 (CUDA 13.0)" in why and "this is torch 2.13.0+cpu (CUDA None)" in why
    assert _ext.record_mismatch({"torch": "2.13.0+cpu", "cuda": "12.8"}, running) is not None


def test_build_record_written_by_setup_py():
    """The editable install of this checkout wrote the record of the torch it was built with."""
    if _ext.EXT_ORIGIN != "prebuilt":
        pytest.skip(f"no prebuilt adarts_kernels._C here ({_ext.EXT_ORIGIN}: {_ext.EXT_PATH})")
    record = json.loads((Path(_ext.EXT_PATH).parent / "_C_build.json").read_text())
    assert record["torch"] == torch.__version__ and record["cuda"] == torch.version.cuda
    assert record["cuda_kernels"] == _ext.has_cuda_kernels()


def _copy_package(dest: Path, torch_version: str) -> Path:
    """The installed package copied to dest/adarts_kernels, as a wheel lays it out (sources in
    adarts_kernels/_csrc), its library's record saying ``torch_version``."""
    pkg = dest / "adarts_kernels"
    shutil.copytree(REPO / "adarts_kernels", pkg, ignore=shutil.ignore_patterns("__pycache__", "_csrc"))
    shutil.copytree(CSRC, pkg / "_csrc", ignore=shutil.ignore_patterns("__pycache__"))
    if not list(pkg.glob("_C*.so")):
        pytest.skip("no prebuilt adarts_kernels._C in this checkout")
    record = {"torch": torch_version, "cuda": None, "cuda_kernels": False, "python": "3", "debug": False}
    (pkg / "_C_build.json").write_text(json.dumps(record))
    return pkg


_REPORT = ("import json, sys, warnings\n"
           "warnings.simplefilter('always')\n"
           "import adarts_kernels\n"
           "from adarts_kernels import _ext\n"
           "stale = 'adarts_kernels._C' in sys.modules\n"
           "cpp = adarts_kernels.backends()['cpp']\n"
           "print('REPORT', json.dumps({'stale_imported': stale or 'adarts_kernels._C' in sys.modules,\n"
           "      'cpp': cpp, 'origin': _ext.EXT_ORIGIN, 'path': _ext.EXT_PATH,\n"
           "      'file': adarts_kernels.__file__}))\n")


def _env(tmp_path, **extra):
    env = {k: v for k, v in os.environ.items() if k not in (_ext.ENV_REQUIRE, _ext.ENV_JIT)}
    env.update(PYTHONPATH=str(tmp_path / "site"), **{_ext.ENV_CACHE: str(tmp_path / "cache")}, **extra)
    return env


def _report(out: str) -> dict:
    lines = [ln for ln in out.splitlines() if ln.startswith("REPORT ")]
    assert len(lines) == 1, out
    return json.loads(lines[0][len("REPORT "):])


def test_stale_library_not_loaded_without_jit(tmp_path):
    """A prebuilt library recorded for another torch is not imported; with ADARTS_JIT=0 the
    reason names both versions and the switch, and one fallback warning says what follows."""
    _copy_package(tmp_path / "site", "2.0.0+cpu")
    p = subprocess.run([sys.executable, "-c", _REPORT], cwd=tmp_path, env=_env(tmp_path, ADARTS_JIT="0"),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    r = _report(p.stdout)
    assert r["file"].startswith(str(tmp_path)), r
    assert r["stale_imported"] is False and r["cpp"]["available"] is False and r["origin"] is None
    assert "built for torch 2.0.0+cpu" in r["cpp"]["reason"] and "ADARTS_JIT=0" in r["cpp"]["reason"]
    assert p.stderr.count("ExtensionFallbackWarning") == 1, p.stderr
    assert "run on the reference implementation" in p.stderr and "same results" in p.stderr


def test_stale_library_rebuilt_once_by_two_processes(tmp_path):
    """Two processes start at once on a package whose library was built for another torch,
    with an empty cache: neither imports the stale library, one builds (one 'building' line),
    the other waits for it and loads the result; a third process loads the cache."""
    _copy_package(tmp_path / "site", "2.0.0+cpu")
    env = _env(tmp_path)
    procs = [subprocess.Popen([sys.executable, "-c", _REPORT], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=900) for p in procs]
    for p, (_out, err) in zip(procs, outs):
        assert p.returncode == 0, err
    reports = [_report(out) for out, _ in outs]
    stderr = "".join(err for _, err in outs)
    assert stderr.count("adarts_kernels: building the C++ CPU kernels for torch") == 1, stderr
    assert stderr.count("adarts_kernels: built the C++ CPU kernels") == 1, stderr
    assert "ExtensionFallbackWarning" not in stderr, stderr
    assert sorted(r["origin"] for r in reports) == ["built", "cached"], reports
    for r in reports:
        assert r["stale_imported"] is False and r["cpp"] == {"available": True, "reason": None}, r
        assert r["path"].startswith(str(tmp_path / "cache")), r
    third = subprocess.run([sys.executable, "-c", _REPORT], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=300)
    assert third.returncode == 0, third.stderr
    assert _report(third.stdout)["origin"] == "cached" and "building" not in third.stderr
    folder = Path(reports[0]["path"]).parent
    built = json.loads((folder / "build.json").read_text())
    assert built["torch"] == torch.__version__ and built["seconds"] > 0


# ----------------------------------------------------------------------------- the plan

def test_jit_plan_cpu(tmp_path):
    """Release flags as setup.py's, CPU sources only on a CPU torch, and a cache key that
    changes with any source file."""
    plan = _ext.jit_plan(str(CSRC), cxx_id="g++ (Debian 12.2.0-14) 12.2.0")
    names = sorted(os.path.relpath(s, CSRC) for s in plan["sources"])
    assert names == sorted(["adarts.cpp", "edge.cpp", "edge_node.cpp"] + [f"cpu/{p.name}" for p in (CSRC / "cpu").glob("*.cpp")])
    assert plan["with_cuda"] is (torch.version.cuda is not None and plan["with_cuda"])
    assert "-g0" in plan["extra_cflags"] and "-O3" in plan["extra_cflags"]
    if sys.platform.startswith("linux"):
        assert "-s" in plan["extra_ldflags"]
    assert plan["key"].startswith(f"torch{torch.__version__}-") and "g++ 12.2.0" in plan["label"]
    copy = tmp_path / "csrc"
    shutil.copytree(CSRC, copy)
    assert _ext.jit_plan(str(copy), cxx_id="g++ (Debian 12.2.0-14) 12.2.0")["key"] == plan["key"]
    with open(copy / "cpu" / "reduce.h", "a") as f:
        f.write("\n// changed\n")
    assert _ext.jit_plan(str(copy), cxx_id="g++ (Debian 12.2.0-14) 12.2.0")["key"] != plan["key"]
    assert _ext.jit_plan(str(CSRC), cxx_id="clang version 18.1.0")["key"] != plan["key"]


def test_jit_plan_debug_keeps_debug_info(monkeypatch):
    monkeypatch.setenv("ADARTS_DEBUG", "1")
    plan = _ext.jit_plan(str(CSRC))
    assert "-g0" not in plan["extra_cflags"] and "-s" not in plan["extra_ldflags"]


class _FakeTorch:
    """A CUDA torch as jit_plan sees it (version strings and parallel_info only)."""

    class version:
        cuda = "13.0"
        git_version = "0" * 40

    class __config__:
        @staticmethod
        def parallel_info():
            return "ATen parallel backend: OpenMP"

    class _C:
        _GLIBCXX_USE_CXX11_ABI = True

    __version__ = "2.11.0+cu130"


@pytest.mark.parametrize("debug", [False, True])
def test_jit_plan_cuda_arm(monkeypatch, debug):
    """With a CUDA torch and nvcc, the first-use build adds every CUDA source and binding with
    WITH_CUDA for both compilers and the release nvcc flags (the CUDA arm, run on CPU)."""
    monkeypatch.setenv("ADARTS_DEBUG", "1" if debug else "0")
    plan = _ext.jit_plan(str(CSRC), torch_mod=_FakeTorch, cuda_home="/usr/local/cuda")
    cuda = sorted(os.path.relpath(s, CSRC) for s in plan["sources"] if os.sep + "cuda" + os.sep in s)
    expected = sorted(f"cuda/{p.name}" for p in (CSRC / "cuda").iterdir() if p.suffix in (".cu", ".cpp"))
    assert cuda == expected and len(cuda) == 8
    assert plan["with_cuda"] is True and "-DWITH_CUDA" in plan["extra_cflags"]
    assert plan["extra_cuda_cflags"][0] == "-DWITH_CUDA" and "-O3" in plan["extra_cuda_cflags"]
    assert ("-DNDEBUG" in plan["extra_cuda_cflags"]) is not debug
    assert "-cu13.0-" in plan["key"] and "CPU and CUDA kernels for torch 2.11.0+cu130" in plan["label"]
    no_nvcc = _ext.jit_plan(str(CSRC), torch_mod=_FakeTorch, cuda_home=None)
    assert no_nvcc["with_cuda"] is False and "-cpu-" in no_nvcc["key"]


# ----------------------------------------------------------------------------- build and fallback

def test_jit_build_injected_load_records_and_caches(fresh, monkeypatch):
    """jit_build hands the plan to load() with the cache folder, writes build.json last, says
    what it builds and how long it took; a second build in a new state only loads the cache."""
    calls, loaded = [], []

    def fake_load(**kw):
        calls.append(kw)
        lib = Path(kw["build_directory"]) / (kw["name"] + ".so")
        lib.write_bytes(b"")
        return str(lib)

    monkeypatch.setattr(torch.ops, "load_library", lambda p: loaded.append(p))
    monkeypatch.setattr(_ext, "_missing_ops", lambda: [])
    monkeypatch.setattr(_ext, "_query_cuda_kernels", lambda: False)
    assert _ext.jit_build(load=fake_load) is True
    assert len(calls) == 1 and calls[0]["is_python_module"] is False and calls[0]["name"] == _ext.JIT_NAME
    folder = Path(calls[0]["build_directory"])
    assert folder.parent == fresh / "cache" and (folder / "build.json").is_file()
    assert _ext.HAS_EXT and _ext.EXT_ORIGIN == "built" and _ext.EXT_PATH == str(folder / f"{_ext.JIT_NAME}.so")
    monkeypatch.setattr(_ext, "HAS_EXT", False)
    assert _ext.jit_build(load=fake_load) is True
    assert len(calls) == 1 and loaded == [str(folder / f"{_ext.JIT_NAME}.so")] and _ext.EXT_ORIGIN == "cached"


def test_stale_torch_build_lock_removed(fresh, monkeypatch):
    """torch's own build lock left by a process killed mid-build would make torch wait forever:
    the first-use build (holding its own lock) removes it before building."""
    plan = _ext.jit_plan(str(CSRC), cxx_id=_ext._compiler_id(_ext.compiler() or "c++"))
    folder = fresh / "cache" / plan["key"]
    folder.mkdir(parents=True)
    (folder / "lock").write_text("")
    seen = []

    def fake_load(**kw):
        seen.append((Path(kw["build_directory"]) / "lock").exists())
        raise RuntimeError("compiler exploded")

    if _ext.compiler() is None:
        pytest.skip("no C++ compiler")
    with pytest.raises(_ext.JitUnavailable, match="compiler exploded"):
        _ext.jit_build(load=fake_load)
    assert seen == [False]


def test_no_compiler_warns_once_and_backends_says_why(fresh, monkeypatch):
    monkeypatch.setattr(_ext, "compiler", lambda: None)
    message = _ensure_warning()
    assert "no C++ compiler found" in message and "the fused ops run on the reference implementation" in message
    assert _ext.REFERENCE_SLOWDOWN in message and "same results" in message
    with warnings.catch_warnings():
        warnings.simplefilter("error")           # once: the second call is silent
        assert _ext.ensure() is False
        info = backend.backends()["cpp"]
    assert info["available"] is False and "no C++ compiler found" in info["reason"]
    assert backend.resolve("auto", torch.device("cpu")) == "reference"


def test_fused_module_prepares_eagerly(fresh, monkeypatch):
    """FusedAttentionMixedOp triggers the first-use build when it is built (a forward traced by
    torch.compile never builds), unless its backend is the reference."""
    from adarts_kernels.nn import FusedAttentionMixedOp
    calls = []

    def failing():
        calls.append(1)
        raise _ext.JitUnavailable("no compiler here")

    monkeypatch.setattr(_ext, "jit_build", failing)
    monkeypatch.delenv("ADARTS_KERNELS_IMPL", raising=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        FusedAttentionMixedOp(8, 1, k=4, impl="reference")
    assert calls == []
    with pytest.warns(_ext.ExtensionFallbackWarning, match="no compiler here"):
        FusedAttentionMixedOp(8, 1, k=4)
    assert calls == [1]


def test_failed_build_falls_back_with_its_reason(fresh, monkeypatch):
    def failing():
        raise _ext.JitUnavailable("the build of X failed (OSError: disk full)")

    monkeypatch.setattr(_ext, "jit_build", failing)
    message = _ensure_warning()
    assert "disk full" in message and _ext.NOT_BUILT in message


def test_jit_disabled(fresh, monkeypatch):
    monkeypatch.setenv(_ext.ENV_JIT, "0")
    monkeypatch.setattr(_ext, "jit_build", lambda: pytest.fail("ADARTS_JIT=0 must not build"))
    message = _ensure_warning()
    assert "ADARTS_JIT=0 turns the first-use build off" in message


def test_require_ext_makes_fallback_an_error(fresh, monkeypatch):
    monkeypatch.setenv(_ext.ENV_REQUIRE, "1")
    monkeypatch.setattr(_ext, "compiler", lambda: None)
    for _ in range(2):                           # every call, not only the first
        with pytest.raises(RuntimeError, match=r"required \(ADARTS_REQUIRE_EXT=1\).*no C\+\+ compiler found"):
            backend.resolve("auto", torch.device("cpu"))
    assert backend.resolve("reference", torch.device("cpu")) == "reference"


def test_no_sources(fresh, monkeypatch, tmp_path):
    monkeypatch.setattr(_ext, "source_dir", lambda: None)
    with pytest.raises(_ext.JitUnavailable, match="C\\+\\+ sources are not in this install"):
        _ext.jit_build()


def test_source_dir_prefers_the_wheel_copy(tmp_path):
    pkg = tmp_path / "site" / "adarts_kernels"
    (pkg / "_csrc").mkdir(parents=True)
    assert _ext.source_dir(str(pkg)) is None
    (pkg / "_csrc" / "adarts.cpp").write_text("")
    assert _ext.source_dir(str(pkg)) == str(pkg / "_csrc")
    assert _ext.source_dir(str(REPO / "adarts_kernels")) == str(CSRC)


def test_import_never_builds_or_warns():
    """Importing the package builds nothing and warns nothing, even with no library at all."""
    code = ("import sys, warnings; warnings.simplefilter('error'); sys.modules['adarts_kernels._C'] = None\n"
            "import adarts_kernels\n"
            "from adarts_kernels import _ext\n"
            "assert not _ext.HAS_EXT and _ext.EXT_ERROR == _ext.NOT_BUILT and not _ext._ENSURED, _ext.EXT_ERROR\n")
    env = {k: v for k, v in os.environ.items() if k != _ext.ENV_REQUIRE}
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, env=env)
