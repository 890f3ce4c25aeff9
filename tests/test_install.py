"""As users install it: the sdist, the wheel, ``pip install .`` and ``pip install <sdist>``
with build isolation and the wheel built from the sdist without it, each into a fresh virtual
environment outside the checkout (torch installed first, as the README says), used from a
folder outside the checkout.

Every install must give compiled fused ops on CPU at first use: the prebuilt library, or the
first-use build where the build could not see torch (``python -m build`` with isolation). The
processes run with ADARTS_REQUIRE_EXT=1, so a fallback to the reference is an error, not a
skipped check. The wheel's console commands run a one-epoch search and retrain on digits, and
the README's python blocks run against the installed package.

Cost on a 2-core x86-64 CPU: four compilations of the extension (about 35 s each) and two
virtual environments with torch (about 25 s each plus the dependencies): the README's Install
section gives the measured total. Marked ``install``; ``-m "not install"`` leaves them out.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")
BLOCK = re.compile(r"^```(\w+)\n(.*?)^```", re.S | re.M)
TORCH_SPEC = f"torch=={torch.__version__.split('+')[0]}"

pytestmark = [pytest.mark.install, pytest.mark.skipif(
    not (REPO / "setup.py").is_file() or os.environ.get("ADARTS_SKIP_INSTALL_TESTS") == "1",
    reason="needs the project's source tree (setup.py), and ADARTS_SKIP_INSTALL_TESTS unset")]


def _load_build_config():
    import importlib.util
    spec = importlib.util.spec_from_file_location("adarts_build_config", REPO / "csrc" / "build_config.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


BC = _load_build_config()


def run(cmd, cwd, env, timeout=900, check=True):
    p = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} exited {p.returncode}\nstdout:\n{p.stdout[-4000:]}\n"
                             f"stderr:\n{p.stderr[-6000:]}")
    return p


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("install")


@pytest.fixture(scope="module")
def env(work):
    """The environment of every install and run: any fallback to the reference is an error, the
    first-use build's cache is the test's own, and nothing of the checkout's settings leaks in."""
    e = {k: v for k, v in os.environ.items() if not k.startswith(("ADARTS_", "PYTHON", "VIRTUAL_ENV"))}
    e.update(ADARTS_REQUIRE_EXT="1", ADARTS_CACHE_DIR=str(work / "cache"), PIP_DISABLE_PIP_VERSION_CHECK="1",
             MPLBACKEND="Agg")
    return e


@pytest.fixture(scope="module")
def outside(work):
    """A folder with no adarts_kernels in it: the runs' working directory."""
    d = work / "elsewhere"
    d.mkdir()
    return d


def make_venv(path: Path, env) -> Path:
    """A fresh virtual environment with torch installed first; returns its python."""
    run([sys.executable, "-m", "venv", path], cwd=path.parent, env=env)
    py = path / "bin" / "python"
    run([py, "-m", "pip", "install", "-q", TORCH_SPEC], cwd=path.parent, env=env)
    return py


@pytest.fixture(scope="module")
def dists(work, env):
    """``python -m build --no-isolation``: the sdist, and the wheel built from it (the extension
    compiled against this environment's torch). That wheel is the build of ``pip install
    --no-build-isolation <sdist>`` (the same PEP 517 hooks on the unpacked sdist, torch
    importable); its install is tested by ``test_wheel_install_as_a_user``."""
    out = work / "dist"
    p = run([sys.executable, "-m", "build", "--no-isolation", "--outdir", out, REPO], cwd=work, env=env)
    sdist, = out.glob("adarts_kernels-*.tar.gz")
    wheel, = out.glob("adarts_kernels-*.whl")
    return {"sdist": sdist, "wheel": wheel, "log": p.stdout + p.stderr}


@pytest.fixture(scope="module")
def venv_wheel(work, env, dists):
    """A fresh environment with the wheel installed (its dependencies from the package index)."""
    py = make_venv(work / "venv-wheel", env)
    run([py, "-m", "pip", "install", "-q", dists["wheel"]], cwd=work, env=env)
    return py


@pytest.fixture(scope="module")
def venv_sdist(work, env):
    return make_venv(work / "venv-sdist", env)


_STATE = ("import json, sys, adarts_kernels\n"
          "from adarts_kernels import _ext\n"
          "cpp = adarts_kernels.backends()['cpp']\n"
          "print('STATE', json.dumps({'cpp': cpp, 'origin': _ext.EXT_ORIGIN, 'path': _ext.EXT_PATH,\n"
          "      'file': adarts_kernels.__file__, 'version': adarts_kernels.__version__}))\n")


