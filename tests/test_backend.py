"""Backend selection: the ``backends()`` report, ``ADARTS_KERNELS_IMPL``, ``auto``, and an
explicit backend that cannot run (or does not exist) saying why."""
import importlib
import os

import pytest
import torch

import adarts_kernels
from adarts_kernels.backend import IMPLS, resolve
from adarts_kernels.ops import attention_gather


def _inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 4, 4, generator=g)
    a = torch.rand(2, 8, generator=g) * 0.9 + 0.05
    return x, a, torch.tensor([5, 1])


def test_backends_report(monkeypatch):
    info = adarts_kernels.backends()
    assert set(info) == {"reference", "cpp", "cuda", "triton"}
    assert info["reference"] == {"available": True, "reason": None}
    for v in info.values():
        assert v["available"] or isinstance(v["reason"], str) and v["reason"]
    monkeypatch.setenv("ADARTS_KERNELS_IMPL", "reference")
    assert resolve(None, torch.device("cpu")) == "reference"
    monkeypatch.setenv("ADARTS_KERNELS_IMPL", "nonsense")
    with pytest.raises(ValueError, match="ADARTS_KERNELS_IMPL"):
        resolve(None, torch.device("cpu"))
    monkeypatch.delenv("ADARTS_KERNELS_IMPL")
    assert resolve("auto", torch.device("cpu")) in ("cpp", "reference")
    assert set(IMPLS) == {"auto", "reference", "cpp", "cuda", "triton"}


def test_backends_note_unmeasured_gpu_speed(monkeypatch):
    """Until a GPU run has compared them, cuda and triton say that auto's order between them
    is unmeasured; with a CUDA device and the CUDA kernels (faked), both are available and
    keep the note."""
    from adarts_kernels import backend
    info = adarts_kernels.backends()
    assert "not yet measured on a GPU" in info["cuda"]["note"] and "preferred by auto" in info["cuda"]["note"]
    assert "not yet measured on a GPU" in info["triton"]["note"]
    assert "note" not in info["reference"] and "note" not in info["cpp"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(backend, "_ext_state", lambda: (True, None, True))
    monkeypatch.setattr(backend, "_triton_state", lambda: (True, None))
    info = adarts_kernels.backends()
    assert info["cuda"]["available"] and info["cuda"]["reason"] is None
    assert info["triton"]["available"] and info["triton"]["reason"] is None
    assert info["cuda"]["note"] == backend.UNMEASURED_ON_GPU["cuda"]
    assert resolve("auto", torch.device("cuda")) == "cuda"


def test_explicit_backend_that_cannot_run_says_why():
    x, a, idx = _inputs()
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run here"):
        attention_gather(x, a, idx, impl="cuda")


def test_unknown_backend():
    x, a, idx = _inputs()
    with pytest.raises(ValueError, match="unknown backend"):
        attention_gather(x, a, idx, impl="fpga")


def test_triton_package_flags_and_launchers():
    """``adarts_kernels.triton`` reports whether triton imports; each kernel module has its
    launchers; ``POISON_OUTPUTS`` fills launcher-allocated buffers with NaN."""
    import adarts_kernels.triton as tr
    if not tr.HAS_TRITON:
        if os.environ.get("ADARTS_REQUIRE_TRITON") == "1":
            pytest.fail(f"triton does not import: {tr.TRITON_ERROR!r} [ADARTS_REQUIRE_TRITON=1]")
        pytest.skip(f"triton does not import: {tr.TRITON_ERROR!r}")
    assert tr.HAS_TRITON is True and tr.TRITON_ERROR is None
    for op in ("attention_score", "attention_gather", "attention_writeback", "mixed_sum"):
        module = importlib.import_module(f"adarts_kernels.triton.{op}")
        for name in (f"{op}_fwd", f"{op}_bwd"):
            assert callable(getattr(module, name))
    before = tr.POISON_OUTPUTS
    try:
        tr.POISON_OUTPUTS = True
        from adarts_kernels.triton._common import empty
        assert torch.isnan(empty((3,), torch.float32, "cpu")).all()
    finally:
        tr.POISON_OUTPUTS = before


def test_backends_import_downwards_only():
    """The op layer dispatches to the Triton launchers, so the launchers import nothing from
    the op modules (only the shared reference math and adarts_kernels.limits); the constant
    they share agrees with the compiled kernels' (csrc/validate.h)."""
    import ast
    import re
    from pathlib import Path

    from adarts_kernels.limits import MAX_Z
    from adarts_kernels.ops.mixed_sum import MAX_Z as ops_max_z

    root = Path(adarts_kernels.__file__).parent
    op_modules = {"attention_score", "attention_gather", "attention_writeback", "mixed_sum"}
    for path in sorted((root / "triton").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                parts = node.module.split(".")
                assert not ("ops" in parts and op_modules & set(parts)), f"{path.name} imports {node.module}"
                if node.module == "ops" or parts[-1] == "ops":
                    assert not op_modules & {a.name for a in node.names}, f"{path.name} imports ops' op modules"
    validate_h = (root.parent / "csrc" / "validate.h")
    if validate_h.is_file():
        m = re.search(r"kMixedSumMaxZ\s*=\s*(\d+)", validate_h.read_text())
        assert m and int(m.group(1)) == MAX_Z
    assert ops_max_z == MAX_Z
