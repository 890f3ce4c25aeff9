"""``adarts::attention_score`` on every backend against the reference: the backends' own
entry points (forward with the top-k, backward, poisoned outputs), ties (lower channels
first, first maximum of a plane), the public op with autograd (non-contiguous inputs and
gradients), gradcheck, opcheck, torch.compile, bad input; then the cases of one backend only
(CUDA tiles / misaligned storage / large C, Triton pooling chunks)."""
from types import SimpleNamespace

import pytest
import torch
from helpers import (
    DTYPES,
    LAYOUTS,
    assert_close,
    assert_refused,
    assert_topk,
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
    randn,
    score_weights,
    scores,
)

from adarts_kernels.ops import attention_score
from adarts_kernels.ops import reference as R
from adarts_kernels.ops.attention_score import _attention_score

ENTRY = ("cpp", "triton", "cuda")              # backends with entry points of their own
SHAPES = [(3, 12, 7, 5), (2, 8, 4, 6), (1, 4, 1, 1), (3, 12, 8, 6), (2, 8, 2, 2)]   # B, C, H, W


def topk_tol(dtype, B):
    """How far apart two scores may be and still rank either way (summation order)."""
    return 1e-12 if dtype == torch.float64 else 1e-5 * B


def bwd_scales(ref):
    """Absolute tolerances relative to the gradients' size (long reductions)."""
    return tuple(max(1.0, r.abs().max().item()) for r in ref)


def check_fwd(impl, x, w1, w2, n, dtype):
    """``impl``'s forward: ``a`` as the reference's, ``idx`` the same up to near-ties."""
    with kernel_call(impl, x[:, :, 0, 0]):
        a, idx = entry(impl, "attention_score_fwd")(x, w1, w2, n)
    check_outputs((a,), lambda *t: R.attention_score_fwd(*t)[:1], (x, w1, w2, n), dtype, "a")
    ridx = R.attention_score_fwd(x, w1, w2, n)[1]
    assert idx.device == x.device and idx.unique().numel() == n, idx.tolist()
    assert_topk(idx, ridx, scores(x, w1, w2), topk_tol(dtype, x.shape[0]))
    return a


def check_bwd(impl, grad_a, x, w1, w2, a, dtype):
    with kernel_call(impl, x, w1, w2):
        ours = entry(impl, "attention_score_bwd")(grad_a, x, w1, w2, a)
    for o, t in zip(ours, (x, w1, w2)):
        assert o.dtype == t.dtype and o.is_contiguous()
    args = (grad_a, x, w1, w2, a)
    check_outputs(tuple(ours), R.attention_score_bwd, args, dtype, "(dx, dw1, dw2)",
                  scales=bwd_scales(R.attention_score_bwd(*args)))


# ----------------------------------------------------------------------------- entry points

@pytest.mark.parametrize("impl", backend_params(ENTRY))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_entry_fwd(impl, dtype, shape):
    C = shape[1]
    dev, g = device_of(impl), gen(1)
    x = randn(shape, g, dtype, dev)
    w1, w2 = score_weights(C, g, dtype, dev)
    for layout in LAYOUTS[impl]:
        for n in n_values(C, impl):
            check_fwd(impl, laid_out(x, layout), w1, w2, n, dtype)


@pytest.mark.parametrize("impl", backend_params(ENTRY))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_entry_bwd(impl, dtype, shape):
    B, C = shape[:2]
    dev, g = device_of(impl), gen(2)
    x = randn(shape, g, dtype, dev)
    w1, w2 = score_weights(C, g, dtype, dev)
    a = R.attention_score_fwd(x, w1, w2, 1)[0]
    grad_a = randn((B, C), g, dtype, dev)
    for layout in LAYOUTS[impl]:
        check_bwd(impl, laid_out(grad_a, layout), laid_out(x, layout), w1, w2, a, dtype)