def state(py, cwd, env) -> dict:
    p = run([py, "-c", _STATE], cwd=cwd, env=env)
    line, = [ln for ln in p.stdout.splitlines() if ln.startswith("STATE ")]
    return {**json.loads(line[len("STATE "):]), "stderr": p.stderr}


def assert_compiled(s: dict, venv_py: Path, origin: str):
    venv = venv_py.parent.parent
    assert s["cpp"] == {"available": True, "reason": None}, s
    assert s["origin"] == origin, s
    assert s["file"].startswith(str(venv)) and not s["file"].startswith(str(REPO)), s


def _members_sdist(path):
    with tarfile.open(path) as t:
        return {m.name.split("/", 1)[1] for m in t.getmembers() if m.isfile() and "/" in m.name}


# ----------------------------------------------------------------------------- what is built

def test_sdist_is_complete(dists):
    """Every file of the project (git's list where there is one) and every file either build of
    the extension reads, FORCE_CUDA's CUDA sources included, is in the sdist; no build output."""
    members = _members_sdist(dists["sdist"])
    needed = {str(Path(p).relative_to(REPO)) for p in BC.build_files(str(REPO / "csrc"))}
    assert needed <= members, sorted(needed - members)
    assert {f"csrc/cuda/{p.name}" for p in (REPO / "csrc" / "cuda").iterdir() if p.suffix in (".cu", ".cpp")} <= members
    assert {"tests/conftest.py", "tests/ops/helpers.py", "tests/cuda_emu/cuda_emu.h", "python/search.py",
            "docs/method.md", "benchmarks/device_suite.sh", "Makefile", "README.md", "LICENSE",
            "MANIFEST.in"} <= members
    if (REPO / ".git").exists() and shutil.which("git"):
        tracked = set(subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True,
                                     check=True).stdout.split())
        assert tracked <= members, sorted(tracked - members)
    assert not [m for m in members if m.endswith((".so", ".pyc")) or m.endswith("_C_build.json")]


def test_wheel_contents(dists):
    """The wheel: a stripped library with its build record, the sources for a rebuild, the
    console commands and the metadata (license, long description, classifiers, Python)."""
    with zipfile.ZipFile(dists["wheel"]) as z:
        names = set(z.namelist())
        so, = [n for n in names if re.fullmatch(r"adarts_kernels/_C\..*\.so", n)]
        lib = z.read(so)
        record = json.loads(z.read("adarts_kernels/_C_build.json"))
        info = next(n for n in names if n.endswith(".dist-info/METADATA"))
        metadata = z.read(info).decode()
        entry = z.read(info.replace("METADATA", "entry_points.txt")).decode()
    assert b".debug_info" not in lib and b".symtab" not in lib, "the release library is not stripped"
    assert len(lib) < 3_000_000, len(lib)
    assert record["torch"] == torch.__version__ and record["cuda"] == torch.version.cuda and not record["debug"]
    shipped = {f"adarts_kernels/_csrc/{Path(p).relative_to(REPO / 'csrc')}" for p in BC.build_files(str(REPO / "csrc"))}
    assert shipped <= names, sorted(shipped - names)
    for cmd in ("adarts-search = adarts_kernels.commands.search:main",
                "adarts-retrain = adarts_kernels.commands.retrain:main",
                "adarts-memory = adarts_kernels.profiling.__main__:main"):
        assert cmd in entry
    assert re.search(r"^License(-Expression)?: Apache-2\.0$", metadata, re.M), metadata[:800]
    assert "Classifier: " in metadata and "Requires-Python: >=3.9" in metadata
    assert "Requires-Dist: torch>=2.11" in metadata and "Requires-Dist: ninja" in metadata
    assert "# adarts-kernels" in metadata                     # the README as long description
    assert "building CPU extension" in dists["log"]


# ----------------------------------------------------------------------------- the wheel, used

