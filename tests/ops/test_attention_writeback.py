"""``adarts::attention_writeback`` on every backend against the reference: the backends' own
entry points (forward and backward, stride 1 and 2, with and without beta, poisoned
outputs), 2x2 windows with ties and NaN, the public op with autograd (non-contiguous inputs
and gradients), gradcheck, opcheck, torch.compile and the whole edge (score, gather,
write-back), bad input; then the cases of one backend only (CUDA large planes and misaligned
storage)."""
import math
from types import SimpleNamespace

import pytest
import torch
from helpers import (
    DTYPES,
    LAYOUTS,
    assert_close,
    assert_refused,
    attention_values,
    backend_cases,
    backend_params,
    check_outputs,
    close,
    device_of,
    entry,
    gen,
    interpreted,
    kernel_call,
    laid_out,
    n_values,
    noncontig,
    rand_idx,
    randn,
    score_weights,
)

from adarts_kernels.ops import attention_gather, attention_score, attention_writeback
from adarts_kernels.ops import reference as R
from adarts_kernels.ops.attention_writeback import _attention_writeback

ENTRY = ("cpp", "triton", "cuda")              # backends with entry points of their own
SHAPES = {1: [(3, 12, 7, 5), (2, 8, 4, 6), (1, 4, 1, 1)],       # B, C, H, W: odd planes, B = 1, 1x1
          2: [(3, 12, 8, 6), (2, 8, 2, 2), (1, 4, 4, 6)]}


def check_entry(impl, x, a, idx, y, beta, grad, stride, dtype, layout="contiguous", nan=False):
    """Forward and backward of ``impl``'s entry point against the reference (``nan``: inputs
    hold NaN, compared value by value with NaN equal to NaN); returns ``dx``."""
    fwd, bwd = entry(impl, "attention_writeback_fwd"), entry(impl, "attention_writeback_bwd")
    x, y, grad = (laid_out(t, layout) for t in (x, y, grad))
    if layout == "noncontig":
        a = laid_out(a, layout)
    args = (x, a, idx, y, beta, stride)
    with kernel_call(impl, x):
        out = fwd(*args)
    assert out.dtype == x.dtype
    if nan:
        close(out, R.attention_writeback_fwd(*args), dtype, "out", equal_nan=True)
    else:
        check_outputs((out,), lambda *t: (R.attention_writeback_fwd(*t),), args, dtype, f"{layout} out")
    with kernel_call(impl, x, a, y):
        dx, da, dy, dbeta = bwd(grad, *args)
    B, C = x.shape[:2]
    hwo = grad.shape[2] * grad.shape[3]
    scales = (1.0, math.sqrt(hwo), 1.0, math.sqrt(B * C * hwo))
    if beta is None:
        if impl == "triton":
            assert dbeta is None
        else:
            assert dbeta.shape == () and dbeta.dtype == x.dtype and dbeta.device == x.device
            assert dbeta.item() == 0.0
        ours = (dx, da, dy)
    else:
        assert dbeta.shape == beta.shape and dbeta.dtype == beta.dtype
        ours = (dx, da, dy, dbeta)
    for o, t in zip(ours, (x, a, y, x)):
        assert o.dtype == t.dtype
    ref_fn = lambda *t: R.attention_writeback_bwd(*t)[:len(ours)]
    if nan:
        for i, (o, r) in enumerate(zip(ours, ref_fn(grad, *args))):
            close(o, r, dtype, f"grad[{i}]", scale=scales[i], equal_nan=True)
    else:
        check_outputs(ours, ref_fn, (grad, *args), dtype, f"{layout} (dx, da, dy, dbeta)", scales=scales)
    return dx


