"""Triton kernels of the fused edge ops against the plain-PyTorch reference (the contract).

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

from adarts_kernels.triton import attention_gather as tg  # noqa: E402
from adarts_kernels.triton import attention_score as ts  # noqa: E402
from adarts_kernels.triton import attention_writeback as tw  # noqa: E402
from adarts_kernels.triton import mixed_sum as tm  # noqa: E402
from adarts_kernels.triton._common import empty  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
TOL = {torch.float32: (1e-5, 1e-6), torch.float64: (1e-10, 1e-12),
       torch.float16: (5e-3, 5e-3), torch.bfloat16: (2e-2, 2e-2)}
B, C, N = 2, 8, 2


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


def _score_inputs(dtype, H=5, W=3, noncontig=False, seed=0):
    r = _gen(seed)
    return (_to(r(B, C, H, W), dtype, noncontig), _to(r(C // 2, C) * 0.5, dtype),
            _to(r(C, C // 2) * 0.5, dtype))


# ----------------------------------------------------------------------------- package

def test_package_exposes_flags_and_launchers():
    assert tr.HAS_TRITON is True and tr.TRITON_ERROR is None
    for mod, name in ((ts, "attention_score_fwd"), (ts, "attention_score_bwd"), (tg, "attention_gather_fwd"),
                      (tg, "attention_gather_bwd"), (tw, "attention_writeback_fwd"), (tw, "attention_writeback_bwd"),
                      (tm, "mixed_sum_fwd"), (tm, "mixed_sum_bwd")):
        assert callable(getattr(mod, name))
    assert torch.isnan(empty((3,), torch.float32, DEV)).all()     # the poison is on


# ----------------------------------------------------------------------------- 1. scoring

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("noncontig", [False, True])
def test_score_fwd_bwd(dtype, noncontig):
    x, w1, w2 = _score_inputs(dtype, noncontig=noncontig)
    a, idx = ts.attention_score_fwd(x, w1, w2, N)
    a_ref, idx_ref = R.attention_score_fwd(*_ref_args([x, w1, w2]), N)
    assert a.dtype == dtype and idx.dtype == torch.int64
    _check(a, a_ref, dtype, "a")
    _check(idx, idx_ref, dtype, "idx")
    grad_a = _to(_gen(1)(B, C), dtype, noncontig)
    out = ts.attention_score_bwd(grad_a, x, w1, w2, a)
    ref = R.attention_score_bwd(*_ref_args([grad_a, x, w1, w2, a]))
    for name, o, e in zip(("dx", "dw1", "dw2"), out, ref):
        assert o.dtype == dtype and o.is_contiguous()
        _check(o, e, dtype, name)


def test_pools_first_max_across_chunks_and_nan():
    """Two chunks of 1024 per plane: equal maxima in the same lane of both chunks, in
    different lanes, all -inf, a NaN (propagates, first NaN's position)."""
    from adarts_kernels.triton.attention_score import _pools
    H, W = 33, 33                                   # 1089 = 1024 + 65
    x = torch.randn(1, 5, H, W).flatten(2)
    x[0, 0, [6, 1030]] = 9.0                        # same lane: the earlier chunk wins
    x[0, 1, [1030, 20, 1088]] = 9.0                 # lanes 6, 20, 64: position 20
    x[0, 2] = float("-inf")                         # all -inf: position 0
    x[0, 3, [3, 1060]] = float("nan")               # NaN: first NaN
    x[0, 3, 7] = float("inf")
    x[0, 4, [0, 1023, 1024]] = 5.0                  # first element and the chunk edge
    x = x.view(1, 5, H, W).to(DEV)
    avg, mx, arg = _pools(x)
    avg_r, mx_r, arg_r = R.attention_pools(x)
    assert arg.tolist() == arg_r.tolist() == [[6, 20, 0, 3, 0]]
    torch.testing.assert_close(mx, mx_r, equal_nan=True)
    torch.testing.assert_close(avg, avg_r, equal_nan=True, rtol=1e-5, atol=1e-6)


def test_score_bwd_tie_routes_to_first_max():
    H, W = 4, 4
    x = torch.randn(B, C, H, W)
    x[:, :, 1, 1] = 7.0
    x[:, :, 2, 3] = 7.0                            # equal maxima: (1, 1) gets d_max
    x[1, 2] = 3.0                                   # constant plane: position 0
    r = _gen(2)
    w1, w2, grad_a = r(C // 2, C), r(C, C // 2), r(B, C)
    x, w1, w2, grad_a = (t.to(DEV) for t in (x, w1, w2, grad_a))
    a, _ = ts.attention_score_fwd(x, w1, w2, N)
    dx, _, _ = ts.attention_score_bwd(grad_a, x, w1, w2, a)
    dx_ref, _, _ = R.attention_score_bwd(grad_a, x, w1, w2, a)
    _check(dx, dx_ref, torch.float32, "dx")
    spike = dx - dx.flatten(2).median(dim=2).values[:, :, None, None]   # d_max only
    assert (spike[:, :, 2, 3].abs() < 1e-6).all()
    assert (spike[1, 2].flatten()[1:].abs() < 1e-6).all()


def test_score_ties_go_to_lower_channels():
    x = torch.randn(B, C, 3, 3, device=DEV)
    w1 = torch.zeros(C // 2, C, device=DEV)
    w2 = torch.zeros(C, C // 2, device=DEV)
    a, idx = ts.attention_score_fwd(x, w1, w2, 3)          # every score is 0.5
    assert idx.tolist() == [0, 1, 2]
    w1 = torch.ones(C // 2, C, device=DEV) * 0.1
    x = x.abs() + 1.0                                       # relu(avg @ w1.T) > 0
    w2[[6, 3, 5]] = 1.0                                     # channels 3, 5, 6 tie, highest
    a, idx = ts.attention_score_fwd(x, w1, w2, 4)
    _, idx_ref = R.attention_score_fwd(x, w1, w2, 4)
    assert idx.tolist() == idx_ref.tolist() == [3, 5, 6, 0]


# ----------------------------------------------------------------------------- 2. gather

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("noncontig", [False, True])
def test_gather_fwd_bwd(dtype, noncontig):
    r = _gen(3)
    H, W = 5, 3
    x = _to(r(B, C, H, W), dtype, noncontig)
    a = _to(torch.rand(B, C, generator=torch.Generator().manual_seed(4)) + 0.1, dtype, noncontig)
    idx = torch.tensor([5, 2], device=DEV)
    xs = tg.attention_gather_fwd(x, a, idx)
    assert xs.dtype == dtype
    _check(xs, R.attention_gather_fwd(*_ref_args([x, a, idx])), dtype, "x_sel")
    grad = _to(r(B, N, H, W), dtype, noncontig)
    dx, da = tg.attention_gather_bwd(grad, x, a, idx)
    dx_ref, da_ref = R.attention_gather_bwd(*_ref_args([grad, x, a, idx]))
    assert dx.dtype == dtype and da.dtype == dtype
    _check(dx, dx_ref, dtype, "dx")
    _check(da, da_ref, dtype, "da")
    keep = [c for c in range(C) if c not in (5, 2)]
    assert (dx[:, keep] == 0).all() and (da[:, keep] == 0).all()


def test_gather_all_channels_and_multi_tile():
    r = _gen(5)
    x, a = r(1, 3, 40, 30).to(DEV), (torch.rand(1, 3) + 0.1).to(DEV)    # 1200: two tiles
    idx = torch.tensor([2, 0, 1], device=DEV)
    _check(tg.attention_gather_fwd(x, a, idx), R.attention_gather_fwd(x, a, idx), torch.float32, "x_sel")
    grad = r(1, 3, 40, 30).to(DEV)
    for o, e in zip(tg.attention_gather_bwd(grad, x, a, idx), R.attention_gather_bwd(grad, x, a, idx)):
        _check(o, e, torch.float32)


# ----------------------------------------------------------------------------- 3. write-back

def _wb_inputs(dtype, stride, H, W, with_beta, noncontig=False, seed=6, idx=(5, 2)):
    r = _gen(seed)
    n = len(idx)
    x = _to(r(B, C, H, W), dtype, noncontig)
    a = _to(torch.rand(B, C, generator=torch.Generator().manual_seed(seed)) + 0.1, dtype, noncontig)
    y = _to(r(B, n, H // stride, W // stride), dtype, noncontig)
    beta = torch.tensor(0.7, device=DEV, dtype=dtype) if with_beta else None
    grad = _to(r(B, C, H // stride, W // stride), dtype, noncontig)
    return x, a, torch.tensor(idx, device=DEV), y, beta, grad


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("stride,H,W", [(1, 5, 3), (2, 4, 4), (2, 5, 3)])
@pytest.mark.parametrize("with_beta", [True, False])
def test_writeback_fwd_bwd(dtype, stride, H, W, with_beta):
    x, a, idx, y, beta, grad = _wb_inputs(dtype, stride, H, W, with_beta, noncontig=(dtype == torch.float32))
    out = tw.attention_writeback_fwd(x, a, idx, y, beta, stride)
    assert out.dtype == dtype
    _check(out, R.attention_writeback_fwd(*_ref_args([x, a, idx, y, beta]), stride), dtype, "out")
    res = tw.attention_writeback_bwd(grad, x, a, idx, y, beta, stride)
    ref = R.attention_writeback_bwd(*_ref_args([grad, x, a, idx, y, beta]), stride)
    for name, o, e in zip(("dx", "da", "dy", "dbeta"), res, ref):
        if o is not None:
            assert o.dtype == dtype
        _check(o, e, dtype, name)
    if with_beta:
        assert res[3].shape == beta.shape


def test_writeback_all_or_one_channel_selected():
    for idx in ((3, 0, 1, 2), (1,)):
        x, a, idx_t, y, beta, _ = _wb_inputs(torch.float32, 2, 4, 6, True, idx=idx)
        x, a, y = x[:1, :4], a[:1, :4], y[:1]
        grad = torch.randn(1, 4, 2, 3, device=DEV)
        _check(tw.attention_writeback_fwd(x, a, idx_t, y, beta, 2),
               R.attention_writeback_fwd(x, a, idx_t, y, beta, 2), torch.float32, "out")
        for o, e in zip(tw.attention_writeback_bwd(grad, x, a, idx_t, y, beta, 2),
                        R.attention_writeback_bwd(grad, x, a, idx_t, y, beta, 2)):
            _check(o, e, torch.float32)


def test_writeback_maxpool_ties_and_nan_route_like_reference():
    x, a, idx, y, beta, grad = _wb_inputs(torch.float32, 2, 4, 4, True)
    x[0, 0, 0:2, 0:2] = 1.0                          # all four equal: (0, 0)
    x[0, 0, 0:2, 2:4] = torch.tensor([[0.0, 2.0], [2.0, 2.0]], device=DEV)   # (0, 3)
    x[0, 1, 2:4, 0:2] = torch.tensor([[-1.0, -3.0], [-1.0, -1.0]], device=DEV)  # (2, 0)
    x[1, 3, 0:2, 0:2] = torch.tensor([[float("nan"), 5.0], [float("nan"), 1.0]], device=DEV)
    dx, da, dy, dbeta = tw.attention_writeback_bwd(grad, x, a, idx, y, beta, 2)
    dx_r, da_r, dy_r, dbeta_r = R.attention_writeback_bwd(grad, x, a, idx, y, beta, 2)
    assert torch.equal(dx != 0, dx_r != 0)           # same routing, incl. the NaN window
    assert dx[0, 0, 0, 0] != 0 and dx[0, 0, 0, 3] != 0 and dx[0, 1, 2, 0] != 0 and dx[1, 3, 1, 0] != 0
    torch.testing.assert_close(dx, dx_r, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(da, da_r, rtol=1e-5, atol=1e-6, equal_nan=True)
    out = tw.attention_writeback_fwd(x, a, idx, y, beta, 2)
    torch.testing.assert_close(out, R.attention_writeback_fwd(x, a, idx, y, beta, 2), equal_nan=True)


# ----------------------------------------------------------------------------- validation

def test_shape_errors_name_the_op():
    x = torch.randn(B, C, 4, 4, device=DEV)
    a = torch.rand(B, C, device=DEV)
    idx = torch.tensor([1, 2], device=DEV)
    w1, w2 = torch.randn(C // 2, C, device=DEV), torch.randn(C, C // 2, device=DEV)
    with pytest.raises(ValueError, match="attention_score_fwd"):
        ts.attention_score_fwd(x, w2, w2, 2)
    with pytest.raises(ValueError, match="attention_score_fwd"):
        ts.attention_score_fwd(x, w1, w2, C + 1)
    with pytest.raises(ValueError, match="attention_score_bwd"):
        ts.attention_score_bwd(a[:1], x, w1, w2, a)
    with pytest.raises(ValueError, match="attention_gather_fwd"):
        tg.attention_gather_fwd(x, a[:, :3], idx)
    with pytest.raises(ValueError, match="attention_gather_bwd"):
        tg.attention_gather_bwd(torch.randn(B, 3, 4, 4, device=DEV), x, a, idx)
    y = torch.randn(B, 2, 2, 2, device=DEV)
    with pytest.raises(ValueError, match="attention_writeback_fwd"):
        tw.attention_writeback_fwd(x, a, idx, y, None, 1)
    with pytest.raises(ValueError, match="attention_writeback_fwd"):
        tw.attention_writeback_fwd(x, a, idx, y, None, 3)
    with pytest.raises(ValueError, match="attention_writeback_bwd"):
        tw.attention_writeback_bwd(torch.randn(B, C, 4, 4, device=DEV), x, a, idx, y, None, 2)