def test_wheel_install_as_a_user(venv_wheel, outside, env):
    """From a folder outside the checkout: the prebuilt library loads, each console command
    answers --help, the README's python blocks run, and a one-epoch search on digits followed
    by a one-epoch retrain of its cell runs through the console commands."""
    assert_compiled(state(venv_wheel, outside, env), venv_wheel, "prebuilt")
    bindir = venv_wheel.parent
    for cmd in ("adarts-search", "adarts-retrain", "adarts-memory"):
        p = run([bindir / cmd, "--help"], cwd=outside, env=env)
        assert p.stdout.startswith(f"usage: {cmd}"), p.stdout[:200]
    blocks = [m.group(2) for m in BLOCK.finditer(README) if m.group(1) == "python"]
    assert len(blocks) >= 3
    for i, code in enumerate(blocks):
        script = outside / f"readme_block_{i + 1}.py"
        script.write_text(code)
        run([venv_wheel, script], cwd=outside, env=env)
    runs = outside / "runs"
    p = run([bindir / "adarts-search", "--dataset", "digits", "--epochs", "1", "--limit", "160", "--no-progress",
             "--out", runs / "search"], cwd=outside, env=env)
    genotype = runs / "search" / "genotype.json"
    assert genotype.is_file() and "genotype written to" in p.stdout, p.stdout + p.stderr
    p = run([bindir / "adarts-retrain", "--dataset", "digits", "--genotype", genotype, "--epochs", "1",
             "--limit", "160", "--no-progress", "--out", runs / "retrain"], cwd=outside, env=env)
    assert "test accuracy" in (p.stdout + p.stderr).lower(), p.stdout + p.stderr
    p = run([bindir / "adarts-memory", "--C", "8", "--layers", "2", "--size", "8", "--batch", "2",
             "--variants", "pcdarts", "adarts-fused"], cwd=outside, env=env)
    assert "adarts-fused" in p.stdout


def test_wheel_built_in_isolation_builds_at_first_use(venv_wheel, work, outside, env):
    """``python -m build`` with isolation (its build environment has no torch): the wheel
    carries the sources and no library, and the first use of the installed package builds it
    (one line says so), a second process loads the cached build."""
    out = work / "dist-isolated"
    p = run([venv_wheel, "-m", "pip", "install", "-q", "build"], cwd=work, env=env)
    p = run([venv_wheel, "-m", "build", "--outdir", out, REPO], cwd=work, env=env)
    wheel, = out.glob("adarts_kernels-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
    assert "adarts_kernels/_csrc/adarts.cpp" in names
    if any(re.fullmatch(r"adarts_kernels/_C\..*\.so", n) for n in names):
        pytest.skip("this machine's base interpreter has torch: the isolated build found it and compiled")
    assert "torch is not importable at build time" in p.stdout + p.stderr
    run([venv_wheel, "-m", "pip", "install", "-q", "--force-reinstall", "--no-deps", wheel], cwd=work, env=env)
    first = state(venv_wheel, outside, env)
    assert_compiled(first, venv_wheel, "built")
    assert "building the C++ CPU kernels" in first["stderr"] and re.search(r"built .* in \d+ s", first["stderr"])
    assert first["path"].startswith(env["ADARTS_CACHE_DIR"])
    second = state(venv_wheel, outside, env)
    assert_compiled(second, venv_wheel, "cached")
    assert "building" not in second["stderr"]


# ----------------------------------------------------------------------------- from source

def test_sdist_install_with_build_isolation(venv_sdist, dists, outside, env, work):
    """``pip install <sdist>``, pip's default isolation: the build finds the environment's
    torch and compiles against it."""
    p = run([venv_sdist, "-m", "pip", "install", "-v", dists["sdist"]], cwd=work, env=env)
    assert "building against the environment's torch" in p.stdout + p.stderr
    assert_compiled(state(venv_sdist, outside, env), venv_sdist, "prebuilt")


def reinstall(py, args, cwd, env):
    """Uninstall the package (if there) and install it again (its dependencies if missing)."""
    run([py, "-m", "pip", "uninstall", "-q", "-y", "adarts_kernels"], cwd=cwd, env=env, check=False)
    return run([py, "-m", "pip", "install", "-q", *args], cwd=cwd, env=env)


def test_checkout_install_with_build_isolation(venv_sdist, outside, env, work):
    """``pip install .`` from a copy of the checkout (pip builds in the source tree: a copy keeps
    the checkout's own build folder out of it)."""
    src = work / "checkout"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".venv", "build", "dist", "runs", "*.so", "__pycache__",
                                                             "*.egg-info", "_C_build.json", ".pytest_cache"))
    reinstall(venv_sdist, ["."], src, env)
    assert_compiled(state(venv_sdist, outside, env), venv_sdist, "prebuilt")
