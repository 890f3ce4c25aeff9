"""``adarts::attention_gather`` on every backend against the reference: the backends' own
entry points (forward and backward, poisoned outputs), the public op with autograd
(non-contiguous inputs and gradients), gradcheck, opcheck, torch.compile, bad input; then
the cases of one backend only (CUDA misaligned / large planes, Triton multi-tile)."""
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
    device_of,
    entry,
    gen,
    kernel_call,
    laid_out,
    n_values,
    noncontig,
    rand_idx,
    randn,
)

from adarts_kernels.ops import attention_gather
from adarts_kernels.ops import reference as R
from adarts_kernels.ops.attention_gather import _attention_gather

ENTRY = ("cpp", "triton", "cuda")              # backends with entry points of their own
SHAPES = [(3, 12, 7, 5), (2, 8, 4, 6), (1, 4, 1, 1)]   # B, C, H, W: odd planes, B = 1, 1x1


def check_entry(impl, x, a, idx, grad, dtype, layout="contiguous"):
    """Forward and backward of ``impl``'s entry point against the reference; the backward
    leaves the unselected channels at zero."""
    fwd, bwd = entry(impl, "attention_gather_fwd"), entry(impl, "attention_gather_bwd")
    x, grad = laid_out(x, layout), laid_out(grad, layout)
    if layout == "noncontig":
        a = laid_out(a, layout)
    with kernel_call(impl, x):
        out = fwd(x, a, idx)
    check_outputs((out,), lambda *t: (R.attention_gather_fwd(*t),), (x, a, idx), dtype, f"{layout} x_sel")
    with kernel_call(impl, x, a):
        dx, da = bwd(grad, x, a, idx)
    H, W = x.shape[2:]
    check_outputs((dx, da), R.attention_gather_bwd, (grad, x, a, idx), dtype, f"{layout} (dx, da)",
                  scales=(1.0, math.sqrt(H * W)))
    keep = torch.ones(x.shape[1], dtype=torch.bool, device=x.device)
    keep[idx] = False
    assert torch.count_nonzero(dx[:, keep]) == 0 and torch.count_nonzero(da[:, keep]) == 0


# ----------------------------------------------------------------------------- entry points

@pytest.mark.parametrize("impl", backend_params(ENTRY))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_entry_matches_reference(impl, dtype, shape):
    B, C, H, W = shape
    dev, g = device_of(impl), gen(10)
    x = randn((B, C, H, W), g, dtype, dev)
    a = attention_values(B, C, g, dtype, dev)
    for n in n_values(C, impl):
        idx = rand_idx(C, n, g, dev)
        grad = randn((B, n, H, W), g, dtype, dev)
        for layout in LAYOUTS[impl]:
            check_entry(impl, x, a, idx, grad, dtype, layout)


# ----------------------------------------------------------------------------- public op

