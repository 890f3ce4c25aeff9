"""The compiled extension ``adarts_kernels._C``: its loading state, the registered schemas,
whether it carries CUDA kernels.

If adarts_kernels._C is not installed, the schema test tries a JIT build of csrc/; when that
fails too it is skipped, or FAILS when ADARTS_REQUIRE_EXT=1 (as CI sets it).
"""
import os
import subprocess
import sys

import pytest
import torch

from adarts_kernels import _ext

REQUIRE_EXT = os.environ.get("ADARTS_REQUIRE_EXT", "").strip() == "1"


@pytest.fixture(scope="module")
def ext_unavailable():
    """None when the ops are registered, else the reason (JIT build attempted once)."""
    if _ext.HAS_EXT:
        return None
    first = _ext.EXT_ERROR
    try:
        _ext.jit_build()
        return None
    except Exception as e:  # any failure is a reason, reported below
        return f"adarts_kernels._C unavailable ({first}); JIT build failed: {e}"


@pytest.fixture
def needs_ext(ext_unavailable):
    if ext_unavailable is not None:
        if REQUIRE_EXT:
            pytest.fail(f"{ext_unavailable} [ADARTS_REQUIRE_EXT=1]")
        pytest.skip(ext_unavailable)


def test_schemas(needs_ext):
    expected = {
        "attention_score_fwd": "adarts_C::attention_score_fwd(Tensor x, Tensor w1, Tensor w2, int n_select) "
                               "-> (Tensor a, Tensor idx)",
        "attention_score_bwd": "adarts_C::attention_score_bwd(Tensor grad_a, Tensor x, Tensor w1, Tensor w2, "
                               "Tensor a) -> (Tensor dx, Tensor dw1, Tensor dw2)",
        "attention_gather_fwd": "adarts_C::attention_gather_fwd(Tensor x, Tensor a, Tensor idx) -> Tensor",
        "attention_gather_bwd": "adarts_C::attention_gather_bwd(Tensor grad, Tensor x, Tensor a, Tensor idx) "
                                "-> (Tensor dx, Tensor da)",
        "attention_writeback_fwd": "adarts_C::attention_writeback_fwd(Tensor x, Tensor a, Tensor idx, Tensor y, "
                                   "Tensor? beta, int stride) -> Tensor",
        "attention_writeback_bwd": "adarts_C::attention_writeback_bwd(Tensor grad, Tensor x, Tensor a, Tensor idx, "
                                   "Tensor y, Tensor? beta, int stride) -> (Tensor dx, Tensor da, Tensor dy, "
                                   "Tensor dbeta)",
        "mixed_sum_fwd": "adarts_C::mixed_sum_fwd(Tensor[] z, Tensor x, Tensor z_weights, Tensor pool_weights, "
                         "Tensor? identity_weight, int stride, float eps, Tensor? run_mean, Tensor? run_var) "
                         "-> (Tensor y, Tensor mean, Tensor var)",
        "mixed_sum_bwd": "adarts_C::mixed_sum_bwd(Tensor grad, Tensor[] z, Tensor x, Tensor z_weights, "
                         "Tensor pool_weights, Tensor? identity_weight, Tensor mean, Tensor var, int stride, "
                         "float eps, bool training) -> (Tensor[] dz, Tensor dx, Tensor dz_weights, "
                         "Tensor dpool_weights, Tensor didentity_weight)",
    }
    for name, schema in expected.items():
        assert str(getattr(torch.ops.adarts_C, name).default._schema) == schema
    assert _ext.HAS_EXT and _ext.EXT_ERROR is None


def test_ext_state_without_library():
    """With adarts_kernels._C missing, _ext reports why, without raising or warning."""
    code = ("import sys, warnings; warnings.simplefilter('error'); sys.modules['adarts_kernels._C'] = None\n"
            "from adarts_kernels import _ext\n"
            "assert not _ext.HAS_EXT and _ext.EXT_ERROR == _ext.NOT_BUILT, _ext.EXT_ERROR\n"
            "assert _ext.has_cuda_kernels() is False\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_has_cuda_kernels_cpu_build():
    assert isinstance(_ext.has_cuda_kernels(), bool)
    if torch.version.cuda is None:
        assert _ext.has_cuda_kernels() is False
