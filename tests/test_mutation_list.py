"""The mutation probe's list (tests/mutation/mutants.py) stays in step with the sources: each
mutant's text occurs exactly once in its file today, names are unique, every kind of bug is
covered, the bugs of issue 18 are listed, and every selection names existing test files."""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "mutation"))
import mutants as M  # noqa: E402


@pytest.mark.parametrize("m", M.MUTANTS, ids=[m.name for m in M.MUTANTS])
def test_mutant_applies_once(m):
    path = ROOT / m.file
    assert path.is_file(), f"{m.name}: {m.file} does not exist"
    n = path.read_text().count(m.find)
    assert n == 1, f"{m.name}: the text to replace occurs {n} times in {m.file}"
    assert m.find != m.replace, f"{m.name}: the replacement changes nothing"
    assert m.kind in M.KINDS, f"{m.name}: unknown kind {m.kind!r}"
    assert m.tests, f"{m.name}: no tests selected"
    for t in m.tests:
        assert (ROOT / t).is_file() and t.startswith("tests/") and t.endswith(".py"), f"{m.name}: no test file {t}"


def test_names_unique():
    names = [m.name for m in M.MUTANTS]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)


def test_every_kind_and_backend_covered():
    assert len(M.MUTANTS) >= 19
    assert set(M.KINDS) <= {m.kind for m in M.MUTANTS}
    assert {"python", "cpp", "cuda", "triton"} <= {m.backend for m in M.MUTANTS}
    for op in ("attention_score", "attention_gather", "attention_writeback", "mixed_sum"):
        assert any(op in m.file or any(op in t for t in m.tests) for m in M.MUTANTS), op


def test_issue_mutants_listed():
    by = M.BY_NAME
    for name in M.ISSUE_MUTANTS:
        assert name in by, name
    gather = by["triton_gather_fwd_load_unmasked"]
    assert gather.file == "adarts_kernels/triton/attention_gather.py"
    assert "tl.load" in gather.find and "mask=" in gather.find and "mask=" not in gather.replace
    barrier = by["cuda_block_sum_trailing_barrier"]
    assert barrier.file == "csrc/cuda/common.cuh" and "__syncthreads()" not in barrier.replace
    text = (ROOT / barrier.file).read_text()
    block_sum = text[text.index("A block_sum("):]
    block_sum = block_sum[:block_sum.index("\n}\n")]
    assert barrier.find in block_sum and block_sum.rstrip().endswith("return t;")
    acc = by["triton_acc_float16"]
    assert acc.file == "adarts_kernels/triton/_common.py" and "float16" in acc.replace
    grad = by["cpp_score_grad_rel_1e-4"]
    assert grad.file.startswith("csrc/cpu/") and "1.0001" in grad.replace
