"""The compiled CPU operators (torch.ops.adarts_C.*) against the plain-PyTorch reference.
(The attention ops are tested in tests/ops/; the extension's state in tests/test_ext.py.)

If adarts_kernels._C is not installed, the tests try a JIT build of csrc/; when that fails
too they are skipped, or FAIL when ADARTS_REQUIRE_EXT=1 (as CI sets it).
"""
from __future__ import annotations

import os

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


def poison_heap(*like):
    """Allocate NaN-filled blocks of the outputs' sizes and free them, so that an output
    buffer the allocator hands out again starts as NaN: an element a kernel forgets to write
    then shows up in the whole-tensor comparisons."""
    for t in like:
        for dt in (torch.float64, torch.float32, torch.float16):
            torch.full((max(t.numel(), 1),), float("nan"), dtype=dt)


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


# ----------------------------------------------------------------------------- mixed sum

MS_SHAPES = {  # (B, n, H, W): odd sizes, H and W not multiples of 3, single rows / columns
    1: [(2, 3, 7, 5), (3, 2, 4, 8), (1, 2, 1, 4), (2, 1, 5, 1), (1, 1, 1, 1)],
    2: [(2, 3, 8, 10), (3, 2, 2, 4), (1, 2, 14, 2), (2, 1, 2, 2)],
}
MS_EPS = 1e-5


def stats_dtype(dtype):
    return torch.float32 if dtype in LOW else dtype


