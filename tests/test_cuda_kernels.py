"""The CUDA kernels of the adarts_C operators (csrc/cuda/) against the plain-PyTorch
reference (the attention ops: tests/ops/), on CUDA tensors: forward and backward, float32 / float16 / bfloat16 (and
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


# ----------------------------------------------------------------------------- mixed sum

MIXED_SHAPES = {  # B, n, H, W
    1: [(2, 3, 7, 5), (3, 2, 4, 8), (2, 4, 20, 23), (1, 3, 37, 29), (2, 1, 1, 1), (40, 6, 3, 2)],
    2: [(2, 3, 8, 10), (3, 2, 2, 4), (2, 4, 40, 36), (1, 2, 70, 62), (40, 6, 4, 2)],
}
MIXED_EPS = 1e-5


def _stats_dtype(dtype):
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _mixed_inputs(gen, shape, stride, dtype, ties=False):
    B, n, H, W = shape
    P = 4 if stride == 1 else 5
    if ties:  # values in {-1, 0, 1}: several equal maxima in most 3x3 windows
        x = to_dev(torch.randint(-1, 2, (B, n, H, W), generator=gen).to(dtype))
    else:
        x = randn(gen, (B, n, H, W), dtype)
    z = [to_dev((torch.randn(B, n, H // stride, W // stride, generator=gen, dtype=torch.float64) * (1 + 0.5 * i)
                 + 0.3 * i).to(dtype)) for i in range(P)]
    w = to_dev(torch.softmax(torch.randn(8, generator=gen, dtype=torch.float64), 0).to(dtype))
    sd = _stats_dtype(dtype)
    rm = to_dev((torch.randn(P + 2, n, generator=gen, dtype=torch.float64) * 0.3).to(sd))
    rv = to_dev((torch.rand(P + 2, n, generator=gen, dtype=torch.float64) + 0.5).to(sd))
    g = randn(gen, (B, n, H // stride, W // stride), dtype)
    return z, x, w, rm, rv, g


def _check_mixed(dtype, stride, z, x, w, rm, rv, g):
    training = rm is None
    with no_host_sync():
        y, mean, var = ops().mixed_sum_fwd(z, x, w, stride, MIXED_EPS, rm, rv)
    ry, rmean, rvar = R.mixed_sum_fwd(z, x, w, stride, MIXED_EPS, rm, rv)
    assert mean.dtype == var.dtype == _stats_dtype(dtype) and y.dtype == dtype and y.device == x.device
    close(y, ry, dtype, scale=max(1.0, ry.abs().max().item()), what="y")
    close(mean, rmean, _stats_dtype(dtype), what="mean")
    close(var, rvar, _stats_dtype(dtype), scale=max(1.0, rvar.abs().max().item()), what="var")
    with no_host_sync():
        dz, dx, dw = ops().mixed_sum_bwd(g, z, x, w, rmean, rvar, stride, MIXED_EPS, training)
    rdz, rdx, rdw = R.mixed_sum_bwd(g, z, x, w, rmean, rvar, stride, MIXED_EPS, training)
    assert len(dz) == len(z)
    for i, (o, r) in enumerate(zip(dz, rdz)):
        close(o, r, dtype, scale=max(1.0, r.abs().max().item()), what=f"dz[{i}]")
    close(dx, rdx, dtype, scale=max(1.0, rdx.abs().max().item()), what="dx")
    assert dw.dtype == w.dtype and dw.shape == (8,) and dw[0].item() == 0.0
    close(dw, rdw, dtype, scale=math.sqrt(g.numel()), what="dw")


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("stride,shape", [(1, s) for s in MIXED_SHAPES[1]] + [(2, s) for s in MIXED_SHAPES[2]])
@pytest.mark.parametrize("training", [True, False])
def test_mixed_sum_matches_reference(dtype, stride, shape, training):
    gen = torch.Generator().manual_seed(sum(shape) + 10 * stride)
    z, x, w, rm, rv, g = _mixed_inputs(gen, shape, stride, dtype)
    if training:
        rm = rv = None
    _check_mixed(dtype, stride, z, x, w, rm, rv, g)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("stride", [1, 2])
def test_mixed_sum_pool_ties(dtype, stride):
    """Many equal maxima per window: the max-pool gradient goes to the first in row-major
    order (the C++ CPU kernel and F.max_pool2d agree on it); checked in both modes."""
    gen = torch.Generator().manual_seed(40 + stride)
    z, x, w, rm, rv, g = _mixed_inputs(gen, (2, 3, 12, 10), stride, dtype, ties=True)
    _check_mixed(dtype, stride, z, x, w, None, None, g)
    _check_mixed(dtype, stride, z, x, w, rm, rv, g)
    # eval: against the C++ CPU kernel, whose routing the CPU tests pin to the reference's
    dx = ops().mixed_sum_bwd(g, z, x, w, rm, rv, stride, MIXED_EPS, False)[1]
    cdx = ops().mixed_sum_bwd(g.cpu(), [t.cpu() for t in z], x.cpu(), w.cpu(), rm.cpu(), rv.cpu(), stride,
                              MIXED_EPS, False)[1]
    close(dx.cpu(), cdx, dtype, scale=max(1.0, cdx.abs().max().item()), what="dx vs CPU kernel")


def test_mixed_sum_deterministic():
    """No atomics: two runs give bitwise equal results."""
    gen = torch.Generator().manual_seed(50)
    for stride in (1, 2):
        z, x, w, _, _, g = _mixed_inputs(gen, (8, 16, 16, 16), stride, torch.float32)
        f1 = ops().mixed_sum_fwd(z, x, w, stride, MIXED_EPS, None, None)
        f2 = ops().mixed_sum_fwd(z, x, w, stride, MIXED_EPS, None, None)
        for t1, t2 in zip(f1, f2):
            assert torch.equal(t1, t2)
        b1 = ops().mixed_sum_bwd(g, z, x, w, f1[1], f1[2], stride, MIXED_EPS, True)
        b2 = ops().mixed_sum_bwd(g, z, x, w, f1[1], f1[2], stride, MIXED_EPS, True)
        for t1, t2 in zip((*b1[0], b1[1], b1[2]), (*b2[0], b2[1], b2[2])):
            assert torch.equal(t1, t2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_mixed_sum_half_running_stats(dtype):
    """Running statistics in x's dtype are taken in float32, as the reference does."""
    gen = torch.Generator().manual_seed(51)
    z, x, w, rm, rv, g = _mixed_inputs(gen, (2, 3, 6, 5), 1, dtype)
    with no_host_sync():
        y, mean, var = ops().mixed_sum_fwd(z, x, w, 1, MIXED_EPS, rm.to(dtype), rv.to(dtype))
    ry, rmean, rvar = R.mixed_sum_fwd(z, x, w, 1, MIXED_EPS, rm.to(dtype), rv.to(dtype))
    assert mean.dtype == rmean.dtype == torch.float32
    torch.testing.assert_close(mean, rmean, rtol=0, atol=0)
    torch.testing.assert_close(var, rvar, rtol=0, atol=0)
    close(y, ry, dtype, what="y")