def inputs(B, C, H, W, n, stride, dtype, dev, g, with_beta=True):
    x = randn((B, C, H, W), g, dtype, dev)
    a = attention_values(B, C, g, dtype, dev)
    idx = rand_idx(C, n, g, dev)
    y = randn((B, n, H // stride, W // stride), g, dtype, dev)
    beta = torch.tensor(0.7, dtype=dtype, device=dev) if with_beta else None
    grad = randn((B, C, H // stride, W // stride), g, dtype, dev)
    return x, a, idx, y, beta, grad


# ----------------------------------------------------------------------------- entry points

CASES = [(impl, f"s{s}-{shape}", s, shape) for impl in ENTRY for s in (1, 2) for shape in SHAPES[s]
         if not (impl == "triton" and shape[1] == 12)]      # interpreted: the 12-channel planes are slow
CASES += [("triton", "s2-odd-(2, 8, 5, 3)", 2, (2, 8, 5, 3))]   # the launchers floor odd planes at stride 2


@pytest.mark.parametrize("impl,stride,shape", backend_cases(CASES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_beta", (True, False), ids=("beta", "nobeta"))
def test_entry_matches_reference(impl, stride, shape, dtype, with_beta):
    B, C, H, W = shape
    dev, g = device_of(impl), gen(11)
    layouts = LAYOUTS[impl] if not interpreted(impl) or dtype == torch.float32 else ("contiguous",)
    for n in n_values(C, impl):
        x, a, idx, y, beta, grad = inputs(B, C, H, W, n, stride, dtype, dev, g, with_beta)
        for layout in layouts:
            check_entry(impl, x, a, idx, y, beta, grad, stride, dtype, layout)


@pytest.mark.parametrize("impl", backend_params())
@pytest.mark.parametrize("stride", (1, 2))
def test_bwd_is_gradient_of_fwd(impl, stride):
    """The backward (the reference's formulas included) is autograd's gradient of the
    reference forward, float64."""
    dev, g = device_of(impl), gen(12)
    x, a, idx, y, beta, grad = inputs(2, 8, 4, 6, 3, stride, torch.float64, dev, g)
    leaves = [t.clone().requires_grad_() for t in (x, a, y, beta)]
    out = R.attention_writeback_fwd(leaves[0], leaves[1], idx, leaves[2], leaves[3], stride)
    expected = torch.autograd.grad(out, leaves, grad)
    ours = entry(impl, "attention_writeback_bwd")(grad, x, a, idx, y, beta, stride)
    for o, r in zip(ours, expected):
        assert_close(o, r, torch.float64, "gradient")


@pytest.mark.parametrize("impl", backend_params(ENTRY))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_window_ties_and_nan(impl, dtype):
    """Stride 2. Equal values inside 2x2 windows: the gradient goes to the first maximum in
    row-major order, as the reference routes it. A NaN in a window is its maximum (the last
    NaN of the window, like F.max_pool2d). NaN here on bypass channels; on selected
    channels see test_nonfinite_on_overwritten_channels_stays_out."""
    dev, g = device_of(impl), gen(13)
    B, C, H, W = 2, 6, 8, 12
    idx = torch.tensor([5, 2], device=dev)
    x = torch.randint(-2, 3, (B, C, H, W), generator=g).to(dev, dtype)
    x[0, 0, 0:2, 0:2] = 1.0                                                  # all four equal: (0, 0)
    x[0, 0, 0:2, 2:4] = torch.tensor([[0.0, 2.0], [2.0, 2.0]])              # (0, 3)
    x[0, 1, 2:4, 0:2] = torch.tensor([[-1.0, -3.0], [-1.0, -1.0]])          # (2, 0)
    a = attention_values(B, C, g, dtype, dev)
    y = randn((B, 2, H // 2, W // 2), g, dtype, dev)
    beta = torch.tensor(1.3, dtype=dtype, device=dev)
    grad = randn((B, C, H // 2, W // 2), g, dtype, dev)
    for layout in LAYOUTS[impl]:
        dx = check_entry(impl, x, a, idx, y, beta, grad, 2, dtype, layout)
        rdx = R.attention_writeback_bwd(grad, x, a, idx, y, beta, 2)[0]
        assert torch.equal(dx != 0, rdx != 0)
        assert dx[0, 0, 0, 0] != 0 and dx[0, 0, 0, 3] != 0 and dx[0, 1, 2, 0] != 0
    xn = x.clone()
    xn[0, 0, 0, 0] = float("nan")
    xn[1, 1, 2, 5] = xn[1, 1, 3, 4] = float("nan")                          # one window: (3, 4)
    xn[1, 3, 0:2, 0:2] = torch.tensor([[float("nan"), 5.0], [float("nan"), 1.0]])   # (1, 0)
    for layout in (lay for lay in LAYOUTS[impl] if lay != "noncontig"):   # noncontig() compares with NaN
        dx = check_entry(impl, xn, a, idx, y, beta, grad, 2, dtype, layout, nan=True)
        rdx = R.attention_writeback_bwd(grad, xn, a, idx, y, beta, 2)[0]
        assert torch.equal(dx != 0, rdx != 0)                               # same routing
        assert dx[1, 1, 3, 4] != 0 and dx[1, 1, 2, 5] == 0 and dx[1, 3, 1, 0] != 0 and dx[1, 3, 0, 1] == 0


@pytest.mark.parametrize("impl", backend_params(("cpp", "cuda")))
@pytest.mark.parametrize("B,C,H,W,n", [(4, 32, 32, 32, 8), (8, 64, 32, 32, 16)], ids=str)
def test_deterministic(impl, B, C, H, W, n):
    """Sizes that split into several chunks (OpenMP) / blocks (CUDA), no atomics: two runs
    give identical bits, both as the reference."""
    dev, g = device_of(impl), gen(14)
    x, a, idx, y, beta, grad = inputs(B, C, H, W, n, 2, torch.float32, dev, g)
    bwd = entry(impl, "attention_writeback_bwd")
    first = bwd(grad, x, a, idx, y, beta, 2)
    second = bwd(grad, x, a, idx, y, beta, 2)
    ref = R.attention_writeback_bwd(grad, x, a, idx, y, beta, 2)
    scales = (1.0, math.sqrt(H * W / 4), 1.0, math.sqrt(B * C * H * W / 4))
    for o, r, e, s in zip(first, second, ref, scales):
        assert torch.equal(o, r)
        close(o, e, torch.float32, "gradient", scale=s)


# ----------------------------------------------------------------------------- public op

@pytest.mark.parametrize("impl", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("stride", (1, 2))
@pytest.mark.parametrize("with_beta", (True, False), ids=("beta", "nobeta"))
def test_op_matches_reference(impl, dtype, stride, with_beta):
    """Through ``attention_writeback(..., impl=impl)`` with autograd; x, y and the incoming
    gradient non-contiguous."""
    H, W = (6, 4) if stride == 2 else (7, 5)
    B, C = (2, 8) if interpreted(impl) else (3, 12)
    dev, g = device_of(impl), gen(stride)
    x, a, idx, y, beta, _ = inputs(B, C, H, W, 3, stride, dtype, dev, g, with_beta)
    leaves = [noncontig(x), a.clone(), noncontig(y)] + ([beta.clone()] if with_beta else [])
    for t in leaves:
        t.requires_grad_()
    out = attention_writeback(leaves[0], leaves[1], idx, leaves[2], leaves[3] if with_beta else None, stride,
                              impl=impl)
    args = (x, a, idx, y, beta, stride)
    check_outputs((out,), lambda *t: (R.attention_writeback_fwd(*t),), args, dtype, "out")
    grad = noncontig(randn(out.shape, g, dtype, dev))
    out.backward(grad)
    n_out = 4 if with_beta else 3
    hwo = out.shape[2] * out.shape[3]
    check_outputs(tuple(t.grad for t in leaves), lambda *t: R.attention_writeback_bwd(*t)[:n_out], (grad, *args),
                  dtype, "(dx, da, dy, dbeta)", scales=(1.0, math.sqrt(hwo), 1.0, math.sqrt(out.numel())))


@pytest.mark.parametrize("impl", backend_params())
def test_gradcheck_float64(impl):
    dev, g = device_of(impl), gen(6)
    for stride in (2, 1):
        x, a, idx, y, beta, _ = inputs(2, 4, 2, 4, 2, stride, torch.float64, dev, g)
        ins = tuple(t.requires_grad_() for t in (x, a, y, beta))
        assert torch.autograd.gradcheck(
            lambda x, a, y, b, idx=idx, stride=stride: attention_writeback(x, a, idx, y, b, stride, impl=impl),
            ins, fast_mode=impl == "triton")


@pytest.mark.parametrize("impl", backend_params())
def test_opcheck(impl):
    dev, g = device_of(impl), gen(7)
    for stride, with_beta in ((1, True), (2, False)):
        x, a, idx, y, beta, _ = inputs(2, 8, 4, 4, 2, stride, torch.float32, dev, g, with_beta)
        for t in (x, a, y, beta):
            if t is not None:
                t.requires_grad_()
        torch.library.opcheck(_attention_writeback, (x, a, idx, y, beta, stride, impl))


def edge(x, w1, w2, beta, n, stride, impl):
    """The whole ADARTS edge on the three ops: score, gather, an operation, write-back."""
    a, idx = attention_score(x, w1, w2, n, impl=impl)
    xs = attention_gather(x, a, idx, impl=impl)
    y = torch.nn.functional.max_pool2d(xs, 2, 2) if stride == 2 else torch.tanh(xs)
    return attention_writeback(x, a, idx, y, beta, stride, impl=impl), idx


@pytest.mark.parametrize("impl", backend_params())
def test_compile_fullgraph_edge(impl):
    dev, g = device_of(impl), gen(8)
    x = randn((2, 8, 4, 4), g, device=dev)
    w1, w2 = score_weights(8, g, device=dev)
    beta = torch.tensor(0.37, device=dev)
    compiled = torch.compile(edge, fullgraph=True, backend="aot_eager")
    ins = [t.clone().requires_grad_() for t in (x, w1, w2, beta)]
    out, idx = compiled(*ins, 2, 1, impl)
    out.sum().backward()
    ref_ins = [t.clone().requires_grad_() for t in (x, w1, w2, beta)]
    ref, ref_idx = edge(*ref_ins, 2, 1, impl)
    ref.sum().backward()
    assert torch.equal(idx, ref_idx)
    assert_close(out, ref, torch.float32, "out")
    for p, q in zip(ins, ref_ins):
        assert_close(p.grad, q.grad, torch.float32, "grad")


@pytest.mark.parametrize("impl", backend_params(ENTRY))
@pytest.mark.parametrize("stride", (1, 2))
def test_edge_matches_reference(impl, stride):
    """Score, gather and write-back of one backend, forward and autograd backward, against
    the reference."""
    dev, g = device_of(impl), gen(stride)
    B, C, H, W, n = (4, 16, 8, 8, 4) if dev == "cuda" else (2, 8, 4, 6, 3)
    x0 = randn((B, C, H, W), g, device=dev)
    w10, w20 = randn((C // 2, C), g, device=dev, scale=0.3), randn((C, C // 2), g, device=dev, scale=0.3)
    beta0 = torch.tensor(0.6, device=dev)
    results = {}
    for name in (impl, "reference"):
        leaves = [t.clone().requires_grad_() for t in (x0, w10, w20, beta0)]
        out, idx = edge(*leaves, n, stride, name)
        out.square().sum().backward()
        results[name] = (out.detach(), idx, [t.grad for t in leaves])
    (out, idx, grads), (rout, ridx, rgrads) = results[impl], results["reference"]
    assert torch.equal(idx, ridx)
    torch.testing.assert_close(out, rout, rtol=1e-5, atol=1e-5)
    for o, r in zip(grads, rgrads):
        torch.testing.assert_close(o, r, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- bad input

def test_bad_input_named():
    """The public op's checks (before any backend runs) name the op."""
    g = gen(9)
    x, a, idx, y, _, _ = inputs(2, 8, 4, 4, 2, 1, torch.float32, "cpu", g)
    odd = randn((2, 8, 5, 4), g)
    with pytest.raises(ValueError, match="adarts attention_writeback: expected x of shape"):
        attention_writeback(x[0], a, idx, y)
    with pytest.raises(TypeError, match="adarts attention_writeback: dtype mismatch"):
        attention_writeback(x, a.double(), idx, y)
    with pytest.raises(TypeError, match="adarts attention_writeback: idx must be an int64"):
        attention_writeback(x, a, idx.int(), y)
    with pytest.raises(ValueError, match="adarts attention_writeback: stride must be 1 or 2"):
        attention_writeback(x, a, idx, y, None, 3)
    with pytest.raises(ValueError, match="adarts attention_writeback: stride 2 needs even H and W"):
        attention_writeback(odd, a, idx, y[:, :, :2, :2], None, 2)
    with pytest.raises(ValueError, match="adarts attention_writeback: expected y of shape"):
        attention_writeback(x, a, idx, y, None, 2)
    with pytest.raises(ValueError, match="adarts attention_writeback: expected a of shape"):
        attention_writeback(x, a[:, :6], idx, y)
    with pytest.raises(ValueError, match="adarts attention_writeback: beta must be a 0-dim tensor"):
        attention_writeback(x, a, idx, y, torch.ones(2))


@pytest.mark.parametrize("impl", backend_params(("reference", "cpp", "triton")))
@pytest.mark.parametrize("idx", [[3, 3], [2, 100]], ids=("repeat", "range"))
def test_bad_idx_values_named(impl, idx):
    """Index values are checked where the data lives (on CPU here: Python for the reference
    and Triton, the C++ kernel for cpp); the message names the op either way."""
    x, a, _, y, _, _ = inputs(2, 8, 4, 4, 2, 1, torch.float32, "cpu", gen(9))
    with pytest.raises((ValueError, RuntimeError), match="adarts attention_writeback: idx"):
        attention_writeback(x, a, torch.tensor(idx), y, impl=impl)


def refusal_args(dev):
    g = gen(16)
    B, C, H, W, n = 2, 8, 4, 6, 2
    return SimpleNamespace(x=randn((B, C, H, W), g, device=dev), a=attention_values(B, C, g, device=dev),
                           idx=torch.tensor([5, 1], device=dev), y=randn((B, n, H, W), g, device=dev),
                           y2=randn((B, n, H // 2, W // 2), g, device=dev), beta=torch.tensor(0.5, device=dev),
                           gout=randn((B, C, H, W), g, device=dev), odd=randn((2, 8, 5, 6), g, device=dev))


def _fwd(impl):
    return entry(impl, "attention_writeback_fwd")


def _bwd(impl):
    return entry(impl, "attention_writeback_bwd")


CPP = [  # (id, words in the message, call(impl, args))
    ("stride3", "stride", lambda i, d: _fwd(i)(d.x, d.a, d.idx, d.y, d.beta, 3)),
    ("stride0", "stride", lambda i, d: _fwd(i)(d.x, d.a, d.idx, d.y, d.beta, 0)),
    ("odd-h", "even", lambda i, d: _fwd(i)(d.odd, d.a, d.idx, d.y2, d.beta, 2)),
    ("y-shape-s2", "y must have shape", lambda i, d: _fwd(i)(d.x, d.a, d.idx, d.y, d.beta, 2)),
    ("y-shape-s1", "y must have shape", lambda i, d: _fwd(i)(d.x, d.a, d.idx, d.y2, d.beta, 1)),
    ("y-n", "y must have shape", lambda i, d: _fwd(i)(d.x, d.a, torch.tensor([5]), d.y, d.beta, 1)),
    ("idx-repeat", "repeat", lambda i, d: _fwd(i)(d.x, d.a, torch.tensor([2, 2]), d.y, d.beta, 1)),
    ("idx-range", "out of range", lambda i, d: _fwd(i)(d.x, d.a, torch.tensor([2, 100]), d.y, d.beta, 1)),
    ("beta-dtype", "dtype", lambda i, d: _fwd(i)(d.x, d.a, d.idx, d.y, d.beta.double(), 1)),
    ("beta-numel", "beta", lambda i, d: _fwd(i)(d.x, d.a, d.idx, d.y, torch.ones(2), 1)),
    ("dtype", "dtype", lambda i, d: _fwd(i)(d.x, d.a.double(), d.idx, d.y, d.beta, 1)),
    ("noncontig-y", "contiguous",
     lambda i, d: _fwd(i)(d.x, d.a, d.idx, d.y.transpose(2, 3).contiguous().transpose(2, 3), d.beta, 1)),
    ("bwd-grad-shape", "grad", lambda i, d: _bwd(i)(d.gout, d.x, d.a, d.idx, d.y2, d.beta, 2)),
    ("bwd-stride3", "stride", lambda i, d: _bwd(i)(d.gout, d.x, d.a, d.idx, d.y, d.beta, 3)),
]
CUDA = [
    ("stride3", "stride", lambda i, d: _fwd(i)(d.x, d.a, d.idx, d.y, None, 3)),
]
TRITON = [  # the launchers raise ValueError naming the launcher
    ("y-shape-s1", "attention_writeback_fwd", lambda i, d: _fwd(i)(d.x, d.a, d.idx, d.y2, None, 1)),
    ("stride3", "attention_writeback_fwd", lambda i, d: _fwd(i)(d.x, d.a, d.idx, d.y2, None, 3)),
    ("bwd-grad-shape", "attention_writeback_bwd", lambda i, d: _bwd(i)(d.gout, d.x, d.a, d.idx, d.y2, None, 2)),
]
REFUSALS = backend_cases([("cpp", c[0], RuntimeError, "adarts attention_writeback:", c[1], c[2]) for c in CPP]
                         + [("cuda", c[0], RuntimeError, "adarts attention_writeback", c[1], c[2]) for c in CUDA]
                         + [("triton", c[0], ValueError, c[1], "", c[2]) for c in TRITON])


@pytest.mark.parametrize("impl,exc,op,words,call", REFUSALS)
def test_entry_refusals(impl, exc, op, words, call):
    """Each backend's entry point refuses bad arguments with a message naming the op."""
    assert_refused(exc, op, words, lambda: call(impl, refusal_args(device_of(impl))))


# ----------------------------------------------------------------------------- one backend only

CUDA_SHAPES = {  # B, C, H, W, n
    1: [(2, 6, 8, 8, 3), (2, 5, 7, 9, 2), (2, 3, 44, 40, 1), (1, 4, 130, 70, 1), (3, 8, 5, 5, 8)],
    2: [(2, 6, 8, 8, 3), (2, 5, 6, 10, 2), (2, 3, 44, 40, 1), (1, 3, 130, 72, 1), (3, 8, 4, 4, 8)],
}


@pytest.mark.parametrize("impl", backend_params(("cuda",)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("stride,shape", [(s, shape) for s in (1, 2) for shape in CUDA_SHAPES[s]], ids=str)
@pytest.mark.parametrize("with_beta", (True, False), ids=("beta", "nobeta"))
@pytest.mark.parametrize("layout", ("contiguous", "misaligned"))
def test_cuda_planes_and_alignment(impl, dtype, stride, shape, with_beta, layout):
    """The CUDA kernels' paths: vectorised and scalar, large planes, misaligned storage."""
    B, C, H, W, n = shape
    g = gen(7 * stride + 31 * H + W)
    x, a, idx, y, beta, grad = inputs(B, C, H, W, n, stride, dtype, "cuda", g, with_beta)
    check_entry(impl, x, a, idx, y, beta, grad, stride, dtype, layout)


# ----------------------------------------------------------------------------- nothing silent

@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")   # the interpreter's masked lanes
@pytest.mark.parametrize("impl", backend_params())
@pytest.mark.parametrize("stride", (1, 2))
def test_nonfinite_on_overwritten_channels_stays_out(impl, stride):
    """NaN and infinities in ``x`` and ``a`` on the channels the output overwrites (``idx``):
    they reach neither the output nor any gradient. The reference selects the bypass terms
    (``torch.where``, not a product with a 0/1 mask, where ``0 * NaN`` is NaN), so ``dx`` and
    ``da`` are exactly 0 there and ``dbeta`` stays finite, as on every backend; the values
    equal those computed with the non-finite entries replaced by finite ones."""
    dev = device_of(impl)
    x, a, idx, y, beta, grad = inputs(2, 6, 4, 6, 2, stride, torch.float64, dev, gen(31))
    s0, s1 = idx.tolist()
    xb, ab = x.clone(), a.clone()
    xb[:, s0] = float("nan")
    xb[0, s1, 1, 1], xb[1, s1, 0, 0] = float("inf"), float("-inf")
    ab[0, s0], ab[1, s1] = float("nan"), float("inf")
    fwd, bwd = entry(impl, "attention_writeback_fwd"), entry(impl, "attention_writeback_bwd")
    out = fwd(xb, ab, idx, y, beta, stride)
    grads = bwd(grad, xb, ab, idx, y, beta, stride)
    assert torch.isfinite(out).all() and all(torch.isfinite(t).all() for t in grads)
    dx, da = grads[0], grads[1]
    assert (dx[:, [s0, s1]] == 0).all() and (da[:, [s0, s1]] == 0).all()
    close(out, R.attention_writeback_fwd(x, a, idx, y, beta, stride), torch.float64, "out")
    for i, (o, r) in enumerate(zip(grads, R.attention_writeback_bwd(grad, x, a, idx, y, beta, stride))):
        close(o, r, torch.float64, f"grad[{i}]", scale=10.0)


def test_positive_attention_is_documented():
    """``a > 0`` (the stride-2 identity maxpool(x * a) = a * maxpool(x)) is a documented
    precondition, not a check: a check would read device data on every call."""
    import adarts_kernels.ops.attention_writeback as module
    for doc in (module.__doc__, attention_writeback.__doc__):
        assert "a > 0" in doc and "sigmoid" in doc and "device data" in doc


def test_missing_tensors_and_bool_stride_named():
    x, a, idx, y, beta, _ = inputs(2, 8, 4, 4, 2, 1, torch.float32, "cpu", gen(32))
    for name, args in (("x", (None, a, idx, y)), ("a", (x, None, idx, y)), ("y", (x, a, idx, None))):
        with pytest.raises(TypeError, match=f"adarts attention_writeback: {name} must be a tensor, got NoneType"):
            attention_writeback(*args)
    with pytest.raises(TypeError, match="adarts attention_writeback: idx must be an int64 tensor, got NoneType"):
        attention_writeback(x, a, None, y)
    with pytest.raises(ValueError, match="adarts attention_writeback: stride must be 1 or 2, got True"):
        attention_writeback(x, a, idx, y, beta, True)
    attention_writeback(x, a, idx, y, None)             # beta may be None (= 1)


@pytest.mark.parametrize("impl", backend_params())
def test_double_backward_refused_by_name(impl):
    dev = device_of(impl)
    x, a, idx, y, beta, _ = inputs(2, 4, 4, 4, 2, 1, torch.float64, dev, gen(33))
    x, a, y = (t.requires_grad_() for t in (x, a, y))
    out = attention_writeback(x, a, idx, y, beta, 1, impl=impl)
    gx = torch.autograd.grad((out * out).sum(), x, create_graph=True)[0]
    assert gx.shape == x.shape and torch.isfinite(gx).all()
    with pytest.raises(RuntimeError, match="adarts attention_writeback: double backward is not supported"):
        gx.sum().backward()
