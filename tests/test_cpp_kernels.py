"""The compiled CPU operators (torch.ops.adarts_C.*) against the plain-PyTorch reference.

If adarts_kernels._C is not installed, the tests try a JIT build of csrc/; when that fails
too they are skipped, or FAIL when ADARTS_REQUIRE_EXT=1 (as CI sets it).
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from adarts_kernels import _ext
from adarts_kernels.ops import reference as R

REQUIRE_EXT = os.environ.get("ADARTS_REQUIRE_EXT", "").strip() == "1"
LOW = (torch.bfloat16, torch.float16)
DTYPES = (torch.float64, torch.float32) + LOW


@pytest.fixture(scope="session")
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


@pytest.fixture(autouse=True)
def _needs_ext(ext_unavailable):
    if ext_unavailable is not None:
        if REQUIRE_EXT:
            pytest.fail(f"{ext_unavailable} [ADARTS_REQUIRE_EXT=1]")
        pytest.skip(ext_unavailable)


def ops():
    return torch.ops.adarts_C


# ----------------------------------------------------------------------------- helpers

def gen(seed):
    return torch.Generator().manual_seed(seed)


def rand_idx(C, n, g):
    """An unsorted random permutation prefix."""
    return torch.randperm(C, generator=g)[:n]


def poison_heap(*like):
    """Allocate NaN-filled blocks of the outputs' sizes and free them, so that an output
    buffer the allocator hands out again starts as NaN: an element a kernel forgets to write
    then shows up in the whole-tensor comparisons."""
    for t in like:
        for dt in (torch.float64, torch.float32, torch.float16):
            torch.full((max(t.numel(), 1),), float("nan"), dtype=dt)


def score_inputs(B, C, H, W, dtype, seed):
    g = gen(seed)
    R_ = max(C // 2, 1)
    x = torch.randn(B, C, H, W, generator=g, dtype=torch.float64)
    w1 = torch.randn(R_, C, generator=g, dtype=torch.float64) / C ** 0.5
    w2 = torch.randn(C, R_, generator=g, dtype=torch.float64) / R_ ** 0.5
    return x.to(dtype), w1.to(dtype), w2.to(dtype)


def attn(B, C, dtype, g):
    return (torch.rand(B, C, generator=g, dtype=torch.float64) * 0.9 + 0.05).to(dtype)


def assert_topk(idx, ref_idx, score, tol):
    """idx equal to ref_idx, except where two positions hold scores equal within tol."""
    assert idx.dtype == torch.int64 and idx.shape == ref_idx.shape
    if torch.equal(idx, ref_idx):
        return
    diff = (score[idx] - score[ref_idx]).abs().max().item()
    assert diff <= tol, f"top-k differs beyond near-ties: {idx.tolist()} vs {ref_idx.tolist()}"


def close(ours, ref, dtype):
    if dtype == torch.float64:
        torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    else:
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


def check_outputs(ours, ref, dtype, inputs, ref_fn):
    """ours, ref: tuples of tensors (ref from the reference on the same inputs).

    float64 / float32: close to the reference. bfloat16 / float16: against the reference run
    in float32 on the same (rounded) inputs, the error must stay within 2x what the
    reference's own same-precision result misses by, plus one unit in the last place of the
    largest value (rounding ties between two float32 values near a rounding boundary)."""
    assert len(ours) == len(ref)
    for o, r in zip(ours, ref):
        assert o.dtype == r.dtype and o.shape == r.shape, (o.dtype, o.shape, r.dtype, r.shape)
    if dtype not in LOW:
        for o, r in zip(ours, ref):
            close(o, r, dtype)
        return
    def upcast(t):
        if isinstance(t, list):  # Tensor[] arguments (mixed_sum's z)
            return [upcast(u) for u in t]
        return t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t

    up = [upcast(t) for t in inputs]
    truth = ref_fn(*up)
    eps = torch.finfo(dtype).eps
    for o, r, t in zip(ours, ref, truth):
        t = t.float()
        err = (o.float() - t).abs().max().item()
        base = (r.float() - t).abs().max().item()
        floor = eps * t.abs().max().item() + 1e-30
        assert err <= 2 * base + floor, f"{dtype}: error {err:.3g} vs reference's own {base:.3g}"


SHAPES_S1 = [(3, 12, 7, 5), (2, 8, 4, 6), (1, 4, 1, 1)]
SHAPES_S2 = [(3, 12, 8, 6), (2, 8, 2, 2)]


def n_values(C):
    return sorted({max(C // 4, 1), 1, C})


# ----------------------------------------------------------------------------- registration

def test_schemas():
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
        assert str(getattr(ops(), name).default._schema) == schema
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


# ----------------------------------------------------------------------------- scoring

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES_S1 + SHAPES_S2, ids=str)
def test_score_fwd(dtype, shape):
    B, C, H, W = shape
    x, w1, w2 = score_inputs(B, C, H, W, dtype, seed=1)
    for n in n_values(C):
        poison_heap(x[:, :, 0, 0])
        a, idx = ops().attention_score_fwd(x, w1, w2, n)
        ra, ridx = R.attention_score_fwd(x, w1, w2, n)
        check_outputs((a,), (ra,), dtype, (x, w1, w2, n), lambda *t: R.attention_score_fwd(*t)[:1])
        score = R.attention_score_fwd(x.double(), w1.double(), w2.double(), C)[0].sum(0)
        assert_topk(idx, ridx, score, tol=1e-12 if dtype == torch.float64 else 1e-5 * B)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES_S1 + SHAPES_S2, ids=str)
def test_score_bwd(dtype, shape):
    B, C, H, W = shape
    x, w1, w2 = score_inputs(B, C, H, W, dtype, seed=2)
    a, _ = R.attention_score_fwd(x, w1, w2, 1)
    grad_a = torch.randn(B, C, generator=gen(3), dtype=torch.float64).to(dtype)
    poison_heap(x, w1, w2)
    ours = ops().attention_score_bwd(grad_a, x, w1, w2, a)
    ref = R.attention_score_bwd(grad_a, x, w1, w2, a)
    check_outputs(tuple(ours), ref, dtype, (grad_a, x, w1, w2, a), R.attention_score_bwd)


def test_score_bwd_matches_autograd():
    """The reference backward formulas agree with autograd of the reference forward, so the
    C++ backward is the gradient of the C++ forward."""
    x, w1, w2 = score_inputs(2, 6, 3, 4, torch.float64, seed=4)
    x, w1, w2 = (t.clone().requires_grad_() for t in (x, w1, w2))
    a, _ = ops().attention_score_fwd(x.detach(), w1.detach(), w2.detach(), 3)
    grad_a = torch.randn(2, 6, generator=gen(5), dtype=torch.float64)
    ra, _ = R.attention_score_fwd(x, w1, w2, 3)
    gx, gw1, gw2 = torch.autograd.grad(ra, (x, w1, w2), grad_a)
    dx, dw1, dw2 = ops().attention_score_bwd(grad_a, x.detach(), w1.detach(), w2.detach(), a)
    for o, r in ((dx, gx), (dw1, gw1), (dw2, gw2)):
        torch.testing.assert_close(o, r, rtol=1e-10, atol=1e-12)


def test_score_ties_all_equal():
    """w2 = 0: every a is sigmoid(0) = 0.5, so idx must be 0, 1, ..., n-1."""
    x, w1, w2 = score_inputs(3, 12, 5, 5, torch.float32, seed=6)
    w2 = torch.zeros_like(w2)
    for n in (1, 3, 12):
        a, idx = ops().attention_score_fwd(x, w1, w2, n)
        assert torch.equal(a, torch.full_like(a, 0.5))
        assert idx.tolist() == list(range(n))
        assert torch.equal(idx, R.attention_score_fwd(x, w1, w2, n)[1])


@pytest.mark.parametrize("dtype", (torch.float64, torch.float32, torch.bfloat16), ids=str)
def test_score_ties_pairs(dtype):
    """Channels with identical inputs and MLP rows have equal columns of a, hence equal
    scores: the lower channel index must come first, wherever the pair falls relative to
    the cut. (The reference's BLAS matmul may round two equal columns differently, so it is
    compared up to near-ties; the pair (4, 7) with zero w2 rows ties exactly in both.)"""
    B, C = 3, 12
    pairs = ((2, 9), (0, 11), (5, 6), (4, 7))
    x, w1, w2 = score_inputs(B, C, 4, 5, torch.float64, seed=7)
    for lo, hi in pairs:
        x[:, hi] = x[:, lo]
        w2[hi] = w2[lo]
    w2[4] = w2[7] = 0.0
    x, w1, w2 = x.to(dtype), w1.to(dtype), w2.to(dtype)
    a, idx = ops().attention_score_fwd(x, w1, w2, C)
    order = idx.tolist()
    for lo, hi in pairs:
        assert torch.equal(a[:, lo], a[:, hi])
        assert order.index(hi) == order.index(lo) + 1, order
    ra, ridx = R.attention_score_fwd(x, w1, w2, C)
    rorder = ridx.tolist()
    assert rorder.index(7) == rorder.index(4) + 1
    assert_topk(idx, ridx, ra.double().sum(0), tol=1e-12 if dtype == torch.float64 else 1e-5 * B)
    for n in range(1, C + 1):   # every cut: a prefix of the full order
        assert ops().attention_score_fwd(x, w1, w2, n)[1].tolist() == order[:n]


def test_score_first_maximum():
    """Repeated maxima in a plane: the max-pool gradient goes to the first one."""
    g = gen(8)
    x = torch.randint(-2, 3, (2, 6, 4, 5), generator=g).double()
    x[:, :, 1, 1] = 5.0
    x[:, :, 3, 0] = 5.0
    _, w1, w2 = score_inputs(2, 6, 4, 5, torch.float64, seed=9)
    a, _ = ops().attention_score_fwd(x, w1, w2, 2)
    grad_a = torch.randn(2, 6, generator=g, dtype=torch.float64)
    dx = ops().attention_score_bwd(grad_a, x, w1, w2, a)[0]
    rdx = R.attention_score_bwd(grad_a, x, w1, w2, a)[0]
    torch.testing.assert_close(dx, rdx, rtol=1e-12, atol=1e-12)
    off = dx - dx[:, :, :1, :1]         # the d_mx part, only at (1, 1)
    assert torch.count_nonzero(off[:, :, 3, 0]) == 0


# ----------------------------------------------------------------------------- gather

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES_S1, ids=str)
def test_gather(dtype, shape):
    B, C, H, W = shape
    g = gen(10)
    x = torch.randn(B, C, H, W, generator=g, dtype=torch.float64).to(dtype)
    a = attn(B, C, dtype, g)
    for n in n_values(C):
        idx = rand_idx(C, n, g)
        poison_heap(x)
        out = ops().attention_gather_fwd(x, a, idx)
        check_outputs((out,), (R.attention_gather_fwd(x, a, idx),), dtype, (x, a, idx),
                      lambda *t: (R.attention_gather_fwd(*t),))
        grad = torch.randn(B, n, H, W, generator=g, dtype=torch.float64).to(dtype)
        poison_heap(x, a)
        ours = ops().attention_gather_bwd(grad, x, a, idx)
        check_outputs(tuple(ours), R.attention_gather_bwd(grad, x, a, idx), dtype, (grad, x, a, idx),
                      R.attention_gather_bwd)
        keep = torch.ones(C, dtype=torch.bool)
        keep[idx] = False
        assert torch.count_nonzero(ours[0][:, keep]) == 0 and torch.count_nonzero(ours[1][:, keep]) == 0


# ----------------------------------------------------------------------------- write-back

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("stride,shape", [(1, s) for s in SHAPES_S1] + [(2, s) for s in SHAPES_S2], ids=str)
@pytest.mark.parametrize("with_beta", (True, False), ids=("beta", "nobeta"))
def test_writeback(dtype, stride, shape, with_beta):
    B, C, H, W = shape
    Ho, Wo = H // stride, W // stride
    g = gen(11)
    x = torch.randn(B, C, H, W, generator=g, dtype=torch.float64).to(dtype)
    a = attn(B, C, dtype, g)
    beta = torch.tensor(0.7, dtype=dtype) if with_beta else None
    for n in n_values(C):
        idx = rand_idx(C, n, g)
        y = torch.randn(B, n, Ho, Wo, generator=g, dtype=torch.float64).to(dtype)
        poison_heap(x)
        out = ops().attention_writeback_fwd(x, a, idx, y, beta, stride)
        check_outputs((out,), (R.attention_writeback_fwd(x, a, idx, y, beta, stride),), dtype,
                      (x, a, idx, y, beta, stride), lambda *t: (R.attention_writeback_fwd(*t),))

        grad = torch.randn(B, C, Ho, Wo, generator=g, dtype=torch.float64).to(dtype)
        poison_heap(x, a, y)
        dx, da, dy, dbeta = ops().attention_writeback_bwd(grad, x, a, idx, y, beta, stride)
        ref = R.attention_writeback_bwd(grad, x, a, idx, y, beta, stride)
        if with_beta:
            assert dbeta.dim() == 0 and dbeta.dtype == dtype
            check_outputs((dx, da, dy, dbeta), ref, dtype, (grad, x, a, idx, y, beta, stride),
                          R.attention_writeback_bwd)
        else:
            assert ref[3] is None
            assert dbeta.dim() == 0 and dbeta.dtype == dtype and dbeta.item() == 0.0
            check_outputs((dx, da, dy), ref[:3], dtype, (grad, x, a, idx, y, beta, stride),
                          lambda *t: R.attention_writeback_bwd(*t)[:3])


@pytest.mark.parametrize("stride", (1, 2))
def test_writeback_matches_autograd(stride):
    """The backward is the gradient of the forward (float64, autograd of the reference)."""
    B, C, H, W, n = 2, 8, 4, 6, 3
    g = gen(12)
    x = torch.randn(B, C, H, W, generator=g, dtype=torch.float64, requires_grad=True)
    a = attn(B, C, torch.float64, g).requires_grad_()
    y = torch.randn(B, n, H // stride, W // stride, generator=g, dtype=torch.float64, requires_grad=True)
    beta = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    idx = rand_idx(C, n, g)
    out = R.attention_writeback_fwd(x, a, idx, y, beta, stride)
    grad = torch.randn(out.shape, generator=g, dtype=torch.float64)
    expected = torch.autograd.grad(out, (x, a, y, beta), grad)
    ours = ops().attention_writeback_bwd(grad, x.detach(), a.detach(), idx, y.detach(), beta.detach(), stride)
    for o, r in zip(ours, expected):
        torch.testing.assert_close(o, r, rtol=1e-10, atol=1e-12)


def test_writeback_stride2_window_ties():
    """Equal values inside 2x2 windows: the gradient goes to the first in row-major order."""
    B, C, H, W, n = 2, 6, 6, 4, 2
    g = gen(13)
    x = torch.randint(0, 2, (B, C, H, W), generator=g).double()
    a = attn(B, C, torch.float64, g)
    idx = rand_idx(C, n, g)
    y = torch.randn(B, n, H // 2, W // 2, generator=g, dtype=torch.float64)
    beta = torch.tensor(1.3, dtype=torch.float64)
    grad = torch.randn(B, C, H // 2, W // 2, generator=g, dtype=torch.float64)
    ours = ops().attention_writeback_bwd(grad, x, a, idx, y, beta, 2)
    ref = R.attention_writeback_bwd(grad, x, a, idx, y, beta, 2)
    for o, r in zip(ours, ref):
        torch.testing.assert_close(o, r, rtol=1e-12, atol=1e-12)
    assert torch.equal(ops().attention_writeback_fwd(x, a, idx, y, beta, 2),
                       R.attention_writeback_fwd(x, a, idx, y, beta, 2))


def test_parallel_chunks_deterministic():
    """Sizes that split into several at::parallel_for chunks; two runs give identical bits."""
    B, C, H, W, n = 4, 32, 32, 32, 8
    g = gen(14)
    x = torch.randn(B, C, H, W, generator=g)
    a = attn(B, C, torch.float32, g)
    idx = rand_idx(C, n, g)
    y = torch.randn(B, n, H // 2, W // 2, generator=g)
    beta = torch.tensor(0.5)
    grad = torch.randn(B, C, H // 2, W // 2, generator=g)
    first = ops().attention_writeback_bwd(grad, x, a, idx, y, beta, 2)
    second = ops().attention_writeback_bwd(grad, x, a, idx, y, beta, 2)
    for o, r, e in zip(first, second, R.attention_writeback_bwd(grad, x, a, idx, y, beta, 2)):
        assert torch.equal(o, r)
        torch.testing.assert_close(o, e, rtol=1e-5, atol=1e-5)
    _, w1, w2 = score_inputs(B, C, 1, 1, torch.float32, seed=15)
    ours = ops().attention_score_fwd(x, w1, w2, n)
    ref = R.attention_score_fwd(x, w1, w2, n)
    torch.testing.assert_close(ours[0], ref[0], rtol=1e-5, atol=1e-6)
    assert_topk(ours[1], ref[1], ref[0].double().sum(0), tol=1e-5 * B)


# ----------------------------------------------------------------------------- refusals

def _base_args(dtype=torch.float32):
    g = gen(16)
    B, C, H, W, n = 2, 8, 4, 6, 2
    x = torch.randn(B, C, H, W, generator=g, dtype=dtype)
    a = attn(B, C, dtype, g)
    idx = torch.tensor([5, 1])
    y = torch.randn(B, n, H, W, generator=g, dtype=dtype)
    y2 = torch.randn(B, n, H // 2, W // 2, generator=g, dtype=dtype)
    w1 = torch.randn(C // 2, C, generator=g, dtype=dtype)
    w2 = torch.randn(C, C // 2, generator=g, dtype=dtype)
    beta = torch.tensor(0.5, dtype=dtype)
    return dict(x=x, a=a, idx=idx, y=y, y2=y2, w1=w1, w2=w2, beta=beta,
                gsel=torch.randn(B, n, H, W, generator=g, dtype=dtype),
                gout=torch.randn(B, C, H, W, generator=g, dtype=dtype),
                ga=torch.randn(B, C, generator=g, dtype=dtype))


def _refusals():
    o = lambda: torch.ops.adarts_C  # noqa: E731
    d = _base_args()
    x, a, idx, y, y2, w1, w2, beta = (d[k] for k in ("x", "a", "idx", "y", "y2", "w1", "w2", "beta"))
    gsel, gout, ga = d["gsel"], d["gout"], d["ga"]
    odd = torch.randn(2, 8, 5, 6)
    G, S, WB = "attention_gather", "attention_score", "attention_writeback"
    return [
        # (id, op name expected in the message, words expected, call)
        ("gather-rank", G, "4-d", lambda: o().attention_gather_fwd(x[0], a, idx)),
        ("gather-a-shape", G, "shape", lambda: o().attention_gather_fwd(x, a[:, :6].contiguous(), idx)),
        ("gather-a-rank", G, "shape", lambda: o().attention_gather_fwd(x, a[0], idx)),
        ("gather-idx-range", G, "out of range", lambda: o().attention_gather_fwd(x, a, torch.tensor([1, 8]))),
        ("gather-idx-negative", G, "out of range", lambda: o().attention_gather_fwd(x, a, torch.tensor([-1]))),
        ("gather-idx-repeat", G, "repeat", lambda: o().attention_gather_fwd(x, a, torch.tensor([3, 1, 3]))),
        ("gather-idx-dtype", G, "int64", lambda: o().attention_gather_fwd(x, a, idx.int())),
        ("gather-idx-rank", G, "1-d", lambda: o().attention_gather_fwd(x, a, idx[None])),
        ("gather-idx-too-many", G, "more than", lambda: o().attention_gather_fwd(x, a, torch.arange(9))),
        ("gather-dtype", G, "dtype", lambda: o().attention_gather_fwd(x, a.double(), idx)),
        ("gather-x-int", G, "floating", lambda: o().attention_gather_fwd(x.int(), a.int(), idx)),
        ("gather-noncontig", G, "contiguous", lambda: o().attention_gather_fwd(x.transpose(2, 3), a, idx)),
        ("gather-noncontig-a", G, "contiguous",
         lambda: o().attention_gather_fwd(x, a.t().contiguous().t(), idx)),
        ("gather-bwd-grad-shape", G, "shape", lambda: o().attention_gather_bwd(gout, x, a, idx)),
        ("gather-bwd-grad-dtype", G, "dtype", lambda: o().attention_gather_bwd(gsel.double(), x, a, idx)),
        ("score-rank", S, "4-d", lambda: o().attention_score_fwd(x[0], w1, w2, 2)),
        ("score-w1-shape", S, "w1", lambda: o().attention_score_fwd(x, w1[:, :6].contiguous(), w2, 2)),
        ("score-w2-shape", S, "w2", lambda: o().attention_score_fwd(x, w1, w2[:6], 2)),
        ("score-w-dtype", S, "dtype", lambda: o().attention_score_fwd(x, w1.double(), w2, 2)),
        ("score-n0", S, "n_select", lambda: o().attention_score_fwd(x, w1, w2, 0)),
        ("score-n-big", S, "n_select", lambda: o().attention_score_fwd(x, w1, w2, 9)),
        ("score-empty-plane", S, "H, W", lambda: o().attention_score_fwd(x[:, :, :0], w1, w2, 2)),
        ("score-noncontig", S, "contiguous",
         lambda: o().attention_score_fwd(x.contiguous(memory_format=torch.channels_last), w1, w2, 2)),
        ("score-bwd-a-shape", S, "shape", lambda: o().attention_score_bwd(ga, x, w1, w2, a[:1])),
        ("score-bwd-grad-dtype", S, "dtype", lambda: o().attention_score_bwd(ga.double(), x, w1, w2, a)),
        ("wb-stride3", WB, "stride", lambda: o().attention_writeback_fwd(x, a, idx, y, beta, 3)),
        ("wb-stride0", WB, "stride", lambda: o().attention_writeback_fwd(x, a, idx, y, beta, 0)),
        ("wb-odd-h", WB, "even", lambda: o().attention_writeback_fwd(odd, a, idx, y2, beta, 2)),
        ("wb-y-shape-s2", WB, "y must have shape", lambda: o().attention_writeback_fwd(x, a, idx, y, beta, 2)),
        ("wb-y-shape-s1", WB, "y must have shape", lambda: o().attention_writeback_fwd(x, a, idx, y2, beta, 1)),
        ("wb-y-n", WB, "y must have shape",
         lambda: o().attention_writeback_fwd(x, a, torch.tensor([5]), y, beta, 1)),
        ("wb-idx-repeat", WB, "repeat", lambda: o().attention_writeback_fwd(x, a, torch.tensor([2, 2]), y, beta, 1)),
        ("wb-idx-range", WB, "out of range",
         lambda: o().attention_writeback_fwd(x, a, torch.tensor([2, 100]), y, beta, 1)),
        ("wb-beta-dtype", WB, "dtype", lambda: o().attention_writeback_fwd(x, a, idx, y, beta.double(), 1)),
        ("wb-beta-numel", WB, "beta", lambda: o().attention_writeback_fwd(x, a, idx, y, torch.ones(2), 1)),
        ("wb-dtype", WB, "dtype", lambda: o().attention_writeback_fwd(x, a.double(), idx, y, beta, 1)),
        ("wb-noncontig-y", WB, "contiguous",
         lambda: o().attention_writeback_fwd(x, a, idx, y.transpose(2, 3).contiguous().transpose(2, 3), beta, 1)),
        ("wb-bwd-grad-shape", WB, "grad", lambda: o().attention_writeback_bwd(gout, x, a, idx, y2, beta, 2)),
        ("wb-bwd-stride3", WB, "stride", lambda: o().attention_writeback_bwd(gout, x, a, idx, y, beta, 3)),
    ]


_REFUSALS = _refusals()


@pytest.mark.parametrize("name,op,words,call", _REFUSALS, ids=[r[0] for r in _REFUSALS])
def test_refusals(name, op, words, call):
    with pytest.raises(RuntimeError) as info:
        call()
    msg = str(info.value)
    assert f"adarts {op}:" in msg, (name, msg)
    assert words in msg, (name, msg)