def test_mixed_sum_bad_arguments_raise():
    gen = torch.Generator().manual_seed(52)
    z, x, w, rm, rv, g = _mixed_inputs(gen, (2, 3, 4, 6), 1, torch.float32)
    with pytest.raises(RuntimeError, match="adarts mixed_sum: z\\[1\\] must be a CUDA tensor"):
        ops().mixed_sum_fwd([z[0], z[1].cpu(), z[2], z[3]], x, w, 1, MIXED_EPS, None, None)
    with pytest.raises(RuntimeError, match="adarts mixed_sum: w must be a CUDA tensor"):
        ops().mixed_sum_fwd(z, x, w.cpu(), 1, MIXED_EPS, None, None)
    with pytest.raises(RuntimeError, match="adarts mixed_sum: run_mean must be a CUDA tensor"):
        ops().mixed_sum_fwd(z, x, w, 1, MIXED_EPS, rm.cpu(), rv)
    with pytest.raises(RuntimeError, match="z must hold 5"):
        ops().mixed_sum_fwd(z, x, w, 2, MIXED_EPS, None, None)
    with pytest.raises(RuntimeError, match="contiguous"):
        ops().mixed_sum_fwd(z, x.transpose(2, 3), w, 1, MIXED_EPS, None, None)
    with pytest.raises(RuntimeError, match="dtype"):
        ops().mixed_sum_fwd(z, x, w.double(), 1, MIXED_EPS, None, None)
    with pytest.raises(RuntimeError, match="statistics dtype"):
        ops().mixed_sum_bwd(g, z, x, w, rm.double(), rv, 1, MIXED_EPS, True)
    with pytest.raises(RuntimeError, match="adarts mixed_sum: mean must be a CUDA tensor"):
        ops().mixed_sum_bwd(g, z, x, w, rm.cpu(), rv, 1, MIXED_EPS, True)
    with pytest.raises(RuntimeError, match="grad"):
        ops().mixed_sum_bwd(g[:, :, :2].contiguous(), z, x, w, rm, rv, 1, MIXED_EPS, True)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("training", [True, False])
def test_mixed_sum_public_op_cuda(stride, training):
    """adarts_kernels.ops.mixed_sum(impl="cuda") with non-contiguous inputs, forward and
    autograd backward, against impl="reference"."""
    from adarts_kernels.ops import mixed_sum

    gen = torch.Generator().manual_seed(53 + stride)
    z0, x0, w0, rm, rv, g = _mixed_inputs(gen, (4, 6, 8, 10), stride, torch.float32)
    if training:
        rm = rv = None
    results = {}
    for impl in ("cuda", "reference"):
        z = [t.transpose(2, 3).contiguous().transpose(2, 3).requires_grad_() for t in z0]
        x = x0.contiguous(memory_format=torch.channels_last).requires_grad_()
        w = w0.clone().requires_grad_()
        y, mean, var = mixed_sum(z, x, w, stride, MIXED_EPS, rm, rv, impl=impl)
        y.backward(g)
        results[impl] = (y.detach(), mean, var, x.grad, w.grad, *[t.grad for t in z])
    for o, r in zip(results["cuda"], results["reference"]):
        torch.testing.assert_close(o, r, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("stride", [1, 2])
def test_mixed_sum_gradcheck_cuda(stride):
    from adarts_kernels.ops import mixed_sum

    gen = torch.Generator().manual_seed(55 + stride)
    z, x, w, _, _, _ = _mixed_inputs(gen, (2, 2, 4, 6), stride, torch.float64)
    P = len(z)

    def f(*ts):
        return mixed_sum(list(ts[:P]), ts[P], ts[P + 1], stride, MIXED_EPS, impl="cuda")[0]

    ins = tuple(t.clone().requires_grad_() for t in (*z, x, w))
    assert torch.autograd.gradcheck(f, ins, eps=1e-6, atol=1e-6, rtol=1e-5)
