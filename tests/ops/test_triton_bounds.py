"""Every Triton launcher, forward and backward, under the bounds checker of
``tests/triton_guard.py`` (interpreted on CPU; ``tests/ops/conftest.py`` turns it on for every
test of this directory): exact-size tensors, odd planes whose sizes are not multiples of any
block size (tail masks), planes of several tiles (or several loop steps) and the first and
last channel selected, so that the last plane's tail is the last bytes of its tensor. Then
the checker itself on a toy kernel: a load without its mask and a store mask one element too
long both fail, the correctly masked kernel passes."""
import pytest
import torch
from helpers import attention_values, gen, interpreted, randn, require, score_weights
from triton_guard import TritonOutOfBounds, checked_triton

pytestmark = pytest.mark.skipif(not interpreted("triton"), reason="the bounds check runs in Triton's interpreter")

# B, C, H, W: a tail inside one block, and a plane past the largest block (1024) with a tail
SHAPES = [(2, 5, 5, 7), (1, 3, 33, 35)]
DTYPES = (torch.float32, torch.float16)


@pytest.fixture(autouse=True)
def _triton():
    require("triton")


def _idx(C):
    """The last and the first channel (the tensor's last and first planes), unsorted."""
    return torch.tensor([C - 1, 0] if C > 1 else [0])


