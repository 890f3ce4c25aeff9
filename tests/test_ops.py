"""The ``adarts::`` custom ops: every available backend against the reference, gradcheck,
opcheck, torch.compile, non-contiguous inputs and gradients, bad input."""
import pytest
import torch

import adarts_kernels
from adarts_kernels.backend import IMPLS, resolve, why_unavailable
from adarts_kernels.ops import attention_gather, attention_score, attention_writeback
from adarts_kernels.ops import reference as R
from adarts_kernels.ops.attention_gather import _attention_gather
from adarts_kernels.ops.attention_score import _attention_score
from adarts_kernels.ops.attention_writeback import _attention_writeback

CPU_IMPLS = [n for n in ("reference", "cpp", "triton") if why_unavailable(n, "cpu") is None]


def rand_idx(C, n, gen=None):
    return torch.randperm(C, generator=gen)[:n]


def make_inputs(B=3, C=12, H=7, W=5, n=3, stride=1, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, H, W, generator=g, dtype=torch.float64).to(dtype)
    a = torch.rand(B, C, generator=g, dtype=torch.float64).mul(0.9).add(0.05).to(dtype)
    idx = rand_idx(C, n, g)
    y = torch.randn(B, n, H // stride, W // stride, generator=g, dtype=torch.float64).to(dtype)
    beta = torch.tensor(0.37, dtype=dtype)
    w1 = torch.randn(C // 2, C, generator=g, dtype=torch.float64).mul(0.5).to(dtype)
    w2 = torch.randn(C, C // 2, generator=g, dtype=torch.float64).mul(0.5).to(dtype)
    return x, a, idx, y, beta, w1, w2


def noncontig(t):
    """Same values, non-contiguous layout."""
    if t.dim() < 2:
        return t
    return t.transpose(-1, -2).contiguous().transpose(-1, -2)


TOL = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-5)}


# ----------------------------------------------------------------------------- forward + backward

@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("stride", [1, 2])
def test_writeback_matches_reference(impl, dtype, stride):
    H, W = (6, 4) if stride == 2 else (7, 5)
    x, a, idx, y, beta, _, _ = make_inputs(H=H, W=W, stride=stride, dtype=dtype, seed=stride)
    for with_beta in (True, False):
        b = beta if with_beta else None
        ins = [t.clone().requires_grad_() for t in (x, a, y)] + ([beta.clone().requires_grad_()] if with_beta else [])
        out = attention_writeback(ins[0], ins[1], idx, ins[2], ins[3] if with_beta else None, stride, impl=impl)
        ref = R.attention_writeback_fwd(x, a, idx, y, b, stride)
        torch.testing.assert_close(out, ref, **TOL[dtype])
        g = noncontig(torch.randn_like(out))              # gradients may arrive non-contiguous
        out.backward(g)
        rdx, rda, rdy, rdb = R.attention_writeback_bwd(g, x, a, idx, y, b, stride)
        torch.testing.assert_close(ins[0].grad, rdx, **TOL[dtype])
        torch.testing.assert_close(ins[1].grad, rda, **TOL[dtype])
        torch.testing.assert_close(ins[2].grad, rdy, **TOL[dtype])
        if with_beta:
            torch.testing.assert_close(ins[3].grad, rdb, **TOL[dtype])


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gather_matches_reference(impl, dtype):
    x, a, idx, _, _, _, _ = make_inputs(dtype=dtype, seed=3)
    xn, an = noncontig(x).requires_grad_(), a.clone().requires_grad_()
    assert not xn.is_contiguous()
    out = attention_gather(xn, an, idx, impl=impl)
    torch.testing.assert_close(out, R.attention_gather_fwd(x, a, idx), **TOL[dtype])
    g = noncontig(torch.randn_like(out))
    out.backward(g)
    rdx, rda = R.attention_gather_bwd(g, x, a, idx)
    torch.testing.assert_close(xn.grad, rdx, **TOL[dtype])
    torch.testing.assert_close(an.grad, rda, **TOL[dtype])


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_score_matches_reference(impl, dtype):
    x, _, _, _, _, w1, w2 = make_inputs(dtype=dtype, seed=4)
    xs = x.clone().requires_grad_()
    w1s, w2s = w1.clone().requires_grad_(), w2.clone().requires_grad_()
    a, idx = attention_score(xs, w1s, w2s, 3, impl=impl)
    ra, ridx = R.attention_score_fwd(x, w1, w2, 3)
    torch.testing.assert_close(a, ra, **TOL[dtype])
    assert torch.equal(idx, ridx) and idx.dtype == torch.int64
    g = torch.randn_like(a)
    a.backward(g)
    rdx, rdw1, rdw2 = R.attention_score_bwd(g, x, w1, w2, a.detach())
    torch.testing.assert_close(xs.grad, rdx, **TOL[dtype])
    torch.testing.assert_close(w1s.grad, rdw1, **TOL[dtype])
    torch.testing.assert_close(w2s.grad, rdw2, **TOL[dtype])


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_score_ties_pick_lower_channels(impl):
    # every channel identical -> equal attention -> channels 0..n-1
    x = torch.randn(2, 1, 4, 4).expand(2, 8, 4, 4).contiguous()
    w1 = torch.randn(4, 1).expand(4, 8).contiguous()
    w2 = torch.randn(1, 4).expand(8, 4).contiguous()
    a, idx = attention_score(x, w1, w2, 3, impl=impl)
    assert idx.tolist() == [0, 1, 2]


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_within_twice_torch_own_error(impl, dtype):
    x, a, idx, y, beta, _, _ = make_inputs(dtype=torch.float32, seed=5)
    exact = R.attention_writeback_fwd(x.double(), a.double(), idx, y.double(), beta.double(), 1)
    # what plain PyTorch in this precision misses by
    xh, ah, yh, bh = (t.to(dtype) for t in (x, a, y, beta))
    torch_err = ((xh * ah[:, :, None, None]).index_copy(1, idx, yh) * bh).double().sub(exact).abs().max()
    out = attention_writeback(xh, ah, idx, yh, bh, 1, impl=impl)
    assert out.dtype == dtype
    err = out.double().sub(exact).abs().max()
    assert err <= 2 * torch_err + 1e-6, (err, torch_err)


# ----------------------------------------------------------------------------- gradcheck / opcheck / compile

@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_gradcheck_float64(impl):
    # small: every input element is perturbed twice, and Triton runs interpreted here
    x, a, idx, y, beta, w1, w2 = make_inputs(B=2, C=4, H=2, W=4, n=2, stride=2, dtype=torch.float64, seed=6)
    x.requires_grad_(), a.requires_grad_(), y.requires_grad_(), beta.requires_grad_()
    assert torch.autograd.gradcheck(lambda x, a, y, b: attention_writeback(x, a, idx, y, b, 2, impl=impl),
                                    (x, a, y, beta))
    y1 = torch.randn(2, 2, 2, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, a, y, b: attention_writeback(x, a, idx, y, b, 1, impl=impl),
                                    (x, a, y1, beta))
    assert torch.autograd.gradcheck(lambda x, a: attention_gather(x, a, idx, impl=impl), (x, a))
    w1.requires_grad_(), w2.requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w1, w2: attention_score(x, w1, w2, 2, impl=impl)[0], (x, w1, w2))


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_opcheck(impl):
    x, a, idx, y, beta, w1, w2 = make_inputs(B=2, C=8, H=4, W=4, n=2, dtype=torch.float32, seed=7)
    for t in (x, a, y, beta, w1, w2):
        t.requires_grad_()
    y2 = torch.randn(2, 2, 2, 2, requires_grad=True)
    cases = [
        (_attention_writeback, (x, a, idx, y, beta, 1, impl)),
        (_attention_writeback, (x, a, idx, y2, None, 2, impl)),
        (_attention_gather, (x, a, idx, impl)),
        (_attention_score, (x, w1, w2, 2, impl)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_compile_fullgraph():
    x, a, idx, y, beta, w1, w2 = make_inputs(B=2, C=8, H=4, W=4, n=2, dtype=torch.float32, seed=8)

    def edge(x, w1, w2, beta):
        a, idx = attention_score(x, w1, w2, 2)
        xs = attention_gather(x, a, idx)
        return attention_writeback(x, a, idx, xs * 2.0, beta, 1)

    compiled = torch.compile(edge, fullgraph=True, backend="aot_eager")
    ins = [t.clone().requires_grad_() for t in (x, w1, w2, beta)]
    out = compiled(*ins)
    out.sum().backward()
    ref_ins = [t.clone().requires_grad_() for t in (x, w1, w2, beta)]
    ref = edge(*ref_ins)
    ref.sum().backward()
    torch.testing.assert_close(out, ref)
    for p, q in zip(ins, ref_ins):
        torch.testing.assert_close(p.grad, q.grad)


# ----------------------------------------------------------------------------- bad input and backends

def test_bad_input_named():
    x, a, idx, y, beta, w1, w2 = make_inputs(B=2, C=8, H=4, W=4, n=2)
    with pytest.raises(ValueError, match="attention_writeback: expected x of shape"):
        attention_writeback(x[0], a, idx, y)
    with pytest.raises(TypeError, match="dtype mismatch"):
        attention_writeback(x, a.double(), idx, y)
    with pytest.raises(TypeError, match="idx must be an int64"):
        attention_gather(x, a, idx.int())
    with pytest.raises(ValueError, match="stride must be 1 or 2"):
        attention_writeback(x, a, idx, y, None, 3)
    with pytest.raises(ValueError, match=r"expected y of shape"):
        attention_writeback(x, a, idx, y, None, 2)
    with pytest.raises(ValueError, match="beta must be a 0-dim tensor"):
        attention_writeback(x, a, idx, y, torch.ones(2))
    with pytest.raises(ValueError, match="n_select must be an integer"):
        attention_score(x, w1, w2, 9)
    with pytest.raises(ValueError, match="attention_gather: idx values must lie in"):
        attention_gather(x, a, torch.tensor([0, 8]), impl="reference")
    with pytest.raises(ValueError, match="attention_writeback: idx values must be distinct"):
        attention_writeback(x, a, torch.tensor([3, 3]), y, impl="reference")
    with pytest.raises(ValueError, match="unknown backend"):
        attention_gather(x, a, idx, impl="fpga")


def test_explicit_backend_that_cannot_run_says_why():
    x, a, idx, *_ = make_inputs(B=2, C=8, H=4, W=4, n=2)
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run here"):
        attention_gather(x, a, idx, impl="cuda")


def test_backends_report(monkeypatch):
    info = adarts_kernels.backends()
    assert set(info) == {"reference", "cpp", "cuda", "triton"}
    assert info["reference"] == {"available": True, "reason": None}
    for name, v in info.items():
        assert v["available"] or isinstance(v["reason"], str) and v["reason"]
    monkeypatch.setenv("ADARTS_KERNELS_IMPL", "reference")
    assert resolve(None, torch.device("cpu")) == "reference"
    monkeypatch.setenv("ADARTS_KERNELS_IMPL", "nonsense")
    with pytest.raises(ValueError, match="ADARTS_KERNELS_IMPL"):
        resolve(None, torch.device("cpu"))
    monkeypatch.delenv("ADARTS_KERNELS_IMPL")
    assert resolve("auto", torch.device("cpu")) in ("cpp", "reference")
    assert set(IMPLS) == {"auto", "reference", "cpp", "cuda", "triton"}
