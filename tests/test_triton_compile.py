"""The Triton kernels compile for real GPUs (sm_80, sm_90) without one: no spills, shared
memory within the architecture's per-block limit.

What is compiled comes from the launchers (each module's ``compile_configs()``, see
``benchmarks/triton_resources.py``): per kernel a cover of the configurations the launchers
can choose (the heaviest one, then every dtype, BLOCK, num_warps and constexpr value at least
once; checked here); ``ADARTS_TRITON_COMPILE=full`` compiles every configuration (hours on two cores).

Two Triton versions: the venv's, and Triton 3.6 (what the GPU machines run) installed with
``pip install --no-deps --target .venv/triton36 triton==3.6.0`` (or the directory in
``ADARTS_TRITON36``), put first on ``PYTHONPATH`` of a subprocess only. Each half skips where
its Triton is missing, unless ``ADARTS_REQUIRE_TRITON=1`` (the venv's) or
``ADARTS_REQUIRE_TRITON36=1`` (3.6) makes that a failure, as in CI (``.ci/run``).
The compiles run once per pytest run, in a process pool, out of the test process (which runs
Triton interpreted).
"""
import importlib.util
import os
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import triton_resources as tr  # noqa: E402

sys.path.remove(str(ROOT / "benchmarks"))

FULL = os.environ.get("ADARTS_TRITON_COMPILE") == "full"
TIMEOUT_S = 3600 * 12 if FULL else 900


def _triton36_dir() -> Path:
    return Path(os.environ.get("ADARTS_TRITON36") or tr.DEFAULT_TRITON36)


def _missing(require_var: str, why: str):
    if os.environ.get(require_var) == "1":
        pytest.fail(f"{require_var}=1 but {why}")
    pytest.skip(f"{why} (set {require_var}=1 to make this a failure)")


def _run(pythonpath):
    t0 = time.perf_counter()
    res = tr.run_version(pythonpath, full=FULL, timeout=TIMEOUT_S)
    res["wall_s"] = round(time.perf_counter() - t0, 2)
    print(f"\ntriton {res['triton']}: {res['configs_compiled']}/{res['configs_total']} configs x "
          f"{len(res['archs'])} archs, {res['wall_s']} s ({res['jobs']} processes)")
    return res


@pytest.fixture(scope="session")
def venv_triton():
    if importlib.util.find_spec("triton") is None:
        _missing("ADARTS_REQUIRE_TRITON", "triton is not installed")
    return _run(None)


@pytest.fixture(scope="session")
def triton36():
    d = _triton36_dir()
    if not (d / "triton").is_dir():
        _missing("ADARTS_REQUIRE_TRITON36", f"no Triton 3.6 under {d} "
                 f"(pip install --no-deps --target {d} triton==3.6.0)")
    return _run(d)


def _check(res):
    assert res["rows"], "nothing compiled"
    # every selected configuration compiled for both archs
    assert len(res["rows"]) == res["configs_compiled"] * len(tr.ARCHS)
    assert sorted(res["archs"]) == ["sm_80", "sm_90"]
    assert {r["arch"] for r in res["rows"]} == {"sm_80", "sm_90"}
    # every kernel of the package is among them
    kernels = {r["kernel"] for r in res["rows"]}
    assert len(kernels) == 11, sorted(kernels)
    for r in res["rows"]:
        assert 0 < r["registers"] <= 255, r
        assert r["shared_limit"] == tr.SHARED_LIMIT[int(r["arch"][3:])]
    # the compiled set holds every choice (dtype, BLOCK, num_warps, each constexpr value) of
    # every kernel and each kernel's heaviest configuration
    cov = res["coverage"]
    assert len(cov) == 11
    for name, c in cov.items():
        assert c["picked_choices"] == c["choices"], name
        assert c["heaviest_picked"], name
    blocks = {v for c in cov.values() for k, v in c["choices"] if k in ("BLOCK", "BLOCK_HW")}
    assert blocks == {16, 32, 64, 128, 256, 512, 1024}
    assert {v for c in cov.values() for k, v in c["choices"] if k == "dtype"} == {"*fp16", "*bf16", "*fp32", "*fp64"}
    # no spill (local memory) in any kernel, shared memory within the limit
    bad = tr.problems(res["rows"])
    assert not bad, "\n".join(bad)


def test_compile_venv_triton(venv_triton):
    _check(venv_triton)


def test_compile_triton36(triton36):
    assert triton36["triton"].startswith("3.6."), triton36["triton"]
    _check(triton36)


def test_tables(tmp_path, venv_triton):
    """The script's Markdown and JSON tables (written to a temporary directory)."""
    tr.write_tables([venv_triton], tmp_path)
    md = (tmp_path / "triton_resources.md").read_text()
    assert "_mixed_sum_bwd_dx_kernel" in md and "sm_90" in md
    assert (tmp_path / "triton_resources.json").stat().st_size > 0