def ms_inputs(B, n, H, W, stride, dtype, seed, ties=False):
    """z (P tensors of different scales and offsets), x, w (softmaxed), and running
    statistics (Q, n) in the statistics dtype."""
    g = gen(seed)
    P = 4 if stride == 1 else 5
    if ties:  # few distinct values: many equal maxima in every 3x3 window
        x = torch.randint(-1, 2, (B, n, H, W), generator=g).to(dtype)
    else:
        x = torch.randn(B, n, H, W, generator=g, dtype=torch.float64).to(dtype)
    z = [(torch.randn(B, n, H // stride, W // stride, generator=g, dtype=torch.float64) * (1 + 0.5 * i) + 0.3 * i)
         .to(dtype) for i in range(P)]
    w = torch.softmax(torch.randn(8, generator=g, dtype=torch.float64), 0).to(dtype)
    sd = stats_dtype(dtype)
    run_mean = (torch.randn(P + 2, n, generator=g, dtype=torch.float64) * 0.3).to(sd)
    run_var = (torch.rand(P + 2, n, generator=g, dtype=torch.float64) + 0.5).to(sd)
    return z, x, w, run_mean, run_var


def flat_bwd(out):
    dz, dx, dw = out
    return (*dz, dx, dw)


def ms_check(z, x, w, stride, rm, rv, grad, dtype):
    """Forward and backward of the C++ op against the reference on the same inputs."""
    training = rm is None
    poison_heap(x, *z)
    ours = ops().mixed_sum_fwd(z, x, w, stride, MS_EPS, rm, rv)
    ref = R.mixed_sum_fwd(z, x, w, stride, MS_EPS, rm, rv)
    assert ours[1].dtype == stats_dtype(dtype) and ours[2].dtype == stats_dtype(dtype)
    check_outputs(tuple(ours), ref, dtype, (z, x, w, stride, MS_EPS, rm, rv), R.mixed_sum_fwd)
    mean, var = ref[1], ref[2]
    poison_heap(x, *z)
    dz, dx, dw = ops().mixed_sum_bwd(grad, z, x, w, mean, var, stride, MS_EPS, training)
    assert isinstance(dz, list) and len(dz) == len(z)
    assert dw.shape == (8,) and dw[0].item() == 0.0  # none; dw[3]: the identity (s=1) or z[0] (s=2)
    check_outputs((*dz, dx, dw), flat_bwd(R.mixed_sum_bwd(grad, z, x, w, mean, var, stride, MS_EPS, training)),
                  dtype, (grad, z, x, w, mean, var, stride, MS_EPS, training),
                  lambda *t: flat_bwd(R.mixed_sum_bwd(*t)))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("stride,shape", [(1, s) for s in MS_SHAPES[1]] + [(2, s) for s in MS_SHAPES[2]], ids=str)
@pytest.mark.parametrize("training", (True, False), ids=("train", "eval"))
def test_mixed_sum(dtype, stride, shape, training):
    B, n, H, W = shape
    z, x, w, rm, rv = ms_inputs(B, n, H, W, stride, dtype, seed=20 + H + 7 * W + stride)
    if training:
        rm = rv = None
    grad = torch.randn(B, n, H // stride, W // stride, generator=gen(21), dtype=torch.float64).to(dtype)
    ms_check(z, x, w, stride, rm, rv, grad, dtype)


@pytest.mark.parametrize("stride", (1, 2))
@pytest.mark.parametrize("dtype", (torch.float64, torch.float32), ids=str)
def test_mixed_sum_pool_ties(stride, dtype):
    """x with values in {-1, 0, 1}: most 3x3 windows hold several equal maxima; the max-pool
    gradient goes to the first one in row-major order, exactly as the reference routes it."""
    B, n, H, W = 2, 3, 6, 8
    z, x, w, rm, rv = ms_inputs(B, n, H, W, stride, dtype, seed=22, ties=True)
    grad = torch.randn(B, n, H // stride, W // stride, generator=gen(23), dtype=torch.float64).to(dtype)
    for run in ((None, None), (rm, rv)):
        ms_check(z, x, w, stride, *run, grad, dtype)
    # eval mode, du_0 = w[1] * r_0 * g: dx minus everything but the max pool's part is
    # nonzero only at the routed positions, which must be exactly the reference's
    dx = ops().mixed_sum_bwd(grad, z, x, w, rm, rv, stride, MS_EPS, False)[1]
    rdx = R.mixed_sum_bwd(grad, z, x, w, rm, rv, stride, MS_EPS, False)[1]
    torch.testing.assert_close(dx, rdx, rtol=1e-12 if dtype == torch.float64 else 1e-5, atol=1e-6)
    w_nomax = w.clone()
    w_nomax[1] = 0
    only_max = dx - ops().mixed_sum_bwd(grad, z, x, w_nomax, rm, rv, stride, MS_EPS, False)[1]
    ref_max = rdx - R.mixed_sum_bwd(grad, z, x, w_nomax, rm, rv, stride, MS_EPS, False)[1]
    assert torch.equal(only_max.abs() > 1e-6, ref_max.abs() > 1e-6)


def test_mixed_sum_nan_eval():
    """A NaN in x is the maximum of every window holding it (the window's last NaN), as in
    F.max_pool2d; eval mode keeps the other outputs finite, and they match the reference."""
    B, n, H, W = 2, 2, 5, 6
    z, x, w, rm, rv = ms_inputs(B, n, H, W, 1, torch.float64, seed=24)
    x[0, 1, 2, 3] = float("nan")
    x[1, 0, 0, 0] = float("nan")
    x[1, 0, 1, 1] = float("nan")
    grad = torch.randn(B, n, H, W, generator=gen(25), dtype=torch.float64)
    y, mean, var = ops().mixed_sum_fwd(z, x, w, 1, MS_EPS, rm, rv)
    ry = R.mixed_sum_fwd(z, x, w, 1, MS_EPS, rm, rv)[0]
    torch.testing.assert_close(y, ry, rtol=1e-12, atol=1e-12, equal_nan=True)
    dz, dx, dw = ops().mixed_sum_bwd(grad, z, x, w, rm, rv, 1, MS_EPS, False)
    rdz, rdx, rdw = R.mixed_sum_bwd(grad, z, x, w, rm, rv, 1, MS_EPS, False)
    torch.testing.assert_close(dx, rdx, rtol=1e-12, atol=1e-12, equal_nan=True)
    for o, r in zip(dz, rdz):
        torch.testing.assert_close(o, r, rtol=1e-12, atol=1e-12)
    assert torch.isfinite(dx).all()


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
def test_mixed_sum_low_precision_running_stats(dtype):
    """Running statistics in x's (half) dtype are taken in float32, as the reference does."""
    z, x, w, rm, rv = ms_inputs(2, 3, 5, 4, 1, dtype, seed=26)
    ours = ops().mixed_sum_fwd(z, x, w, 1, MS_EPS, rm.to(dtype), rv.to(dtype))
    ref = R.mixed_sum_fwd(z, x, w, 1, MS_EPS, rm.to(dtype), rv.to(dtype))
    for o, r in zip(ours, ref):
        assert o.dtype == r.dtype
        torch.testing.assert_close(o, r, rtol=0, atol=0)


def _noncontig(t):
    """A non-contiguous view equal to t (every other element of a twice-as-wide buffer)."""
    buf = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
    buf[..., ::2] = t
    v = buf[..., ::2]
    assert not v.is_contiguous()
    return v


@pytest.mark.parametrize("stride", (1, 2))
@pytest.mark.parametrize("training", (True, False), ids=("train", "eval"))
def test_mixed_sum_public_op_noncontiguous(stride, training):
    """adarts_kernels.ops.mixed_sum(impl="cpp") with non-contiguous z, x, w and running
    statistics, forward and autograd backward, against impl="reference"."""
    from adarts_kernels.ops import mixed_sum

    B, n, H, W = 2, 3, 6, 4
    z0, x0, w0, rm, rv = ms_inputs(B, n, H, W, stride, torch.float32, seed=27)
    if training:
        rm = rv = None
    else:
        rm, rv = rm.t().contiguous().t(), _noncontig(rv)
    grad = torch.randn(B, n, H // stride, W // stride, generator=gen(28))
    results = {}
    for impl in ("cpp", "reference"):
        z = [_noncontig(t).requires_grad_() if i % 2 else t.transpose(2, 3).contiguous().transpose(2, 3)
             .requires_grad_() for i, t in enumerate(z0)]
        x = x0.contiguous(memory_format=torch.channels_last).requires_grad_()
        w = _noncontig(w0).requires_grad_()
        assert not x.is_contiguous() and not z[0].is_contiguous()
        y, mean, var = mixed_sum(z, x, w, stride, MS_EPS, rm, rv, impl=impl)
        y.backward(grad)
        results[impl] = (y.detach(), mean, var, x.grad, w.grad, *[t.grad for t in z])
    for o, r in zip(results["cpp"], results["reference"]):
        assert o.dtype == r.dtype and o.shape == r.shape
        torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("stride", (1, 2))
@pytest.mark.parametrize("training", (True, False), ids=("train", "eval"))
def test_mixed_sum_gradcheck(stride, training):
    """float64 gradcheck of y through the public op (impl="cpp"): the backward, including
    the batch statistics' terms in training, is the gradient of the forward."""
    from adarts_kernels.ops import mixed_sum

    B, n, H, W = 2, 2, 4, 6
    z, x, w, rm, rv = ms_inputs(B, n, H, W, stride, torch.float64, seed=29)
    if training:
        rm = rv = None
    P = len(z)

    def f(*ts):
        return mixed_sum(list(ts[:P]), ts[P], ts[P + 1], stride, MS_EPS, rm, rv, impl="cpp")[0]

    ins = tuple(t.clone().requires_grad_() for t in (*z, x, w))
    assert torch.autograd.gradcheck(f, ins, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_mixed_sum_parallel_chunks_deterministic():
    """Several at::parallel_for chunks; two runs give identical bits."""
    B, n, H, W = 4, 8, 16, 16
    for stride in (1, 2):
        z, x, w, _, _ = ms_inputs(B, n, H, W, stride, torch.float32, seed=30)
        grad = torch.randn(B, n, H // stride, W // stride, generator=gen(31))
        first = ops().mixed_sum_fwd(z, x, w, stride, MS_EPS, None, None)
        second = ops().mixed_sum_fwd(z, x, w, stride, MS_EPS, None, None)
        for o, r in zip(first, second):
            assert torch.equal(o, r)
        b1 = flat_bwd(ops().mixed_sum_bwd(grad, z, x, w, first[1], first[2], stride, MS_EPS, True))
        b2 = flat_bwd(ops().mixed_sum_bwd(grad, z, x, w, first[1], first[2], stride, MS_EPS, True))
        ref = flat_bwd(R.mixed_sum_bwd(grad, z, x, w, first[1], first[2], stride, MS_EPS, True))
        for o, r, e in zip(b1, b2, ref):
            assert torch.equal(o, r)
            torch.testing.assert_close(o, e, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- refusals

def _mixed_sum_refusals():
    o = lambda: torch.ops.adarts_C  # noqa: E731
    MS = "mixed_sum"
    z, x, w, rm, rv = ms_inputs(2, 3, 4, 6, 1, torch.float32, seed=32)
    z2, x2, w2, rm2, rv2 = ms_inputs(2, 3, 4, 6, 2, torch.float32, seed=33)
    g = torch.randn(2, 3, 4, 6)
    odd = torch.randn(2, 3, 5, 6)
    fwd = lambda *a, **k: o().mixed_sum_fwd(*a, **k)  # noqa: E731
    bwd = lambda *a, **k: o().mixed_sum_bwd(*a, **k)  # noqa: E731
    e = MS_EPS
    return [
        ("ms-stride3", MS, "stride", lambda: fwd(z, x, w, 3, e, None, None)),
        ("ms-z-count-s1", MS, "z must hold 4", lambda: fwd(z[:3], x, w, 1, e, None, None)),
        ("ms-z-count-s2", MS, "z must hold 5", lambda: fwd(z2[:4], x2, w2, 2, e, None, None)),
        ("ms-z-count-s1-bwd", MS, "z must hold 4", lambda: bwd(g, z + z[:1], x, w, rm, rv, 1, e, True)),
        ("ms-odd-h-s2", MS, "even", lambda: fwd(z2, odd, w2, 2, e, None, None)),
        ("ms-x-rank", MS, "4-d", lambda: fwd(z, x[0], w, 1, e, None, None)),
        ("ms-x-int", MS, "floating", lambda: fwd([t.int() for t in z], x.int(), w.int(), 1, e, None, None)),
        ("ms-x-empty", MS, "non-empty", lambda: fwd([t[:, :, :0] for t in z], x[:, :, :0], w, 1, e, None, None)),
        ("ms-z-shape", MS, "z[1] must have shape",
         lambda: fwd([z[0], z[1][:, :, :2].contiguous(), z[2], z[3]], x, w, 1, e, None, None)),
        ("ms-z-shape-s2", MS, "z[0] must have shape", lambda: fwd(z[:1] + z2[1:], x2, w2, 2, e, None, None)),
        ("ms-z-dtype", MS, "dtype", lambda: fwd(z[:2] + [z[2].double()] + z[3:], x, w, 1, e, None, None)),
        ("ms-z-noncontig", MS, "contiguous",
         lambda: fwd(z[:3] + [z[3].transpose(2, 3).contiguous().transpose(2, 3)], x, w, 1, e, None, None)),
        ("ms-w-shape", MS, "w must have shape", lambda: fwd(z, x, w[:7].contiguous(), 1, e, None, None)),
        ("ms-w-dtype", MS, "dtype", lambda: fwd(z, x, w.double(), 1, e, None, None)),
        ("ms-eps", MS, "eps", lambda: fwd(z, x, w, 1, 0.0, None, None)),
        ("ms-run-mean-only", MS, "both", lambda: fwd(z, x, w, 1, e, rm, None)),
        ("ms-run-var-only", MS, "both", lambda: fwd(z, x, w, 1, e, None, rv)),
        ("ms-run-shape", MS, "run_mean must have shape", lambda: fwd(z, x, w, 1, e, rm2, rv)),
        ("ms-run-int", MS, "floating", lambda: fwd(z, x, w, 1, e, rm, rv.int())),
        ("ms-bwd-grad-shape", MS, "grad", lambda: bwd(g[:, :, :2].contiguous(), z, x, w, rm, rv, 1, e, True)),
        ("ms-bwd-grad-dtype", MS, "dtype", lambda: bwd(g.double(), z, x, w, rm, rv, 1, e, True)),
        ("ms-bwd-mean-dtype", MS, "statistics dtype", lambda: bwd(g, z, x, w, rm.double(), rv, 1, e, True)),
        ("ms-bwd-var-shape", MS, "var must have shape", lambda: bwd(g, z, x, w, rm, rv[:5], 1, e, False)),
        ("ms-bwd-stride2-z", MS, "z must hold 5", lambda: bwd(g, z, x, w, rm, rv, 2, e, True)),
    ]


_REFUSALS = _mixed_sum_refusals()


@pytest.mark.parametrize("name,op,words,call", _REFUSALS, ids=[r[0] for r in _REFUSALS])
def test_refusals(name, op, words, call):
    with pytest.raises(RuntimeError) as info:
        call()
    msg = str(info.value)
    assert f"adarts {op}:" in msg, (name, msg)
    assert words in msg, (name, msg)
