"""The CUDA kernels of the adarts_C operators (csrc/cuda/) against the plain-PyTorch
reference, on CUDA tensors: forward and backward, float32 / float16 / bfloat16 (and
float64), stride 1 and 2, odd and large shapes, misaligned storage (scalar fallbacks),
ties, and no host synchronisation (``torch.cuda.set_sync_debug_mode("error")``).

Skipped unless a CUDA device is visible and the installed extension registers CUDA kernels
(built with WITH_CUDA from csrc/cuda/).
"""
import math

import pytest
import torch
from gpu_helpers import no_host_sync

from adarts_kernels.ops import reference as R


def _why_skip():
    if not torch.cuda.is_available():
        return "no CUDA device visible to torch"
    try:
        import adarts_kernels._C  # noqa: F401  (registers torch.ops.adarts_C.*)
    except Exception as e:  # not built, ABI mismatch...
        return f"adarts_kernels._C is not importable ({type(e).__name__}: {e})"
    try:
        torch.ops.adarts_C.attention_gather_fwd
        has = torch._C._dispatch_has_kernel_for_dispatch_key("adarts_C::attention_gather_fwd", "CUDA")
    except Exception as e:
        return f"torch.ops.adarts_C is not registered ({type(e).__name__}: {e})"
    if not has:
        return "the extension was built without CUDA kernels"
    return None


_SKIP = _why_skip()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")]

DEV = "cuda"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ALL_DTYPES = DTYPES + [torch.float64]
# (rtol, atol): both sides compute in float (double) and round once to the output dtype, so
# they differ by the summation order of the reductions and at most ~1 ulp of the dtype.
TOL = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


def ops():
    return torch.ops.adarts_C




def close(got, ref, dtype, scale=1.0, what=""):
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(got, ref, rtol=rtol, atol=atol * scale, equal_nan=True,
                               msg=lambda m: f"{what}: {m}")


def to_dev(t, misaligned=False):
    """t on the GPU; misaligned: storage offset of one element, so no vector path applies."""
    if not misaligned:
        return t.to(DEV)
    buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=DEV)
    v = buf[1:].view(t.shape)
    v.copy_(t.to(DEV))
    return v


def randn(gen, shape, dtype, misaligned=False):
    return to_dev(torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype), misaligned)


def attention(gen, B, C, dtype):
    return to_dev((torch.rand(B, C, generator=gen, dtype=torch.float64) * 0.9 + 0.05).to(dtype))


def rand_idx(gen, C, n):
    return torch.randperm(C, generator=gen)[:n].to(DEV)


# ----------------------------------------------------------------------------- gather

GATHER_SHAPES = [  # B, C, H, W, n
    (2, 5, 4, 4, 3),      # small planes (one warp per plane), vectorised
    (3, 7, 5, 3, 7),      # odd plane (scalar path), every channel selected
    (2, 3, 40, 40, 2),    # one block per plane
    (1, 4, 70, 61, 2),    # large odd plane: several tiles per plane in the forward
    (2, 16, 32, 32, 16),
]


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("shape", GATHER_SHAPES)
@pytest.mark.parametrize("misaligned", [False, True])
def test_gather_matches_reference(dtype, shape, misaligned):
    B, C, H, W, n = shape
    gen = torch.Generator().manual_seed(hash((B, C, H, W, n)) % 1000)
    x = randn(gen, (B, C, H, W), dtype, misaligned)
    a = attention(gen, B, C, dtype)
    idx = rand_idx(gen, C, n)
    g = randn(gen, (B, n, H, W), dtype, misaligned)
    with no_host_sync():
        out = ops().attention_gather_fwd(x, a, idx)
        dx, da = ops().attention_gather_bwd(g, x, a, idx)
    close(out, R.attention_gather_fwd(x, a, idx), dtype, what="out")
    rdx, rda = R.attention_gather_bwd(g, x, a, idx)
    close(dx, rdx, dtype, what="dx")
    close(da, rda, dtype, scale=math.sqrt(H * W), what="da")


# ----------------------------------------------------------------------------- write-back

WRITEBACK_SHAPES = {  # B, C, H, W, n
    1: [(2, 6, 8, 8, 3), (2, 5, 7, 9, 2), (2, 3, 44, 40, 1), (1, 4, 130, 70, 1), (3, 8, 5, 5, 8)],
    2: [(2, 6, 8, 8, 3), (2, 5, 6, 10, 2), (2, 3, 44, 40, 1), (1, 3, 130, 72, 1), (3, 8, 4, 4, 8)],
}