def _launched(guard, before):
    assert guard.launches > before, "no Triton launch was checked"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_attention_score_in_bounds(shape, dtype, _triton_bounds_checked):
    from adarts_kernels.triton.attention_score import attention_score_bwd, attention_score_fwd
    B, C, H, W = shape
    g, n0 = gen(1), _triton_bounds_checked.launches
    x = randn((B, C, H, W), g, dtype)
    w1, w2 = score_weights(C, g, dtype)
    a, _ = attention_score_fwd(x, w1, w2, 2)
    dx, dw1, dw2 = attention_score_bwd(randn((B, C), g, dtype), x, w1, w2, a)
    assert torch.isfinite(dx).all() and dx.shape == x.shape
    _launched(_triton_bounds_checked, n0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_attention_gather_in_bounds(shape, dtype, _triton_bounds_checked):
    from adarts_kernels.triton.attention_gather import attention_gather_bwd, attention_gather_fwd
    B, C, H, W = shape
    g, n0 = gen(2), _triton_bounds_checked.launches
    x, a, idx = randn((B, C, H, W), g, dtype), attention_values(B, C, g, dtype), _idx(C)
    out = attention_gather_fwd(x, a, idx)
    dx, da = attention_gather_bwd(randn(out.shape, g, dtype), x, a, idx)
    assert torch.isfinite(out).all() and torch.isfinite(dx).all() and torch.isfinite(da).all()
    _launched(_triton_bounds_checked, n0)


@pytest.mark.parametrize("stride", (1, 2))
@pytest.mark.parametrize("with_beta", (True, False), ids=("beta", "nobeta"))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_attention_writeback_in_bounds(shape, stride, with_beta, _triton_bounds_checked):
    from adarts_kernels.triton.attention_writeback import attention_writeback_bwd, attention_writeback_fwd
    B, C, H, W = shape
    H, W = (H + 1, W + 1) if stride == 2 else (H, W)          # even planes at stride 2, odd halves
    dtype = torch.float32 if with_beta else torch.float16
    g, n0 = gen(3), _triton_bounds_checked.launches
    x, a, idx = randn((B, C, H, W), g, dtype), attention_values(B, C, g, dtype), _idx(C)
    y = randn((B, idx.numel(), H // stride, W // stride), g, dtype)
    beta = torch.tensor(0.7, dtype=dtype) if with_beta else None
    out = attention_writeback_fwd(x, a, idx, y, beta, stride)
    grads = attention_writeback_bwd(randn(out.shape, g, dtype), x, a, idx, y, beta, stride)
    assert torch.isfinite(out).all() and all(torch.isfinite(t).all() for t in grads if t is not None)
    _launched(_triton_bounds_checked, n0)


@pytest.mark.parametrize("training", (True, False), ids=("train", "eval"))
@pytest.mark.parametrize("stride,P,identity,shape", [
    (1, 1, True, (2, 3, 5, 7)), (2, 1, False, (2, 3, 6, 10)),    # stride 2: odd output planes (3x5)
    (1, 1, False, (1, 1, 23, 25)), (2, 0, False, (1, 1, 18, 22)),  # several tiles of the forward / of dx
], ids=str)
def test_mixed_sum_in_bounds(stride, P, identity, shape, training, _triton_bounds_checked):
    from adarts_kernels.triton.mixed_sum import mixed_sum_bwd, mixed_sum_fwd
    B, n, H, W = shape
    Ho, Wo = H // stride, W // stride
    dtype = torch.float32 if training else torch.float16
    stats = torch.float32
    g, n0 = gen(4), _triton_bounds_checked.launches
    x = randn((B, n, H, W), g, dtype)
    z = [randn((B, n, Ho, Wo), g, dtype) for _ in range(P)]
    w = torch.softmax(randn((P + 3,), g, torch.float64), 0).to(dtype)
    pool_w, z_w = w[:2].clone(), w[2:2 + P].clone()
    id_w = w[2 + P].clone() if identity else None
    rm = None if training else (randn((P + 2, n), g, torch.float64) * 0.3).to(stats)
    rv = None if training else (torch.rand(P + 2, n, generator=g, dtype=torch.float64) + 0.5).to(stats)
    y, mean, var = mixed_sum_fwd(z, x, z_w, pool_w, id_w, stride, 1e-5, rm, rv)
    dz, dx, *rest = mixed_sum_bwd(randn(y.shape, g, dtype), z, x, z_w, pool_w, id_w, mean, var, stride, 1e-5,
                                  training)
    assert torch.isfinite(y).all() and torch.isfinite(dx).all() and all(torch.isfinite(t).all() for t in dz)
    _launched(_triton_bounds_checked, n0)


# ----------------------------------------------------------------------------- the checker itself

def _toy_kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def copy_kernel(src_ptr, dst_ptr, N, LOAD_MASK: tl.constexpr, STORE_EXTRA: tl.constexpr,
                    BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N
        if LOAD_MASK:
            v = tl.load(src_ptr + offs, mask=mask, other=0.0)
        else:
            v = tl.load(src_ptr + offs)
        tl.store(dst_ptr + offs, v, mask=offs < N + STORE_EXTRA)

    return copy_kernel


@pytest.mark.parametrize("case", ("masked", "unmasked-load", "store-off-by-one", "view-of-larger-buffer"))
def test_checker_catches_unmasked_and_off_by_one(case, _triton_bounds_checked):
    kernel = _toy_kernels()
    guard, N, block = _triton_bounds_checked, 20, 16
    buf = torch.arange(2 * N, dtype=torch.float32)
    src = buf[:N] if case == "view-of-larger-buffer" else torch.arange(N, dtype=torch.float32)
    dst = torch.zeros(N)
    if case == "masked":
        kernel[(2,)](src, dst, N, LOAD_MASK=True, STORE_EXTRA=0, BLOCK=block)
        assert torch.equal(dst, src) and guard.accesses > 0 and not guard.violations
        return
    with pytest.raises(TritonOutOfBounds) as info:
        kernel[(2,)](src, dst, N, LOAD_MASK=case == "store-off-by-one", STORE_EXTRA=int(case == "store-off-by-one"),
                     BLOCK=block)
    assert len(guard.violations) == 1
    guard.violations.clear()                     # expected here: not a failure of this test
    msg = str(info.value)
    want, arg = ("store", "dst_ptr[20]") if case == "store-off-by-one" else ("load", "src_ptr[20]")
    assert "copy_kernel" in msg and "program (1, 0, 0)" in msg, msg
    assert f"out-of-bounds {want}" in msg and arg in msg and "past its end" in msg, msg


def test_checker_reports_swallowed_violations():
    """A violation inside a launch whose exception the caller catches still fails on exit."""
    kernel = _toy_kernels()
    src, dst = torch.arange(20, dtype=torch.float32), torch.zeros(20)
    outer = checked_triton._active
    checked_triton._active = None      # a fresh, outermost guard for this test
    try:
        with pytest.raises(TritonOutOfBounds, match="copy_kernel"):
            with checked_triton():
                try:
                    kernel[(2,)](src, dst, 20, LOAD_MASK=False, STORE_EXTRA=0, BLOCK=16)
                except Exception:
                    pass
    finally:
        checked_triton._active = outer