@pytest.mark.parametrize("impl", backend_params())
def test_bwd_is_gradient_of_fwd(impl):
    """The backward (the reference's formulas included) is autograd's gradient of the
    reference forward, float64."""
    dev, g = device_of(impl), gen(4)
    x = randn((2, 6, 3, 4), g, torch.float64, dev).requires_grad_()
    w1, w2 = (w.requires_grad_() for w in score_weights(6, g, torch.float64, dev))
    grad_a = randn((2, 6), g, torch.float64, dev)
    expected = torch.autograd.grad(R.attention_score_fwd(x, w1, w2, 3)[0], (x, w1, w2), grad_a)
    a = entry(impl, "attention_score_fwd")(x.detach(), w1.detach(), w2.detach(), 3)[0]
    ours = entry(impl, "attention_score_bwd")(grad_a, x.detach(), w1.detach(), w2.detach(), a)
    for o, r in zip(ours, expected):
        assert_close(o, r, torch.float64, "gradient")


# ----------------------------------------------------------------------------- ties

@pytest.mark.parametrize("impl", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ties_all_equal(impl, dtype):
    """w2 = 0 (or w1 = 0): every a is sigmoid(0) = 1/2, so idx is 0, 1, ..., n-1."""
    dev, g = device_of(impl), gen(6)
    x = randn((3, 12, 5, 5), g, dtype, dev)
    w1, w2 = score_weights(12, g, dtype, dev)
    for w1_, w2_ in ((w1, torch.zeros_like(w2)), (torch.zeros_like(w1), w2)):
        for n in n_values(12, impl):
            a, idx = entry(impl, "attention_score_fwd")(x, w1_, w2_, n)
            assert torch.equal(a, torch.full_like(a, 0.5))
            assert idx.tolist() == list(range(n))


@pytest.mark.parametrize("impl", backend_params(ENTRY))
@pytest.mark.parametrize("dtype", (torch.float64, torch.float32, torch.bfloat16), ids=str)
def test_ties_pairs(impl, dtype):
    """Channels with identical inputs and MLP rows have equal columns of a, hence equal
    scores: the lower channel index comes first, wherever the pair falls relative to the cut.
    (The reference's BLAS matmul may round two equal columns differently, so it is compared
    up to near-ties; the pair (4, 7) with zero w2 rows ties exactly in both.)"""
    B, C = 3, 12
    dev, g = device_of(impl), gen(7)
    pairs = ((2, 9), (0, 11), (5, 6), (4, 7))
    x = randn((B, C, 4, 5), g, torch.float64)
    w1, w2 = score_weights(C, g, torch.float64)
    for lo, hi in pairs:
        x[:, hi] = x[:, lo]
        w2[hi] = w2[lo]
    w2[4] = w2[7] = 0.0
    x, w1, w2 = (t.to(dev, dtype) for t in (x, w1, w2))
    fwd = entry(impl, "attention_score_fwd")
    a, idx = fwd(x, w1, w2, C)
    order = idx.tolist()
    for lo, hi in pairs:
        assert torch.equal(a[:, lo], a[:, hi])
        assert order.index(hi) == order.index(lo) + 1, order
    ra, ridx = R.attention_score_fwd(x, w1, w2, C)
    rorder = ridx.tolist()
    assert rorder.index(7) == rorder.index(4) + 1
    assert_topk(idx, ridx, ra.double().sum(0), topk_tol(dtype, B))
    for n in range(1, C + 1, 3 if interpreted(impl) else 1):   # every cut: a prefix of the full order
        assert fwd(x, w1, w2, n)[1].tolist() == order[:n]


@pytest.mark.parametrize("impl", backend_params())
def test_ties_go_to_lower_channels(impl):
    """Channels 3, 5, 6 tie for the highest score: they come first, in channel order."""
    dev, g = device_of(impl), gen(8)
    B, C = 2, 8
    x = randn((B, C, 3, 3), g, device=dev).abs() + 1.0
    w1 = torch.full((C // 2, C), 0.1, device=dev)           # relu(pools @ w1.T) > 0
    w2 = torch.zeros(C, C // 2, device=dev)
    w2[[6, 3, 5]] = 1.0
    _, idx = entry(impl, "attention_score_fwd")(x, w1, w2, 4)
    assert idx.tolist() == R.attention_score_fwd(x, w1, w2, 4)[1].tolist() == [3, 5, 6, 0]


@pytest.mark.parametrize("impl", backend_params())
def test_ties_identical_channels_op(impl):
    """Through the public op: every channel identical, equal attention, channels 0..n-1."""
    dev, g = device_of(impl), gen(9)
    x = randn((2, 1, 4, 4), g, device=dev).expand(2, 8, 4, 4).contiguous()
    w1 = randn((4, 1), g, device=dev).expand(4, 8).contiguous()
    w2 = randn((1, 4), g, device=dev).expand(8, 4).contiguous()
    _, idx = attention_score(x, w1, w2, 3, impl=impl)
    assert idx.tolist() == [0, 1, 2]


@pytest.mark.parametrize("impl", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_first_maximum_routing(impl, dtype):
    """Repeated maxima in a plane: the max-pool gradient goes to the first one (row-major);
    a constant plane routes it to its first element."""
    dev, g = device_of(impl), gen(10)
    B, C, H, W = 2, 6, 4, 5
    x = torch.randint(-2, 3, (B, C, H, W), generator=g).double()
    x[:, :, 1, 1] = 5.0
    x[:, :, 3, 0] = 5.0
    x[1, 2] = 3.0
    x = x.to(dev, dtype)
    w1, w2 = score_weights(C, g, dtype, dev)
    grad_a = randn((B, C), g, dtype, dev)
    a = entry(impl, "attention_score_fwd")(x, w1, w2, 2)[0]
    check_bwd(impl, grad_a, x, w1, w2, a, dtype)
    dx = entry(impl, "attention_score_bwd")(grad_a, x, w1, w2, a)[0].cpu()
    plain = torch.ones(B, C, dtype=torch.bool)
    plain[1, 2] = False
    # dx = d_avg / HW everywhere, plus d_max at the routed position only
    assert torch.equal(dx[:, :, 3, 0][plain], dx[:, :, 0, 0][plain])
    flat = dx[1, 2].flatten()
    assert torch.equal(flat[1:], flat[1].expand(H * W - 1))


@pytest.mark.parametrize("impl", backend_params(("cpp", "cuda")))
@pytest.mark.parametrize("B,C,H,W,n", [(4, 32, 32, 32, 8), (8, 64, 16, 16, 16)], ids=str)
def test_deterministic(impl, B, C, H, W, n):
    """Sizes that split into several chunks (OpenMP) / blocks (CUDA), no atomics: two runs
    give identical bits, both as the reference."""
    dev, g = device_of(impl), gen(14)
    x = randn((B, C, H, W), g, device=dev)
    w1, w2 = score_weights(C, g, device=dev)
    grad_a = randn((B, C), g, device=dev)
    fwd, bwd = entry(impl, "attention_score_fwd"), entry(impl, "attention_score_bwd")
    a, idx = fwd(x, w1, w2, n)
    a2, idx2 = fwd(x, w1, w2, n)
    assert torch.equal(a, a2) and torch.equal(idx, idx2)
    ra, ridx = R.attention_score_fwd(x, w1, w2, n)
    assert_close(a, ra, torch.float32, "a")
    assert_topk(idx, ridx, ra.double().sum(0), tol=1e-5 * B)
    first, second = bwd(grad_a, x, w1, w2, a), bwd(grad_a, x, w1, w2, a)
    ref = R.attention_score_bwd(grad_a, x, w1, w2, a)
    for o, r, e, s in zip(first, second, ref, bwd_scales(ref)):
        assert torch.equal(o, r)
        close(o, e, torch.float32, "gradient", scale=s)


# ----------------------------------------------------------------------------- public op

@pytest.mark.parametrize("impl", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,C,H,W,n", [(3, 12, 7, 5, 3), (1, 2, 1, 3, 2)], ids=str)
def test_op_matches_reference(impl, dtype, B, C, H, W, n):
    """Through ``attention_score(..., impl=impl)`` with autograd; x and the incoming
    gradient non-contiguous; the weights as (hidden, C) matrices or 1x1 conv weights."""
    dev, g = device_of(impl), gen(4)
    x = randn((B, C, H, W), g, dtype, dev)
    w1, w2 = score_weights(C, g, dtype, dev)
    xs = noncontig(x).requires_grad_()
    w1s, w2s = w1.clone().requires_grad_(), w2.clone().requires_grad_()
    conv = B == 1                                      # the weights as conv weights (R, C, 1, 1)
    a, idx = attention_score(xs, w1s[..., None, None] if conv else w1s, w2s[..., None, None] if conv else w2s,
                             n, impl=impl)
    check_outputs((a,), lambda *t: R.attention_score_fwd(*t)[:1], (x, w1, w2, n), dtype, "a")
    assert_topk(idx, R.attention_score_fwd(x, w1, w2, n)[1], scores(x, w1, w2), topk_tol(dtype, B))
    grad_a = noncontig(randn((B, C), g, dtype, dev))
    a.backward(grad_a)
    args = (grad_a, x, w1, w2, a.detach())
    check_outputs((xs.grad, w1s.grad, w2s.grad), R.attention_score_bwd, args, dtype, "(dx, dw1, dw2)",
                  scales=bwd_scales(R.attention_score_bwd(*args)))


@pytest.mark.parametrize("impl", backend_params())
def test_gradcheck_float64(impl):
    dev, g = device_of(impl), gen(6)
    x = randn((2, 4, 2, 4), g, torch.float64, dev).requires_grad_()
    w1, w2 = (w.requires_grad_() for w in score_weights(4, g, torch.float64, dev))
    assert torch.autograd.gradcheck(lambda x, w1, w2: attention_score(x, w1, w2, 2, impl=impl)[0], (x, w1, w2),
                                    fast_mode=impl == "triton")


@pytest.mark.parametrize("impl", backend_params())
def test_opcheck(impl):
    dev, g = device_of(impl), gen(7)
    x = randn((2, 8, 4, 4), g, device=dev).requires_grad_()
    w1, w2 = (w.requires_grad_() for w in score_weights(8, g, device=dev))
    torch.library.opcheck(_attention_score, (x, w1, w2, 2, impl))


@pytest.mark.parametrize("impl", backend_params())
def test_compile_fullgraph(impl):
    dev, g = device_of(impl), gen(8)
    x = randn((2, 8, 4, 4), g, device=dev)
    w1, w2 = score_weights(8, g, device=dev)

    def f(x, w1, w2):
        a, idx = attention_score(x * 2.0, w1, w2, 3, impl=impl)
        return a.square(), idx

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    ins = [t.clone().requires_grad_() for t in (x, w1, w2)]
    out, idx = compiled(*ins)
    out.sum().backward()
    ref = [t.clone().requires_grad_() for t in (x, w1, w2)]
    rout, ridx = f(*ref)
    rout.sum().backward()
    assert_close(out, rout, torch.float32, "a")
    assert torch.equal(idx, ridx)
    for p, q in zip(ins, ref):
        assert_close(p.grad, q.grad, torch.float32, "grad")


# ----------------------------------------------------------------------------- bad input

def test_bad_input_named():
    """The public op's checks (before any backend runs) name the op."""
    g = gen(9)
    x = randn((2, 8, 4, 4), g)
    w1, w2 = score_weights(8, g)
    with pytest.raises(ValueError, match="adarts attention_score: expected x of shape"):
        attention_score(x[0], w1, w2, 2)
    with pytest.raises(ValueError, match="adarts attention_score: expected w1"):
        attention_score(x, w1[:, :6], w2, 2)
    with pytest.raises(ValueError, match="adarts attention_score: expected w1"):
        attention_score(x, w1, w2[:6], 2)
    with pytest.raises(TypeError, match="adarts attention_score: dtype mismatch"):
        attention_score(x, w1.double(), w2, 2)
    for n in (0, 9, 2.0):
        with pytest.raises(ValueError, match="adarts attention_score: n_select must be an integer"):
            attention_score(x, w1, w2, n)
    with pytest.raises(ValueError, match="adarts attention_score: x is empty"):
        attention_score(x[:, :, :0], w1, w2, 2)


def refusal_args(dev):
    g = gen(16)
    B, C, H, W = 2, 8, 4, 6
    w1, w2 = score_weights(C, g, device=dev)
    return SimpleNamespace(x=randn((B, C, H, W), g, device=dev), w1=w1, w2=w2,
                           a=randn((B, C), g, device=dev).sigmoid(), ga=randn((B, C), g, device=dev))


def _fwd(impl):
    return entry(impl, "attention_score_fwd")


def _bwd(impl):
    return entry(impl, "attention_score_bwd")


CPP = [  # (id, words in the message, call(impl, args))
    ("rank", "4-d", lambda i, d: _fwd(i)(d.x[0], d.w1, d.w2, 2)),
    ("w1-shape", "w1", lambda i, d: _fwd(i)(d.x, d.w1[:, :6].contiguous(), d.w2, 2)),
    ("w2-shape", "w2", lambda i, d: _fwd(i)(d.x, d.w1, d.w2[:6], 2)),
    ("w-dtype", "dtype", lambda i, d: _fwd(i)(d.x, d.w1.double(), d.w2, 2)),
    ("n0", "n_select", lambda i, d: _fwd(i)(d.x, d.w1, d.w2, 0)),
    ("n-big", "n_select", lambda i, d: _fwd(i)(d.x, d.w1, d.w2, 9)),
    ("empty-plane", "H, W", lambda i, d: _fwd(i)(d.x[:, :, :0], d.w1, d.w2, 2)),
    ("noncontig", "contiguous",
     lambda i, d: _fwd(i)(d.x.contiguous(memory_format=torch.channels_last), d.w1, d.w2, 2)),
    ("bwd-a-shape", "shape", lambda i, d: _bwd(i)(d.ga, d.x, d.w1, d.w2, d.a[:1])),
    ("bwd-grad-dtype", "dtype", lambda i, d: _bwd(i)(d.ga.double(), d.x, d.w1, d.w2, d.a)),
]
CUDA = [
    ("n-big", "n_select", lambda i, d: _fwd(i)(d.x, d.w1, d.w2, 9)),
]
TRITON = [  # the launchers raise ValueError naming the launcher
    ("w1-shape", "attention_score_fwd", lambda i, d: _fwd(i)(d.x, d.w2, d.w2, 2)),
    ("n-big", "attention_score_fwd", lambda i, d: _fwd(i)(d.x, d.w1, d.w2, 9)),
    ("bwd-grad-shape", "attention_score_bwd", lambda i, d: _bwd(i)(d.a[:1], d.x, d.w1, d.w2, d.a)),
]
REFUSALS = backend_cases([("cpp", c[0], RuntimeError, "adarts attention_score:", c[1], c[2]) for c in CPP]
                         + [("cuda", c[0], RuntimeError, "adarts attention_score", c[1], c[2]) for c in CUDA]
                         + [("triton", c[0], ValueError, c[1], "", c[2]) for c in TRITON])


@pytest.mark.parametrize("impl,exc,op,words,call", REFUSALS)
def test_entry_refusals(impl, exc, op, words, call):
    """Each backend's entry point refuses bad arguments with a message naming the op."""
    assert_refused(exc, op, words, lambda: call(impl, refusal_args(device_of(impl))))


# ----------------------------------------------------------------------------- one backend only

CUDA_SHAPES = [  # B, C, H, W, n
    (2, 8, 4, 4, 3),
    (3, 10, 5, 7, 10),
    (2, 6, 40, 41, 2),     # one block per plane (pools), scalar path
    (4, 40, 3, 3, 17),
    (40, 96, 2, 3, 48),    # several GEMM tiles in every direction
    (1, 4, 70, 61, 2),
]


@pytest.mark.parametrize("impl", backend_params(("cuda",)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", CUDA_SHAPES, ids=str)
@pytest.mark.parametrize("layout", ("contiguous", "misaligned"))
def test_cuda_tiles_and_alignment(impl, dtype, shape, layout):
    """The CUDA kernels' paths: one block per plane, several GEMM tiles, misaligned x."""
    B, C, H, W, n = shape
    g = gen(B * 1000 + C)
    x = laid_out(randn((B, C, H, W), g, dtype, "cuda"), layout)
    w1, w2 = score_weights(C, g, dtype, "cuda")
    a = check_fwd(impl, x, w1, w2, n, dtype)
    check_bwd(impl, randn((B, C), g, dtype, "cuda"), x, w1, w2, a, dtype)


@pytest.mark.parametrize("impl", backend_params(("cuda",)))
def test_cuda_topk_large_c(impl):
    """6200 float64 scores (49.6 KB) exceed the 48 KB of static shared memory: the ranking
    kernel reads them from global memory; float32 with C = 4096 ranks from shared memory."""
    g = gen(11)
    x = randn((2, 6200, 1, 2), g, torch.float64, "cuda")
    check_fwd(impl, x, *score_weights(6200, g, torch.float64, "cuda"), 1000, torch.float64)
    x = randn((3, 4096, 1, 1), g, torch.float32, "cuda")
    w1, w2 = score_weights(4096, g, torch.float32, "cuda")
    check_fwd(impl, x, w1, w2, 4096, torch.float32)
    idx = entry(impl, "attention_score_fwd")(x, w1, w2, 4096)[1]
    assert torch.equal(idx.sort().values, torch.arange(4096, device="cuda"))


@pytest.mark.parametrize("impl", backend_params(("triton",)))
def test_triton_pools_first_max_across_chunks_and_nan(impl):
    """Two chunks of 1024 per plane: equal maxima in the same lane of both chunks, in
    different lanes, all -inf, a NaN (propagates, first NaN's position)."""
    from adarts_kernels.triton.attention_score import _pools
    H, W = 33, 33                                   # 1089 = 1024 + 65
    x = torch.randn(1, 5, H, W, generator=gen(12)).flatten(2)
    x[0, 0, [6, 1030]] = 9.0                        # same lane: the earlier chunk wins
    x[0, 1, [1030, 20, 1088]] = 9.0                 # lanes 6, 20, 64: position 20
    x[0, 2] = float("-inf")                         # all -inf: position 0
    x[0, 3, [3, 1060]] = float("nan")               # NaN: first NaN
    x[0, 3, 7] = float("inf")
    x[0, 4, [0, 1023, 1024]] = 5.0                  # first element and the chunk edge
    x = x.view(1, 5, H, W).to(device_of(impl))
    avg, mx, arg = _pools(x)
    avg_r, mx_r, arg_r = R.attention_pools(x)
    assert arg.tolist() == arg_r.tolist() == [[6, 20, 0, 3, 0]]
    torch.testing.assert_close(mx, mx_r, equal_nan=True)
    torch.testing.assert_close(avg, avg_r, equal_nan=True, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- nothing silent

def test_missing_tensors_and_bool_n_select_named():
    g = gen(34)
    x = randn((2, 8, 4, 4), g)
    w1, w2 = score_weights(8, g)
    for name, args in (("x", (None, w1, w2)), ("w1", (x, None, w2)), ("w2", (x, w1, None))):
        with pytest.raises(TypeError, match=f"adarts attention_score: {name} must be a tensor, got NoneType"):
            attention_score(*args, 2)
    for n in (True, False):      # a bool is no channel count (True would have been taken as 1)
        with pytest.raises(ValueError, match="adarts attention_score: n_select must be an integer"):
            attention_score(x, w1, w2, n)


@pytest.mark.parametrize("impl", backend_params(("triton",)))
def test_triton_refuses_planes_past_int32_positions(impl):
    """The Triton pools keep the argmax (and the "no NaN" sentinel H*W) as int32 flat
    positions: planes of 2^31 elements or more are refused by the launchers. An empty batch
    carries the plane size without memory; the check runs before any launch."""
    from adarts_kernels.triton.attention_score import attention_score_bwd, attention_score_fwd
    dev = device_of(impl)
    w1, w2 = score_weights(2, gen(35), device=dev)
    x = torch.empty(0, 2, 2 ** 16, 2 ** 15, device=dev)
    with pytest.raises(ValueError, match=r"adarts attention_score_fwd: planes H\*W must have fewer than 2\^31"):
        attention_score_fwd(x, w1, w2, 1)
    a = torch.empty(0, 2, device=dev)
    with pytest.raises(ValueError, match=r"adarts attention_score_bwd: planes H\*W must have fewer than 2\^31"):
        attention_score_bwd(a, x, w1, w2, a)
    small = torch.empty(0, 2, 1, 2 ** 31 - 1, device=dev)    # 2^31 - 1 elements per plane: accepted
    assert attention_score_fwd(small, w1, w2, 1)[0].shape == (0, 2)


@pytest.mark.parametrize("impl", backend_params())
def test_double_backward_refused_by_name(impl):
    dev, g = device_of(impl), gen(36)
    x = randn((2, 4, 3, 3), g, torch.float64, dev).requires_grad_()
    w1, w2 = (w.requires_grad_() for w in score_weights(4, g, torch.float64, dev))
    a, _ = attention_score(x, w1, w2, 2, impl=impl)
    gx = torch.autograd.grad((a * a).sum(), x, create_graph=True)[0]
    assert gx.shape == x.shape and torch.isfinite(gx).all()
    with pytest.raises(RuntimeError, match="adarts attention_score: double backward is not supported"):
        gx.sum().backward()