def _writeback_case(dtype, stride, shape, with_beta, misaligned, ties=False, seed=0):
    B, C, H, W, n = shape
    gen = torch.Generator().manual_seed(seed + 7 * stride + 31 * H + W)
    if ties:  # many equal values in each 2x2 window: the gradient goes to the first maximum
        x = to_dev(torch.randint(-2, 3, (B, C, H, W), generator=gen).to(dtype), misaligned)
    else:
        x = randn(gen, (B, C, H, W), dtype, misaligned)
    a = attention(gen, B, C, dtype)
    idx = rand_idx(gen, C, n)
    y = randn(gen, (B, n, H // stride, W // stride), dtype, misaligned)
    beta = to_dev(torch.tensor(0.37, dtype=dtype)) if with_beta else None
    g = randn(gen, (B, C, H // stride, W // stride), dtype, misaligned)
    return x, a, idx, y, beta, g


def _check_writeback(dtype, stride, shape, x, a, idx, y, beta, g):
    B, C, H, W, n = shape
    with no_host_sync():
        out = ops().attention_writeback_fwd(x, a, idx, y, beta, stride)
        dx, da, dy, dbeta = ops().attention_writeback_bwd(g, x, a, idx, y, beta, stride)
    close(out, R.attention_writeback_fwd(x, a, idx, y, beta, stride), dtype, what="out")
    rdx, rda, rdy, rdbeta = R.attention_writeback_bwd(g, x, a, idx, y, beta, stride)
    hwo = (H // stride) * (W // stride)
    close(dx, rdx, dtype, what="dx")
    close(da, rda, dtype, scale=math.sqrt(hwo), what="da")
    close(dy, rdy, dtype, what="dy")
    if beta is None:
        assert dbeta.shape == () and dbeta.dtype == x.dtype and dbeta.device == x.device
        assert dbeta.item() == 0.0
    else:
        assert dbeta.shape == beta.shape and dbeta.dtype == beta.dtype
        close(dbeta, rdbeta, dtype, scale=math.sqrt(B * C * hwo), what="dbeta")


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("case", range(5))
@pytest.mark.parametrize("with_beta", [True, False])
@pytest.mark.parametrize("misaligned", [False, True])
def test_writeback_matches_reference(dtype, stride, case, with_beta, misaligned):
    shape = WRITEBACK_SHAPES[stride][case]
    x, a, idx, y, beta, g = _writeback_case(dtype, stride, shape, with_beta, misaligned)
    _check_writeback(dtype, stride, shape, x, a, idx, y, beta, g)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("misaligned", [False, True])
def test_writeback_window_ties_and_nan(dtype, misaligned):
    shape = (2, 6, 8, 12, 2)
    x, a, idx, y, beta, g = _writeback_case(dtype, 2, shape, True, misaligned, ties=True)
    _check_writeback(dtype, 2, shape, x, a, idx, y, beta, g)
    # A NaN in a window is its maximum (the last NaN of the window, like F.max_pool2d). On
    # bypass channels only: the reference's masked products (0 * NaN) would turn da and dbeta
    # of a *selected* NaN channel into NaN, where the kernels (CPU and CUDA) give 0 and skip it.
    c0, c1 = [c for c in range(shape[1]) if c not in idx.tolist()][:2]
    x = x.clone()
    x[0, c0, 0, 0] = float("nan")
    x[1, c1, 2, 5] = float("nan")
    x[1, c1, 3, 4] = float("nan")
    _check_writeback(dtype, 2, shape, x, a, idx, y, beta, g)


# ----------------------------------------------------------------------------- scoring

SCORE_SHAPES = [  # B, C, H, W, n
    (2, 8, 4, 4, 3),
    (3, 10, 5, 7, 10),
    (2, 6, 40, 41, 2),     # one block per plane (pools), scalar path
    (4, 40, 3, 3, 17),
    (40, 96, 2, 3, 48),    # several GEMM tiles in every direction
    (1, 4, 70, 61, 2),
]


def _score_inputs(gen, shape, dtype, misaligned=False, ties=False):
    B, C, H, W, n = shape
    if ties:  # equal values inside planes: the max-pool gradient goes to the first maximum
        x = to_dev(torch.randint(-1, 2, (B, C, H, W), generator=gen).to(dtype), misaligned)
    else:
        x = randn(gen, (B, C, H, W), dtype, misaligned)
    w1 = to_dev((torch.randn(C // 2, C, generator=gen, dtype=torch.float64) / math.sqrt(C)).to(dtype))
    w2 = to_dev((torch.randn(C, C // 2, generator=gen, dtype=torch.float64) / math.sqrt(max(C // 2, 1))).to(dtype))
    return x, w1, w2


def _reference_scores(x, w1, w2):
    """a.sum(0) exactly as the reference ranks it (float a, before rounding to x's dtype)."""
    avg, mx, _ = R.attention_pools(x)
    w1f, w2f = R._acc(w1), R._acc(w2)
    z = torch.relu(avg @ w1f.t()) @ w2f.t() + torch.relu(mx @ w1f.t()) @ w2f.t()
    return torch.sigmoid(z).sum(0)


def _check_topk(idx, ridx, x, w1, w2, n):
    assert idx.dtype == torch.int64 and idx.shape == (n,) and idx.device == x.device
    if torch.equal(idx, ridx):
        return
    # The summation order of the MLP differs between backends, so nearly equal scores may
    # rank differently; the selected scores must still be the top ones, in order.
    s = _reference_scores(x, w1, w2).double()
    assert idx.unique().numel() == n, f"idx repeats a channel: {idx.tolist()}"
    top = s.sort(descending=True, stable=True).values[:n]
    torch.testing.assert_close(s[idx], top, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("shape", SCORE_SHAPES)
@pytest.mark.parametrize("misaligned", [False, True])
def test_score_matches_reference(dtype, shape, misaligned):
    B, C, H, W, n = shape
    gen = torch.Generator().manual_seed(B * 1000 + C)
    x, w1, w2 = _score_inputs(gen, shape, dtype, misaligned)
    ga = randn(gen, (B, C), dtype)
    with no_host_sync():
        a, idx = ops().attention_score_fwd(x, w1, w2, n)
    ra, ridx = R.attention_score_fwd(x, w1, w2, n)
    close(a, ra, dtype, what="a")
    _check_topk(idx, ridx, x, w1, w2, n)
    with no_host_sync():
        dx, dw1, dw2 = ops().attention_score_bwd(ga, x, w1, w2, a)
    for name, got, ref in zip(("dx", "dw1", "dw2"), (dx, dw1, dw2), R.attention_score_bwd(ga, x, w1, w2, a)):
        close(got, ref, dtype, scale=max(1.0, ref.abs().max().item()), what=name)


@pytest.mark.parametrize("dtype", DTYPES)
def test_score_ties(dtype):
    # Exactly equal scores (w1 = 0: a = 1/2 everywhere): the lower channels, in order.
    gen = torch.Generator().manual_seed(5)
    x, w1, w2 = _score_inputs(gen, (3, 12, 4, 4, 5), dtype)
    w1 = torch.zeros_like(w1)
    with no_host_sync():
        _, idx = ops().attention_score_fwd(x, w1, w2, 5)
    assert idx.tolist() == [0, 1, 2, 3, 4]
    # Equal values inside the planes: the max-pool gradient goes to the first maximum.
    x, w1, w2 = _score_inputs(gen, (3, 6, 5, 5, 6), dtype, ties=True)
    ga = randn(gen, (3, 6), dtype)
    a, _ = ops().attention_score_fwd(x, w1, w2, 6)
    with no_host_sync():
        got = ops().attention_score_bwd(ga, x, w1, w2, a)
    for name, g, r in zip(("dx", "dw1", "dw2"), got, R.attention_score_bwd(ga, x, w1, w2, a)):
        close(g, r, dtype, scale=max(1.0, r.abs().max().item()), what=name)


def test_score_topk_large_c():
    # 6200 float64 scores (49.6 KB) exceed the 48 KB of static shared memory: the ranking
    # kernel reads them from global memory instead.
    gen = torch.Generator().manual_seed(11)
    shape = (2, 6200, 1, 2, 1000)
    x, w1, w2 = _score_inputs(gen, shape, torch.float64)
    with no_host_sync():
        a, idx = ops().attention_score_fwd(x, w1, w2, 1000)
    ra, ridx = R.attention_score_fwd(x, w1, w2, 1000)
    close(a, ra, torch.float64, what="a")
    _check_topk(idx, ridx, x, w1, w2, 1000)
    # float32, C = 4096: ranked from shared memory
    x, w1, w2 = _score_inputs(gen, (3, 4096, 1, 1, 4096), torch.float32)
    a, idx = ops().attention_score_fwd(x, w1, w2, 4096)
    ra, ridx = R.attention_score_fwd(x, w1, w2, 4096)
    assert torch.equal(idx.sort().values, torch.arange(4096, device=DEV))
    _check_topk(idx, ridx, x, w1, w2, 4096)


# ----------------------------------------------------------------------------- properties

def test_deterministic():
    """No atomics in the reductions: two runs give bitwise equal gradients."""
    gen = torch.Generator().manual_seed(3)
    shape = (8, 64, 16, 16, 16)
    x, w1, w2 = _score_inputs(gen, shape, torch.float32)
    ga = randn(gen, (8, 64), torch.float32)
    a, idx = ops().attention_score_fwd(x, w1, w2, 16)
    r1 = ops().attention_score_bwd(ga, x, w1, w2, a)
    r2 = ops().attention_score_bwd(ga, x, w1, w2, a)
    for t1, t2 in zip(r1, r2):
        assert torch.equal(t1, t2)
    x, a, idx, y, beta, g = _writeback_case(torch.float32, 2, (8, 64, 32, 32, 16), True, False)
    w1_ = ops().attention_writeback_bwd(g, x, a, idx, y, beta, 2)
    w2_ = ops().attention_writeback_bwd(g, x, a, idx, y, beta, 2)
    for t1, t2 in zip(w1_, w2_):
        assert torch.equal(t1, t2)


def test_bad_arguments_raise():
    gen = torch.Generator().manual_seed(0)
    x = randn(gen, (2, 4, 3, 3), torch.float32)
    a = attention(gen, 2, 4, torch.float32)
    idx = rand_idx(gen, 4, 2)
    with pytest.raises(RuntimeError, match="adarts attention_gather"):
        ops().attention_gather_fwd(x, a.cpu(), idx)                 # a on another device
    with pytest.raises(RuntimeError, match="contiguous"):
        ops().attention_gather_fwd(x.transpose(2, 3), a, idx)       # non-contiguous x
    with pytest.raises(RuntimeError, match="dtype"):
        ops().attention_gather_fwd(x, a.double(), idx)              # dtype mismatch
    with pytest.raises(RuntimeError, match="int64"):
        ops().attention_gather_fwd(x, a, idx.int())
    with pytest.raises(RuntimeError, match="stride"):
        ops().attention_writeback_fwd(x, a, idx, randn(gen, (2, 2, 1, 1), torch.float32), None, 3)
    with pytest.raises(RuntimeError, match="n_select"):
        ops().attention_score_fwd(x, randn(gen, (2, 4), torch.float32), randn(gen, (4, 2), torch.float32), 5)


@pytest.mark.parametrize("stride", [1, 2])
def test_public_api_cuda_backend_end_to_end(stride):
    """attention_score -> attention_gather -> attention_writeback through the adarts:: custom
    ops with impl="cuda", forward and autograd backward, against impl="reference"."""
    from adarts_kernels.ops import attention_gather, attention_score, attention_writeback

    gen = torch.Generator().manual_seed(stride)
    B, C, H, W, n = 4, 16, 8, 8, 4
    x0 = randn(gen, (B, C, H, W), torch.float32)
    w10 = randn(gen, (C // 2, C), torch.float32) * 0.3
    w20 = randn(gen, (C, C // 2), torch.float32) * 0.3
    beta0 = to_dev(torch.tensor(0.6))
    grads = {}
    outs = {}
    for impl in ("cuda", "reference"):
        x, w1, w2, beta = (t.clone().requires_grad_() for t in (x0, w10, w20, beta0))
        a, idx = attention_score(x, w1, w2, n, impl=impl)
        xs = attention_gather(x, a, idx, impl=impl)
        y = torch.nn.functional.max_pool2d(xs, 2, 2) if stride == 2 else torch.tanh(xs)
        out = attention_writeback(x, a, idx, y, beta, stride, impl=impl)
        out.square().sum().backward()
        outs[impl] = (out.detach(), idx)
        grads[impl] = [t.grad for t in (x, w1, w2, beta)]
    assert torch.equal(outs["cuda"][1], outs["reference"][1])
    torch.testing.assert_close(outs["cuda"][0], outs["reference"][0], rtol=1e-5, atol=1e-5)
    for gc, gr in zip(grads["cuda"], grads["reference"]):
        torch.testing.assert_close(gc, gr, rtol=1e-4, atol=1e-4)