@pytest.mark.parametrize("impl", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,C,H,W,n", [(3, 12, 7, 5, 3), (1, 1, 3, 4, 1)], ids=str)
def test_op_matches_reference(impl, dtype, B, C, H, W, n):
    """Through ``attention_gather(..., impl=impl)`` with autograd; x and the incoming
    gradient non-contiguous."""
    dev, g = device_of(impl), gen(3)
    x = randn((B, C, H, W), g, dtype, dev)
    a = attention_values(B, C, g, dtype, dev)
    idx = rand_idx(C, n, g, dev)
    xn, an = noncontig(x).requires_grad_(), a.clone().requires_grad_()
    assert not xn.is_contiguous()
    out = attention_gather(xn, an, idx, impl=impl)
    check_outputs((out,), lambda *t: (R.attention_gather_fwd(*t),), (x, a, idx), dtype, "x_sel")
    grad = noncontig(randn(out.shape, g, dtype, dev))
    out.backward(grad)
    check_outputs((xn.grad, an.grad), R.attention_gather_bwd, (grad, x, a, idx), dtype, "(dx, da)",
                  scales=(1.0, math.sqrt(H * W)))


@pytest.mark.parametrize("impl", backend_params())
def test_gradcheck_float64(impl):
    dev, g = device_of(impl), gen(6)
    x = randn((2, 4, 2, 4), g, torch.float64, dev).requires_grad_()
    a = attention_values(2, 4, g, torch.float64, dev).requires_grad_()
    idx = rand_idx(4, 2, g, dev)
    assert torch.autograd.gradcheck(lambda x, a: attention_gather(x, a, idx, impl=impl), (x, a),
                                    fast_mode=impl == "triton")


@pytest.mark.parametrize("impl", backend_params())
def test_opcheck(impl):
    dev, g = device_of(impl), gen(7)
    x = randn((2, 8, 4, 4), g, torch.float32, dev).requires_grad_()
    a = attention_values(2, 8, g, torch.float32, dev).requires_grad_()
    torch.library.opcheck(_attention_gather, (x, a, rand_idx(8, 2, g, dev), impl))


@pytest.mark.parametrize("impl", backend_params())
def test_compile_fullgraph(impl):
    dev, g = device_of(impl), gen(8)
    x = randn((2, 8, 4, 4), g, torch.float32, dev)
    a = attention_values(2, 8, g, torch.float32, dev)
    idx = rand_idx(8, 3, g, dev)

    def f(x, a):
        return attention_gather(x * 2.0, a, idx, impl=impl).square()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    ins = [t.clone().requires_grad_() for t in (x, a)]
    compiled(*ins).sum().backward()
    ref = [t.clone().requires_grad_() for t in (x, a)]
    f(*ref).sum().backward()
    assert_close(compiled(x, a), f(x, a), torch.float32, "out")
    for p, q in zip(ins, ref):
        assert_close(p.grad, q.grad, torch.float32, "grad")


# ----------------------------------------------------------------------------- bad input

def test_bad_input_named():
    """The public op's checks (before any backend runs) name the op."""
    g = gen(9)
    x, a, idx = randn((2, 8, 4, 4), g), attention_values(2, 8, g), torch.tensor([5, 1])
    with pytest.raises(ValueError, match="adarts attention_gather: expected x of shape"):
        attention_gather(x[0], a, idx)
    with pytest.raises(ValueError, match="adarts attention_gather: expected a of shape"):
        attention_gather(x, a[:, :6], idx)
    with pytest.raises(TypeError, match="adarts attention_gather: dtype mismatch"):
        attention_gather(x, a.double(), idx)
    with pytest.raises(TypeError, match="adarts attention_gather: idx must be an int64"):
        attention_gather(x, a, idx.int())
    with pytest.raises(ValueError, match="adarts attention_gather: idx must have shape"):
        attention_gather(x, a, torch.arange(9))


@pytest.mark.parametrize("impl", backend_params(("reference", "cpp", "triton")))
@pytest.mark.parametrize("idx", [[0, 8], [-1], [3, 1, 3]], ids=("range", "negative", "repeat"))
def test_bad_idx_values_named(impl, idx):
    """Index values are checked where the data lives (on CPU here: Python for the reference
    and Triton, the C++ kernel for cpp); the message names the op either way."""
    g = gen(9)
    x, a = randn((2, 8, 4, 4), g), attention_values(2, 8, g)
    with pytest.raises((ValueError, RuntimeError), match="adarts attention_gather: idx"):
        attention_gather(x, a, torch.tensor(idx), impl=impl)


def refusal_args(dev):
    g = gen(16)
    B, C, H, W, n = 2, 8, 4, 6, 2
    return SimpleNamespace(x=randn((B, C, H, W), g, device=dev), a=attention_values(B, C, g, device=dev),
                           idx=torch.tensor([5, 1], device=dev), gsel=randn((B, n, H, W), g, device=dev),
                           gout=randn((B, C, H, W), g, device=dev))


def _fwd(impl):
    return entry(impl, "attention_gather_fwd")


def _bwd(impl):
    return entry(impl, "attention_gather_bwd")


CPP = [  # (id, words in the message, call(impl, args))
    ("rank", "4-d", lambda i, d: _fwd(i)(d.x[0], d.a, d.idx)),
    ("a-shape", "shape", lambda i, d: _fwd(i)(d.x, d.a[:, :6].contiguous(), d.idx)),
    ("a-rank", "shape", lambda i, d: _fwd(i)(d.x, d.a[0], d.idx)),
    ("idx-range", "out of range", lambda i, d: _fwd(i)(d.x, d.a, torch.tensor([1, 8]))),
    ("idx-negative", "out of range", lambda i, d: _fwd(i)(d.x, d.a, torch.tensor([-1]))),
    ("idx-repeat", "repeat", lambda i, d: _fwd(i)(d.x, d.a, torch.tensor([3, 1, 3]))),
    ("idx-dtype", "int64", lambda i, d: _fwd(i)(d.x, d.a, d.idx.int())),
    ("idx-rank", "1-d", lambda i, d: _fwd(i)(d.x, d.a, d.idx[None])),
    ("idx-too-many", "more than", lambda i, d: _fwd(i)(d.x, d.a, torch.arange(9))),
    ("dtype", "dtype", lambda i, d: _fwd(i)(d.x, d.a.double(), d.idx)),
    ("x-int", "floating", lambda i, d: _fwd(i)(d.x.int(), d.a.int(), d.idx)),
    ("noncontig", "contiguous", lambda i, d: _fwd(i)(d.x.transpose(2, 3), d.a, d.idx)),
    ("noncontig-a", "contiguous", lambda i, d: _fwd(i)(d.x, d.a.t().contiguous().t(), d.idx)),
    ("bwd-grad-shape", "shape", lambda i, d: _bwd(i)(d.gout, d.x, d.a, d.idx)),
    ("bwd-grad-dtype", "dtype", lambda i, d: _bwd(i)(d.gsel.double(), d.x, d.a, d.idx)),
]
CUDA = [
    ("a-device", "", lambda i, d: _fwd(i)(d.x, d.a.cpu(), d.idx)),
    ("noncontig", "contiguous", lambda i, d: _fwd(i)(d.x.transpose(2, 3), d.a, d.idx)),
    ("dtype", "dtype", lambda i, d: _fwd(i)(d.x, d.a.double(), d.idx)),
    ("idx-dtype", "int64", lambda i, d: _fwd(i)(d.x, d.a, d.idx.int())),
]
TRITON = [  # the launchers raise ValueError naming the launcher
    ("a-shape", "attention_gather_fwd", lambda i, d: _fwd(i)(d.x, d.a[:, :3], d.idx)),
    ("bwd-grad-channels", "attention_gather_bwd",
     lambda i, d: _bwd(i)(torch.randn(2, 3, 4, 6, device=d.x.device), d.x, d.a, d.idx)),
]
REFUSALS = backend_cases([("cpp", c[0], RuntimeError, "adarts attention_gather:", c[1], c[2]) for c in CPP]
                         + [("cuda", c[0], RuntimeError, "adarts attention_gather", c[1], c[2]) for c in CUDA]
                         + [("triton", c[0], ValueError, c[1], "", c[2]) for c in TRITON])


@pytest.mark.parametrize("impl,exc,op,words,call", REFUSALS)
def test_entry_refusals(impl, exc, op, words, call):
    """Each backend's entry point refuses bad arguments with a message naming the op."""
    assert_refused(exc, op, words, lambda: call(impl, refusal_args(device_of(impl))))


# ----------------------------------------------------------------------------- one backend only

GATHER_SHAPES = [  # B, C, H, W, n
    (2, 5, 4, 4, 3),      # small planes (one warp per plane), vectorised
    (3, 7, 5, 3, 7),      # odd plane (scalar path), every channel selected
    (2, 3, 40, 40, 2),    # one block per plane
    (1, 4, 70, 61, 2),    # large odd plane: several tiles per plane in the forward
    (2, 16, 32, 32, 16),
]


@pytest.mark.parametrize("impl", backend_params(("cuda",)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", GATHER_SHAPES, ids=str)
@pytest.mark.parametrize("layout", ("contiguous", "misaligned"))
def test_cuda_planes_and_alignment(impl, dtype, shape, layout):
    """The CUDA kernels' paths: vectorised and scalar, one warp / one block / several tiles
    per plane, misaligned storage."""
    B, C, H, W, n = shape
    g = gen(hash(shape) % 1000)
    x = randn((B, C, H, W), g, dtype, "cuda")
    a = attention_values(B, C, g, dtype, "cuda")
    idx = rand_idx(C, n, g, "cuda")
    check_entry(impl, x, a, idx, randn((B, n, H, W), g, dtype, "cuda"), dtype, layout)


@pytest.mark.parametrize("impl", backend_params(("triton",)))
def test_triton_multi_tile_all_channels(impl):
    """A 40x30 plane is two tiles of the Triton kernels; every channel selected."""
    dev, g = device_of(impl), gen(5)
    x, a = randn((1, 3, 40, 30), g, device=dev), attention_values(1, 3, g, device=dev)
    check_entry(impl, x, a, torch.tensor([2, 0, 1], device=dev), randn((1, 3, 40, 30), g, device=dev),
                torch.float32)


# ----------------------------------------------------------------------------- nothing silent

def test_missing_tensors_named():
    g = gen(37)
    x, a, idx = randn((2, 8, 4, 4), g), attention_values(2, 8, g), torch.tensor([5, 1])
    with pytest.raises(TypeError, match="adarts attention_gather: x must be a tensor, got NoneType"):
        attention_gather(None, a, idx)
    with pytest.raises(TypeError, match="adarts attention_gather: a must be a tensor, got NoneType"):
        attention_gather(x, None, idx)
    with pytest.raises(TypeError, match="adarts attention_gather: idx must be an int64 tensor, got NoneType"):
        attention_gather(x, a, None)


@pytest.mark.parametrize("impl", backend_params())
def test_double_backward_refused_by_name(impl):
    dev, g = device_of(impl), gen(38)
    x = randn((2, 4, 3, 3), g, torch.float64, dev).requires_grad_()
    a = attention_values(2, 4, g, torch.float64, dev).requires_grad_()
    out = attention_gather(x, a, rand_idx(4, 2, g, dev), impl=impl)
    ga = torch.autograd.grad((out * out).sum(), a, create_graph=True)[0]
    assert ga.shape == a.shape and torch.isfinite(ga).all()
    with pytest.raises(RuntimeError, match="adarts attention_gather: double backward is not supported"):
        ga.sum().backward()
