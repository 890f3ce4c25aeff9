"""Triton kernels of the fused edge ops against the plain-PyTorch reference (the contract).
(The attention ops are tested in tests/ops/.)

Without CUDA the kernels run in Triton's interpreter on CPU tensors (``TRITON_INTERPRET=1``,
set here before anything imports the kernel modules): slow, hence the tiny shapes.
Every launcher-allocated buffer is poisoned with NaN (``POISON_OUTPUTS``), so an element a
kernel fails to write breaks the comparison.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import adarts_kernels.triton as tr  # noqa: E402
from adarts_kernels.ops import reference as R  # noqa: E402

if not tr.HAS_TRITON:
    # CI installs triton and sets ADARTS_REQUIRE_TRITON=1: there a missing triton is a failure
    if os.environ.get("ADARTS_REQUIRE_TRITON") == "1":
        raise ImportError(f"triton is required (ADARTS_REQUIRE_TRITON=1) but does not import: {tr.TRITON_ERROR!r}")
    pytest.skip(f"triton does not import: {tr.TRITON_ERROR!r}", allow_module_level=True)
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA device and TRITON_INTERPRET is not 1", allow_module_level=True)

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
TOL = {torch.float32: (1e-5, 1e-6), torch.float64: (1e-10, 1e-12),
       torch.float16: (5e-3, 5e-3), torch.bfloat16: (2e-2, 2e-2)}
B = 2


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(tr, "POISON_OUTPUTS", True)


def _gen(seed=0):
    g = torch.Generator().manual_seed(seed)
    return lambda *shape: torch.randn(*shape, generator=g)


def _to(t, dtype, noncontig=False):
    """``t`` on the device in ``dtype``; with ``noncontig`` a non-contiguous view holding the
    same values (channels moved to the last dimension in memory, or a strided slice)."""
    t = t.to(DEV, dtype)
    if not noncontig:
        return t
    if t.dim() == 4:
        v = t.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    else:
        v = torch.stack([t, torch.zeros_like(t)], dim=-1)[..., 0]
    assert not v.is_contiguous() and torch.equal(v, t)
    return v


def _ref_args(args):
    """The reference runs in float32 on the upcast half inputs, in float64 on float64."""
    return [a.float() if isinstance(a, torch.Tensor) and a.dtype in (torch.float16, torch.bfloat16) else a
            for a in args]


def _check(actual, expected, dtype, what=""):
    if expected is None:
        assert actual is None, what
        return
    assert actual.shape == expected.shape, what
    if not actual.is_floating_point():
        assert actual.dtype == expected.dtype and torch.equal(actual.cpu(), expected.cpu()), what
        return
    assert not torch.isnan(actual).any(), f"{what}: NaN (a poisoned element never written?)"
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(actual.cpu().to(expected.dtype), expected.cpu(), rtol=rtol, atol=atol, msg=what)


# ----------------------------------------------------------------------------- 4. mixed sum

MS_N = 3                                            # channels of x_sel
MS_SHAPES = [(1, 5, 7), (2, 6, 8)]                  # (stride, H, W): odd sizes at stride 1


def _ms_stats_dtype(dtype):
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _ms_inputs(dtype, stride, H, W, training, noncontig=False, seed=7, x=None):
    """``z`` list, ``x``, ``w`` (a softmaxed row), ``run_mean, run_var`` (None in training;
    float32, or float64 for float64 inputs, like BatchNorm buffers) and ``grad``."""
    r = _gen(seed)
    P = 4 if stride == 1 else 5
    HO, WO = H // stride, W // stride
    x = _to(r(B, MS_N, H, W) if x is None else x, dtype, noncontig)
    z = [_to(r(B, MS_N, HO, WO) * (1 + q) + 0.3 * q, dtype, noncontig) for q in range(P)]
    w = _to(torch.softmax(r(8), dim=0), dtype)
    run_mean = run_var = None
    if not training:
        sd = _ms_stats_dtype(dtype)
        run_mean = (r(P + 2, MS_N) * 0.2).to(DEV, sd)
        run_var = (torch.rand(P + 2, MS_N, generator=torch.Generator().manual_seed(seed)) + 0.5).to(DEV, sd)
    grad = _to(r(B, MS_N, HO, WO), dtype, noncontig)
    return z, x, w, run_mean, run_var, grad


def _ms_ref(t):
    """``_ref_args`` for one argument, lists of tensors included."""
    if isinstance(t, list):
        return _ref_args(t)
    return _ref_args([t])[0]


def _check_ms_fwd(out, z, x, w, stride, run_mean, run_var, dtype, eps=1e-5):
    y, mean, var = out
    y_r, mean_r, var_r = R.mixed_sum_fwd(*(_ms_ref(t) for t in (z, x, w)), stride, eps,
                                         _ms_ref(run_mean), _ms_ref(run_var))
    assert y.dtype == dtype and mean.dtype == var.dtype == _ms_stats_dtype(dtype)
    _check(y, y_r, dtype, "y")
    _check(mean, mean_r, dtype, "mean")
    _check(var, var_r, dtype, "var")
    return mean_r, var_r


def _check_ms_bwd(out, grad, z, x, w, mean, var, stride, training, dtype, eps=1e-5):
    dz, dx, dw = out
    dz_r, dx_r, dw_r = R.mixed_sum_bwd(*(_ms_ref(t) for t in (grad, z, x, w, mean, var)), stride, eps, training)
    assert isinstance(dz, list) and len(dz) == len(z)
    for q, (o, e) in enumerate(zip(dz, dz_r)):
        assert o.dtype == dtype and o.is_contiguous()
        _check(o, e, dtype, f"dz[{q}]")
    assert dx.dtype == dtype and dw.dtype == dtype
    _check(dx, dx_r, dtype, "dx")
    _check(dw, dw_r, dtype, "dw")
    assert dw[0] == 0                  # 'none'; at stride 2 column 3 is skip_connect = z[0]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("stride,H,W", MS_SHAPES)
@pytest.mark.parametrize("training", [True, False])
def test_mixed_sum_fwd_bwd(dtype, stride, H, W, training):
    z, x, w, run_mean, run_var, grad = _ms_inputs(dtype, stride, H, W, training)
    out = tr.mixed_sum_fwd(z, x, w, stride, 1e-5, run_mean, run_var)
    mean_r, var_r = _check_ms_fwd(out, z, x, w, stride, run_mean, run_var, dtype)
    # the backward from the reference's statistics, so both sides see the same inputs
    res = tr.mixed_sum_bwd(grad, z, x, w, mean_r, var_r, stride, 1e-5, training)
    _check_ms_bwd(res, grad, z, x, w, mean_r, var_r, stride, training, dtype)


@pytest.mark.parametrize("stride,H,W", MS_SHAPES)
@pytest.mark.parametrize("training", [True, False])
def test_mixed_sum_op_noncontiguous_autograd(stride, H, W, training):
    """Through ``adarts_kernels.ops.mixed_sum(..., impl="triton")`` with non-contiguous
    ``x`` and ``z`` (channels-last memory): outputs and autograd gradients as the reference."""
    from adarts_kernels.ops import mixed_sum
    dtype = torch.float32
    z, x, w, run_mean, run_var, grad = _ms_inputs(dtype, stride, H, W, training, noncontig=True, seed=11)
    results = {}
    for impl in ("triton", "reference"):
        zl = [t.detach().requires_grad_() for t in z]
        xl, wl = x.detach().requires_grad_(), w.detach().requires_grad_()
        assert not xl.is_contiguous() and not any(t.is_contiguous() for t in zl)
        y, mean, var = mixed_sum(zl, xl, wl, stride, 1e-3, run_mean, run_var, impl=impl)
        grads = torch.autograd.grad(y, zl + [xl, wl], grad)
        results[impl] = (y, mean, var) + tuple(grads)
    names = ["y", "mean", "var"] + [f"dz[{q}]" for q in range(len(z))] + ["dx", "dw"]
    for name, o, e in zip(names, results["triton"], results["reference"]):
        _check(o.detach(), e.detach(), dtype, name)


@pytest.mark.parametrize("stride,H,W", MS_SHAPES)
@pytest.mark.parametrize("training", [True, False])
def test_mixed_sum_maxpool_ties_route_like_reference(stride, H, W, training):
    """Integer-valued ``x`` (many equal maxima per window), a constant plane and a plateau:
    the max-pool gradient goes to the first maximum of each window in row-major order."""
    g = torch.Generator().manual_seed(13)
    x = torch.randint(-1, 2, (B, MS_N, H, W), generator=g).float()
    x[0, 1] = 2.0                                   # every window of the plane ties
    x[1, 2, 1:4, 2:6] = 5.0                         # a plateau spanning several windows
    z, x, w, run_mean, run_var, grad = _ms_inputs(torch.float32, stride, H, W, training, x=x, seed=14)
    y, mean, var = tr.mixed_sum_fwd(z, x, w, stride, 1e-5, run_mean, run_var)
    mean_r, var_r = _check_ms_fwd((y, mean, var), z, x, w, stride, run_mean, run_var, torch.float32)
    res = tr.mixed_sum_bwd(grad, z, x, w, mean_r, var_r, stride, 1e-5, training)
    _check_ms_bwd(res, grad, z, x, w, mean_r, var_r, stride, training, torch.float32)
    # the max-pool part alone: w selects only the max_pool_3x3 candidate
    w1 = torch.zeros(8, device=DEV)
    w1[1] = 1.0
    dx = tr.mixed_sum_bwd(grad, z, x, w1, mean_r, var_r, stride, 1e-5, False)[1]
    dx_r = R.mixed_sum_bwd(grad, z, x, w1, mean_r, var_r, stride, 1e-5, False)[1]
    assert torch.equal(dx != 0, dx_r != 0)
    torch.testing.assert_close(dx, dx_r, rtol=1e-5, atol=1e-6)
    assert dx[0, 1].flatten().count_nonzero() < H * W     # a tied plane routes to few positions


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")   # inf - inf in the interpreter
@pytest.mark.parametrize("stride,H,W", MS_SHAPES)
def test_mixed_sum_eval_nan_and_inf_windows(stride, H, W):
    """Eval mode (finite gradients whatever x holds): a NaN wins its windows (the last NaN
    scanned), an all ``-inf`` window keeps its first in-bounds element; y propagates both."""
    x = torch.randn(B, MS_N, H, W)
    x[0, 0, 1, 1] = x[0, 0, 2, 2] = float("nan")
    x[1, 1, 0:4, 0:4] = float("-inf")
    x[1, 2, 2, 3] = float("inf")
    z, x, w, run_mean, run_var, grad = _ms_inputs(torch.float32, stride, H, W, False, x=x, seed=15)
    y, mean, var = tr.mixed_sum_fwd(z, x, w, stride, 1e-5, run_mean, run_var)
    y_r = R.mixed_sum_fwd(z, x, w, stride, 1e-5, run_mean, run_var)[0]
    torch.testing.assert_close(y, y_r, rtol=1e-5, atol=1e-6, equal_nan=True)
    dz, dx, dw = tr.mixed_sum_bwd(grad, z, x, w, mean, var, stride, 1e-5, False)
    dz_r, dx_r, dw_r = R.mixed_sum_bwd(grad, z, x, w, mean, var, stride, 1e-5, False)
    assert torch.isfinite(dx).all()
    torch.testing.assert_close(dx, dx_r, rtol=1e-5, atol=1e-6)
    for o, e in zip(dz, dz_r):
        torch.testing.assert_close(o, e, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dw, dw_r, rtol=1e-5, atol=1e-5, equal_nan=True)


def test_mixed_sum_shape_errors_name_the_op():
    x = torch.randn(B, MS_N, 4, 4, device=DEV)
    w = torch.rand(8, device=DEV)
    z1 = [torch.randn(B, MS_N, 4, 4, device=DEV) for _ in range(4)]
    with pytest.raises(ValueError, match="mixed_sum_fwd"):
        tr.mixed_sum_fwd(z1[:3], x, w, 1, 1e-5, None, None)          # 3 z at stride 1
    with pytest.raises(ValueError, match="mixed_sum_fwd"):
        tr.mixed_sum_fwd(z1 + z1[:1], x, w, 2, 1e-5, None, None)     # full-size z at stride 2
    with pytest.raises(ValueError, match="mixed_sum_fwd"):
        tr.mixed_sum_fwd(z1, x, w[:4], 1, 1e-5, None, None)
    with pytest.raises(ValueError, match="mixed_sum_fwd"):
        tr.mixed_sum_fwd(z1, x, w, 1, 1e-5, torch.zeros(5, MS_N), torch.ones(5, MS_N))
    with pytest.raises(ValueError, match="mixed_sum_bwd"):
        tr.mixed_sum_bwd(x[:, :, :2], z1, x, w, torch.zeros(6, MS_N), torch.ones(6, MS_N), 1, 1e-5, True)
    x5 = torch.randn(B, MS_N, 5, 5, device=DEV)
    z2 = [torch.randn(B, MS_N, 2, 2, device=DEV) for _ in range(5)]
    with pytest.raises(ValueError, match="mixed_sum_bwd"):
        tr.mixed_sum_bwd(z2[0], z2, x5, w, torch.zeros(7, MS_N), torch.ones(7, MS_N), 2, 1e-5, True)
