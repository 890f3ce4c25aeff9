"""adarts::mixed_sum on every backend against the plain-PyTorch reference.

The op is ``y = pool_weights[0] * BN(maxpool x) + pool_weights[1] * BN(avgpool x)
+ sum_i z_weights[i] * BN(z[i]) (+ identity_weight * x)`` with any number ``P`` of ``z``
inputs from 0 to ``MAX_Z``. The kernels are called directly (``torch.ops.adarts_C`` for
``cpp`` / ``cuda``, the Triton launchers for ``triton``) and through the public op with
autograd. Interpreted Triton (CPU) gets tiny shapes.
"""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import (DTYPES, LOW, TOL, assert_close, assert_low_precision, backend_params, device_of, gen,
                     misaligned, noncontig, poison_heap, randn, upcast)

from adarts_kernels.ops import mixed_sum
from adarts_kernels.ops import reference as R
from adarts_kernels.ops.mixed_sum import MAX_Z, _mixed_sum

EPS = 1e-5
IMPLS = backend_params()
KERNELS = ("cpp", "triton", "cuda")

# (stride, P, identity): the search-space edges (4 convolutions + identity at stride 1,
# FactorizedReduce + 4 convolutions at stride 2), and P = 0, 1, 5 at both strides with and
# without the identity at stride 1.
CONFIGS = [(1, 4, True), (2, 5, False), (1, 0, True), (1, 0, False), (1, 1, True), (1, 5, True), (1, 4, False),
           (2, 0, False), (2, 1, False)]

# (B, n, H, W) per backend and stride: odd sizes, H and W not multiples of 3, single rows /
# columns, B = 1, n = 1; larger planes on CUDA; tiny ones for interpreted Triton.
SHAPES = {
    "cpp": {1: [(2, 3, 7, 5), (3, 2, 4, 8), (1, 2, 1, 4), (2, 1, 5, 1), (1, 1, 1, 1)],
            2: [(2, 3, 8, 10), (3, 2, 2, 4), (1, 2, 14, 2), (2, 1, 2, 2)]},
    "triton": {1: [(2, 3, 5, 7)], 2: [(2, 3, 6, 8)]},
    "cuda": {1: [(2, 3, 7, 5), (3, 2, 4, 8), (2, 4, 20, 23), (1, 3, 37, 29), (2, 1, 1, 1), (40, 6, 3, 2)],
             2: [(2, 3, 8, 10), (3, 2, 2, 4), (2, 4, 40, 36), (1, 2, 70, 62), (40, 6, 4, 2)]},
}


def params(impls, extra):
    """``backend_params(impls)`` crossed with ``extra(impl)``: a list of tuples per backend."""
    out = []
    for p in backend_params(impls):
        impl = p.values[0]
        for e in extra(impl):
            out.append(pytest.param(impl, *e, marks=p.marks, id=f"{impl}-" + "-".join(map(str, e))))
    return out


def stats_dtype(dtype):
    return torch.float32 if dtype in LOW else dtype


def interpreted(impl):
    return impl == "triton" and device_of(impl) == "cpu"


def kernel_fwd(impl):
    if impl in ("cpp", "cuda"):
        return torch.ops.adarts_C.mixed_sum_fwd
    if impl == "triton":
        from adarts_kernels.triton.mixed_sum import mixed_sum_fwd
        return mixed_sum_fwd
    return R.mixed_sum_fwd


def kernel_bwd(impl):
    if impl in ("cpp", "cuda"):
        return torch.ops.adarts_C.mixed_sum_bwd
    if impl == "triton":
        from adarts_kernels.triton.mixed_sum import mixed_sum_bwd
        return mixed_sum_bwd
    return R.mixed_sum_bwd


class Case:
    """Fresh inputs: ``z`` (``P`` tensors of different scales and offsets), ``x``, the weights
    (a softmaxed row split into pools, z and identity), running statistics ``(P + 2, n)`` in
    the statistics dtype and an output gradient."""

    def __init__(self, B, n, H, W, stride=1, P=None, identity=None, dtype=torch.float32, device="cpu", seed=0,
                 ties=False, x=None):
        g = gen(seed)
        P = (4 if stride == 1 else 5) if P is None else P
        identity = stride == 1 if identity is None else identity
        self.stride, self.P = stride, P
        Ho, Wo = H // stride, W // stride
        if x is not None:
            self.x = x.to(device=device, dtype=dtype)
        elif ties:  # few distinct values: many equal maxima in every 3x3 window
            self.x = torch.randint(-1, 2, (B, n, H, W), generator=g).to(device=device, dtype=dtype)
        else:
            self.x = randn((B, n, H, W), g, dtype, device)
        self.z = [(randn((B, n, Ho, Wo), g, torch.float64) * (1 + 0.5 * i) + 0.3 * i).to(device=device, dtype=dtype)
                  for i in range(P)]
        w = torch.softmax(randn((P + 3,), g, torch.float64), 0).to(device=device, dtype=dtype)
        self.pool_weights, self.z_weights = w[:2].clone(), w[2:2 + P].clone()
        self.identity_weight = w[2 + P].clone() if identity else None
        sd = stats_dtype(dtype)
        self.run_mean = (randn((P + 2, n), g, torch.float64) * 0.3).to(device=device, dtype=sd)
        self.run_var = (torch.rand(P + 2, n, generator=g, dtype=torch.float64) + 0.5).to(device=device, dtype=sd)
        self.grad = randn((B, n, Ho, Wo), g, dtype, device)

    def weights(self):
        return self.z_weights, self.pool_weights, self.identity_weight

    def running(self, training):
        return (None, None) if training else (self.run_mean, self.run_var)


def close(actual, expected, dtype, what, scale=1.0, equal_nan=False):
    """:func:`helpers.assert_close` with ``atol`` times ``scale`` (sums over many elements)."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, \
        (what, actual.shape, expected.shape, actual.dtype, expected.dtype)
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(actual.cpu(), expected.cpu(), rtol=rtol, atol=atol * scale, equal_nan=equal_nan,
                               msg=lambda m: f"{what}: {m}")


def flat_bwd(out):
    dz, *rest = out
    return (*dz, *rest)


def check_kernels(impl, c, training, dtype):
    """Forward and backward of the backend's kernels against the reference on the same inputs
    (the backward from the reference's statistics); every output buffer poisoned first."""
    rm, rv = c.running(training)
    args = (c.z, c.x, *c.weights(), c.stride, EPS, rm, rv)
    poison_heap(c.x, *c.z)
    ours = tuple(kernel_fwd(impl)(*args))
    ref = R.mixed_sum_fwd(*args)
    assert ours[0].dtype == dtype and ours[1].dtype == ours[2].dtype == stats_dtype(dtype)
    mean, var = ref[1], ref[2]
    bargs = (c.grad, c.z, c.x, *c.weights(), mean, var, c.stride, EPS, training)
    poison_heap(c.x, *c.z)
    bwd = kernel_bwd(impl)(*bargs)
    dz = bwd[0]
    assert isinstance(dz, (list, tuple)) and len(dz) == c.P
    assert all(t.is_contiguous() for t in dz)
    ours_b = flat_bwd(bwd)
    ref_b = flat_bwd(R.mixed_sum_bwd(*bargs))
    names = ["y", "mean", "var"] + [f"dz[{i}]" for i in range(c.P)] + ["dx", "dz_weights", "dpool_weights",
                                                                        "didentity_weight"]
    assert ours_b[-1].shape == () and ours_b[-3].shape == (c.P,) and ours_b[-2].shape == (2,)
    if c.identity_weight is None:
        assert ours_b[-1].item() == 0.0
    if dtype in LOW:
        assert_low_precision(ours, ref, R.mixed_sum_fwd(*upcast(list(args))), dtype, "fwd")
        assert_low_precision(ours_b, ref_b, flat_bwd(R.mixed_sum_bwd(*upcast(list(bargs)))), dtype, "bwd")
        return
    n_out = max(c.grad.numel(), 1)
    for name, o, r in zip(names, ours + ours_b, ref + ref_b):
        scale = math.sqrt(n_out) if name.startswith("d") and "weight" in name else \
            max(1.0, r.abs().max().item() if r.numel() else 1.0)
        close(o, r, dtype, name, scale)


# ----------------------------------------------------------------------------- kernels vs reference

def _shape_cases(impl):
    return [(s, shape) for s in (1, 2) for shape in SHAPES[impl][s]]


@pytest.mark.parametrize("training", (True, False), ids=("train", "eval"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("impl,stride,shape", params(KERNELS, _shape_cases))
def test_kernels_match_reference(impl, stride, shape, dtype, training):
    c = Case(*shape, stride=stride, dtype=dtype, device=device_of(impl), seed=20 + sum(shape) + 7 * stride)
    check_kernels(impl, c, training, dtype)


def _config_cases(impl):
    return CONFIGS


@pytest.mark.parametrize("training", (True, False), ids=("train", "eval"))
@pytest.mark.parametrize("impl,stride,P,identity", params(KERNELS, _config_cases))
def test_kernels_any_number_of_inputs(impl, stride, P, identity, training):
    """P = 0 (pools and identity only) to MAX_Z, with and without the identity term."""
    H, W = (5, 6) if stride == 1 else (6, 4)
    c = Case(2, 3, H, W, stride=stride, P=P, identity=identity, dtype=torch.float64, device=device_of(impl),
             seed=P + 10 * stride)
    check_kernels(impl, c, training, torch.float64)


def _tie_cases(impl):
    return [(s, dt) for s in (1, 2) for dt in ("float64", "float32")]


@pytest.mark.parametrize("impl,stride,dtype", params(KERNELS, _tie_cases))
def test_max_pool_ties_route_like_reference(impl, stride, dtype):
    """x in {-1, 0, 1} (most 3x3 windows hold several equal maxima), a constant plane and a
    plateau: the max-pool gradient goes to the first maximum of each window in row-major
    order, exactly where the reference routes it."""
    dtype = getattr(torch, dtype)
    dev = device_of(impl)
    B, n, H, W = 2, 3, 6, 8
    x = torch.randint(-1, 2, (B, n, H, W), generator=gen(13)).double()
    x[0, 1] = 2.0                                   # every window of the plane ties
    x[1, 2, 1:4, 2:6] = 5.0                         # a plateau spanning several windows
    c = Case(B, n, H, W, stride=stride, dtype=dtype, device=dev, seed=22 + stride, x=x)
    for training in (True, False):
        check_kernels(impl, c, training, dtype)
    # the max-pool term alone (eval: du_0 = r_0 * g): dx is nonzero exactly at the routed positions
    zw = torch.zeros_like(c.z_weights)
    pw = torch.tensor([1.0, 0.0], dtype=dtype, device=dev)
    args = (c.grad, c.z, c.x, zw, pw, None, c.run_mean, c.run_var, stride, EPS, False)
    dx = kernel_bwd(impl)(*args)[1]
    dx_r = R.mixed_sum_bwd(*args)[1]
    assert torch.equal(dx.cpu() != 0, dx_r.cpu() != 0)
    close(dx, dx_r, dtype, "dx")
    assert dx[0, 1].flatten().count_nonzero() < H * W     # a tied plane routes to few positions


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")   # inf - inf in the interpreter
@pytest.mark.parametrize("impl,stride", params(KERNELS, lambda impl: [(1,), (2,)]))
def test_eval_nan_and_inf_windows(impl, stride):
    """Eval mode (finite gradients whatever x holds): a NaN wins its windows (the last NaN
    scanned), an all ``-inf`` window keeps its first in-bounds element; y propagates both."""
    H, W = (5, 7) if stride == 1 else (6, 8)
    x = torch.randn(2, 3, H, W, generator=gen(15), dtype=torch.float64)
    x[0, 0, 1, 1] = x[0, 0, 2, 2] = float("nan")
    x[1, 0, 0, 0] = x[1, 0, 1, 1] = float("nan")
    x[1, 1, 0:4, 0:4] = float("-inf")
    x[1, 2, 2, 3] = float("inf")
    c = Case(2, 3, H, W, stride=stride, dtype=torch.float64, device=device_of(impl), seed=15, x=x)
    args = (c.z, c.x, *c.weights(), stride, EPS, c.run_mean, c.run_var)
    y = kernel_fwd(impl)(*args)[0]
    close(y, R.mixed_sum_fwd(*args)[0], torch.float64, "y", equal_nan=True)
    bargs = (c.grad, c.z, c.x, *c.weights(), c.run_mean, c.run_var, stride, EPS, False)
    ours, ref = flat_bwd(kernel_bwd(impl)(*bargs)), flat_bwd(R.mixed_sum_bwd(*bargs))
    dx = ours[c.P]
    assert torch.isfinite(dx).all()
    for i, (o, r) in enumerate(zip(ours, ref)):
        close(o, r, torch.float64, f"bwd[{i}]", scale=10.0, equal_nan=True)


@pytest.mark.filterwarnings("ignore:var_mean:UserWarning")
@pytest.mark.parametrize("impl,stride", params(KERNELS, lambda impl: [(1,), (2,)]))
def test_empty_batch(impl, stride):
    """B = 0: NaN batch statistics (as torch.var_mean of nothing), empty outputs, zero weight gradients."""
    c = Case(0, 3, 4, 6, stride=stride, dtype=torch.float32, device=device_of(impl), seed=3)
    for training in (True, False):
        rm, rv = c.running(training)
        ours = kernel_fwd(impl)(c.z, c.x, *c.weights(), stride, EPS, rm, rv)
        ref = R.mixed_sum_fwd(c.z, c.x, *c.weights(), stride, EPS, rm, rv)
        for o, r in zip(ours, ref):
            close(o, r, torch.float32, "fwd", equal_nan=True)
        bargs = (c.grad, c.z, c.x, *c.weights(), c.run_mean, c.run_var, stride, EPS, training)
        for o, r in zip(flat_bwd(kernel_bwd(impl)(*bargs)), flat_bwd(R.mixed_sum_bwd(*bargs))):
            close(o, r, torch.float32, "bwd")


@pytest.mark.parametrize("impl,dtype", params(KERNELS, lambda impl: [("float16",), ("bfloat16",)]))
def test_low_precision_running_stats(impl, dtype):
    """Running statistics in x's (half) dtype are taken in float32, as the reference does."""
    dtype = getattr(torch, dtype)
    c = Case(2, 3, 5, 4, dtype=dtype, device=device_of(impl), seed=26)
    args = (c.z, c.x, *c.weights(), 1, EPS, c.run_mean.to(dtype), c.run_var.to(dtype))
    ours, ref = kernel_fwd(impl)(*args), R.mixed_sum_fwd(*args)
    assert ours[1].dtype == ref[1].dtype == torch.float32
    torch.testing.assert_close(ours[1], ref[1], rtol=0, atol=0)
    torch.testing.assert_close(ours[2], ref[2], rtol=0, atol=0)
    if impl == "cpp":   # the same float operations in the same order
        torch.testing.assert_close(ours[0], ref[0], rtol=0, atol=0)
    else:
        assert_close(ours[0], ref[0], dtype, "y")


@pytest.mark.parametrize("impl", backend_params(("cpp", "cuda")))
def test_deterministic(impl):
    """No atomics, reductions in a fixed order (several at::parallel_for chunks on the CPU):
    two runs give identical bits."""
    shape = (4, 8, 16, 16) if impl == "cpp" else (8, 16, 16, 16)
    for stride in (1, 2):
        c = Case(*shape, stride=stride, device=device_of(impl), seed=30 + stride)
        args = (c.z, c.x, *c.weights(), stride, EPS, None, None)
        f1, f2 = kernel_fwd(impl)(*args), kernel_fwd(impl)(*args)
        for t1, t2 in zip(f1, f2):
            assert torch.equal(t1, t2)
        bargs = (c.grad, c.z, c.x, *c.weights(), f1[1], f1[2], stride, EPS, True)
        b1, b2 = flat_bwd(kernel_bwd(impl)(*bargs)), flat_bwd(kernel_bwd(impl)(*bargs))
        ref = flat_bwd(R.mixed_sum_bwd(*bargs))
        for t1, t2, e in zip(b1, b2, ref):
            assert torch.equal(t1, t2)
            close(t1, e, torch.float32, "bwd", scale=math.sqrt(c.grad.numel()))


@pytest.mark.parametrize("impl", backend_params(("cpp", "cuda")))
def test_misaligned_inputs(impl):
    """Storage offset of one element (no vectorised path applies), forward and backward."""
    dev = device_of(impl)
    for stride in (1, 2):
        c = Case(2, 3, 8, 10, stride=stride, device=dev, seed=35 + stride)
        c.x, c.grad = misaligned(c.x), misaligned(c.grad)
        c.z = [misaligned(t) for t in c.z]
        for training in (True, False):
            check_kernels(impl, c, training, torch.float32)


# ----------------------------------------------------------------------------- the public op

def composition(z, x, z_weights, pool_weights, identity_weight, stride, bns):
    """The plain-module composition the op folds: pools + BN modules + weighted sum, in the op's order."""
    us = [F.max_pool2d(x, 3, stride, 1), F.avg_pool2d(x, 3, stride, 1, count_include_pad=False)] + list(z)
    ws = [pool_weights[0], pool_weights[1]] + [z_weights[i] for i in range(len(z))]
    y = None
    for w, u, bn in zip(ws, us, bns):
        y = w * bn(u) if y is None else y + w * bn(u)
    if identity_weight is not None:
        y = y + identity_weight * x
    return y


def _leaves(c):
    ts = [*c.z, c.x, c.z_weights, c.pool_weights] + ([c.identity_weight] if c.identity_weight is not None else [])
    return [t.detach().clone().requires_grad_() for t in ts]


def _split(c, ts):
    """``(z, x, z_weights, pool_weights, identity_weight)`` from the flat list of :func:`_leaves`."""
    P = c.P
    return list(ts[:P]), ts[P], ts[P + 1], ts[P + 2], (ts[P + 3] if len(ts) > P + 3 else None)


@pytest.mark.parametrize("training", (True, False), ids=("train", "eval"))
@pytest.mark.parametrize("impl,stride,P,identity", params(("reference",) + KERNELS, _config_cases))
def test_matches_batchnorm_modules(impl, stride, P, identity, training):
    """Forward, autograd gradients and the running-statistics update against nn.BatchNorm2d
    modules, for every number of inputs, with and without the identity."""
    dev = device_of(impl)
    H, W = (6, 8) if not interpreted(impl) else (4, 6)
    c = Case(2, 3, H, W, stride=stride, P=P, identity=identity, device=dev, seed=stride + 2 * training + 3 * P)
    bns = [nn.BatchNorm2d(3, affine=False).to(dev) for _ in range(P + 2)]
    for bn in bns:                       # non-trivial running statistics for eval mode
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.train(training)
    rm = torch.stack([bn.running_mean.clone() for bn in bns])
    rv = torch.stack([bn.running_var.clone() for bn in bns])
    ins_ref, ins = _leaves(c), _leaves(c)
    y_ref = composition(*_split(c, ins_ref), stride, bns)
    if training:
        y, mean, var = mixed_sum(*_split(c, ins), stride, impl=impl)
        N = y.numel() // y.shape[1]
        for q, bn in enumerate(bns):     # the statistics returned move running statistics as BN does
            torch.testing.assert_close(0.9 * rm[q] + 0.1 * mean[q], bn.running_mean, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(0.9 * rv[q] + 0.1 * var[q] * N / (N - 1), bn.running_var, rtol=1e-5,
                                       atol=1e-6)
    else:
        y, mean, var = mixed_sum(*_split(c, ins), stride, run_mean=rm, run_var=rv, impl=impl)
        torch.testing.assert_close(mean, rm)
    assert mean.shape == var.shape == (P + 2, 3)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    g = noncontig(c.grad)                # the gradient arriving non-contiguous
    y.backward(g)
    y_ref.backward(g)
    for a, b in zip(ins, ins_ref):
        assert a.grad is not None and a.grad.shape == a.shape
        expected = b.grad if b.grad is not None else torch.zeros_like(b)   # z_weights of P = 0: unused
        torch.testing.assert_close(a.grad, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("training", (True, False), ids=("train", "eval"))
@pytest.mark.parametrize("impl,stride", params(("reference",) + KERNELS, lambda impl: [(1,), (2,)]))
def test_gradcheck_float64(impl, stride, training):
    """The backward (the batch statistics' terms included in training) is the gradient of
    the forward. Interpreted Triton: a smaller problem and gradcheck's fast mode."""
    fast = interpreted(impl)
    shape = (1, 2, 4, 4) if fast else (2, 2, 4, 6)
    c = Case(*shape, stride=stride, dtype=torch.float64, device=device_of(impl), seed=29 + stride)
    rm, rv = c.running(training)
    ins = _leaves(c)

    def f(*ts):
        return mixed_sum(*_split(c, ts), stride, EPS, rm, rv, impl=impl)[0]

    assert torch.autograd.gradcheck(f, ins, eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=fast)


@pytest.mark.parametrize("training", (True, False), ids=("train", "eval"))
@pytest.mark.parametrize("impl,stride", params(KERNELS, lambda impl: [(1,), (2,)]))
def test_noncontiguous_inputs_and_gradients(impl, stride, training):
    """Non-contiguous z, x, weights and running statistics, and a non-contiguous incoming
    gradient: outputs and autograd gradients as impl="reference" on contiguous copies."""
    dev = device_of(impl)
    shape = (2, 3, 6, 4) if interpreted(impl) else (4, 6, 8, 10)
    c = Case(*shape, stride=stride, device=dev, seed=27 + stride)
    rm, rv = c.running(training)
    results = {}
    for name in (impl, "reference"):
        ins = _leaves(c)
        z, x, zw, pw, iw = _split(c, ins)
        if name == impl:
            z = [noncontig(t) for t in z]
            x, zw, pw = noncontig(x), noncontig(zw), noncontig(pw)
            assert not x.is_contiguous() and not zw.is_contiguous() and not z[0].is_contiguous()
            if rm is not None:
                rm, rv = rm.t().contiguous().t(), noncontig(rv)
        y, mean, var = mixed_sum(z, x, zw, pw, iw, stride, EPS, rm, rv, impl=name)
        y.backward(noncontig(c.grad))
        results[name] = (y.detach(), mean, var) + tuple(t.grad for t in ins)
    for i, (o, r) in enumerate(zip(results[impl], results["reference"])):
        assert o.dtype == r.dtype and o.shape == r.shape
        torch.testing.assert_close(o, r, rtol=1e-4, atol=1e-4, msg=lambda m, i=i: f"output {i}: {m}")


@pytest.mark.parametrize("impl", IMPLS)
def test_opcheck(impl):
    dev = device_of(impl)
    for stride, P, identity in ((1, 4, True), (2, 5, False), (1, 0, False), (2, 1, False)):
        c = Case(2, 2, 4, 4, stride=stride, P=P, identity=identity, device=dev, seed=5)
        ins = _leaves(c)
        z, x, zw, pw, iw = _split(c, ins)
        torch.library.opcheck(_mixed_sum, (z, x, zw, pw, iw, stride, EPS, None, None, impl))
        torch.library.opcheck(_mixed_sum, (z, x, zw, pw, iw, stride, EPS, c.run_mean, c.run_var, impl))


@pytest.mark.parametrize("identity", (True, False), ids=("identity", "no-identity"))
def test_compile_fullgraph(identity):
    c = Case(2, 2, 4, 4, identity=identity, seed=6)

    def f(*ts):
        y, mean, _ = mixed_sum(*_split(c, ts), 1)
        return (y * y).sum() + mean.sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    a, b = _leaves(c), _leaves(c)
    compiled(*a).backward()
    f(*b).backward()
    for p, q in zip(a, b):
        torch.testing.assert_close(p.grad, q.grad)


def test_saves_bn_inputs_and_stats_only():
    from adarts_kernels.profiling import saved_activation_bytes
    c = Case(4, 4, 8, 8, seed=7)
    z = [t.requires_grad_() for t in c.z]
    x = c.x.requires_grad_()
    w = torch.rand(8, generator=gen(8)).requires_grad_()

    def run():
        ws = w * 1.0           # one row of 8 weights, sliced by the caller as the fused edge does
        return mixed_sum([t * 1.0 for t in z], x * 1.0, ws[4:8], ws[1:3], ws[3], 1, impl="reference")

    nbytes = saved_activation_bytes(run)
    # the z list and x (non-leaf activations), the weights' row (8 floats), mean and var (Q=6 rows of 4 channels)
    assert nbytes == 5 * x.numel() * 4 + 8 * 4 + 2 * 6 * 4 * 4


def test_bad_arguments_named():
    c = Case(2, 2, 4, 4, seed=1)
    z, x, (zw, pw, iw) = c.z, c.x, c.weights()
    with pytest.raises(ValueError, match=r"mixed_sum: expected z_weights of shape \(P,\)=\(3,\)"):
        mixed_sum(z[:3], x, zw, pw, iw, 1)
    with pytest.raises(ValueError, match=r"expected z\[1\] of shape"):
        mixed_sum([z[0], z[1][:, :1], z[2], z[3]], x, zw, pw, iw, 1)
    with pytest.raises(TypeError, match="dtype mismatch"):
        mixed_sum(z, x.double(), zw, pw, iw, 1)
    with pytest.raises(TypeError, match="dtype mismatch"):
        mixed_sum(z, x, zw, pw, iw.double(), 1)
    with pytest.raises(ValueError, match="expected pool_weights of shape"):
        mixed_sum(z, x, zw, torch.cat([pw, pw]), iw, 1)
    with pytest.raises(ValueError, match="identity_weight as a 0-dim tensor"):
        mixed_sum(z, x, zw, pw, iw.reshape(1), 1)
    with pytest.raises(ValueError, match="both run_mean and run_var"):
        mixed_sum(z, x, zw, pw, iw, 1, run_mean=torch.zeros(6, 2))
    with pytest.raises(ValueError, match=r"expected run_mean of shape \(Q, n\)"):
        mixed_sum(z, x, zw, pw, iw, 1, run_mean=torch.zeros(5, 2), run_var=torch.ones(5, 2))
    z2 = [t[:, :, :2, :2] for t in z]
    with pytest.raises(ValueError, match="stride 2 needs even H and W"):
        mixed_sum(z2, torch.randn(2, 2, 5, 4), zw, pw, None, 2)
    with pytest.raises(ValueError, match="identity_weight must be None at stride 2"):
        mixed_sum(z2, x, zw, pw, iw, 2)
    too_many = [z[0]] * (MAX_Z + 1)
    with pytest.raises(ValueError, match=f"more than MAX_Z={MAX_Z}"):
        mixed_sum(too_many, x, torch.ones(MAX_Z + 1), pw, iw, 1)
    with pytest.raises(TypeError, match="must be a list"):
        mixed_sum(z[0], x, zw, pw, iw, 1)
    with pytest.raises(ValueError, match="stride must be 1 or 2"):
        mixed_sum(z, x, zw, pw, iw, 3)


# ----------------------------------------------------------------------------- kernel refusals

def _refusals(dev):
    """(id, words expected after "adarts mixed_sum:", call) for the compiled ops on ``dev``."""
    o = torch.ops.adarts_C
    c = Case(2, 3, 4, 6, device=dev, seed=32)
    c2 = Case(2, 3, 4, 6, stride=2, device=dev, seed=33)
    z, x, (zw, pw, iw), rm, rv = c.z, c.x, c.weights(), c.run_mean, c.run_var
    z2, x2, zw2, pw2 = c2.z, c2.x, c2.z_weights, c2.pool_weights
    g = c.grad
    odd = torch.randn(2, 3, 5, 6, device=dev)
    e = EPS

    def fwd(z, x, zw, pw, iw, stride=1, eps=e, rm=None, rv=None):
        return lambda: o.mixed_sum_fwd(z, x, zw, pw, iw, stride, eps, rm, rv)

    def bwd(g, z, x, zw, pw, iw, mean, var, stride=1, training=True):
        return lambda: o.mixed_sum_bwd(g, z, x, zw, pw, iw, mean, var, stride, e, training)

    cases = [
        ("stride3", "stride", fwd(z, x, zw, pw, iw, 3)),
        ("z-too-many", f"at most {MAX_Z}", fwd(z + z[:2], x, torch.ones(6, device=dev), pw, iw)),
        ("z-too-many-bwd", f"at most {MAX_Z}", bwd(g, z + z[:2], x, torch.ones(6, device=dev), pw, iw, rm, rv)),
        ("zw-count", "z_weights must have shape (P,) = (3,)", fwd(z[:3], x, zw, pw, iw)),
        ("zw-count-bwd", "z_weights must have shape", bwd(g, z + z[:1], x, zw, pw, iw, rm, rv)),
        ("pw-shape", "pool_weights must have shape (2,)", fwd(z, x, zw, pw[:1].contiguous(), iw)),
        ("iw-stride2", "identity_weight must be absent at stride 2", fwd(z2, x2, zw2, pw2, iw, 2)),
        ("iw-shape", "identity_weight must be a 0-dim tensor", fwd(z, x, zw, pw, iw.reshape(1))),
        ("iw-dtype", "dtype", fwd(z, x, zw, pw, iw.double())),
        ("odd-h-s2", "even", fwd(z2, odd, zw2, pw2, None, 2)),
        ("x-rank", "4-d", fwd(z, x[0], zw, pw, iw)),
        ("x-int", "floating", fwd([t.int() for t in z], x.int(), zw.int(), pw.int(), iw.int())),
        ("x-empty", "non-empty", fwd([t[:, :, :0] for t in z], x[:, :, :0], zw, pw, iw)),
        ("z-shape", "z[1] must have shape", fwd([z[0], z[1][:, :, :2].contiguous(), z[2], z[3]], x, zw, pw, iw)),
        ("z-shape-s2", "z[0] must have shape", fwd(z[:1] + z2[1:], x2, zw2, pw2, None, 2)),
        ("z-dtype", "dtype", fwd(z[:2] + [z[2].double()] + z[3:], x, zw, pw, iw)),
        ("z-noncontig", "contiguous", fwd(z[:3] + [z[3].transpose(2, 3).contiguous().transpose(2, 3)], x, zw, pw, iw)),
        ("zw-dtype", "dtype", fwd(z, x, zw.double(), pw, iw)),
        ("eps", "eps", fwd(z, x, zw, pw, iw, 1, 0.0)),
        ("run-mean-only", "both", fwd(z, x, zw, pw, iw, rm=rm)),
        ("run-var-only", "both", fwd(z, x, zw, pw, iw, rv=rv)),
        ("run-shape", "run_mean must have shape", fwd(z, x, zw, pw, iw, rm=c2.run_mean, rv=rv)),
        ("run-int", "floating", fwd(z, x, zw, pw, iw, rm=rm, rv=rv.int())),
        ("bwd-grad-shape", "grad", bwd(g[:, :, :2].contiguous(), z, x, zw, pw, iw, rm, rv)),
        ("bwd-grad-dtype", "dtype", bwd(g.double(), z, x, zw, pw, iw, rm, rv)),
        ("bwd-mean-dtype", "statistics dtype", bwd(g, z, x, zw, pw, iw, rm.double(), rv)),
        ("bwd-var-shape", "var must have shape", bwd(g, z, x, zw, pw, iw, rm, rv[:5], training=False)),
        ("bwd-stride2-z", "z[0] must have shape", bwd(g, z, x, zw, pw, None, rm, rv, stride=2)),
    ]
    if dev == "cuda":
        cases += [
            ("z-cpu", "z[1] must be a CUDA tensor", fwd([z[0], z[1].cpu(), z[2], z[3]], x, zw, pw, iw)),
            ("zw-cpu", "z_weights must be a CUDA tensor", fwd(z, x, zw.cpu(), pw, iw)),
            ("pw-cpu", "pool_weights must be a CUDA tensor", fwd(z, x, zw, pw.cpu(), iw)),
            ("iw-cpu", "identity_weight must be a CUDA tensor", fwd(z, x, zw, pw, iw.cpu())),
            ("run-cpu", "run_mean must be a CUDA tensor", fwd(z, x, zw, pw, iw, rm=rm.cpu(), rv=rv)),
            ("mean-cpu", "mean must be a CUDA tensor", bwd(g, z, x, zw, pw, iw, rm.cpu(), rv)),
        ]
    return cases


_REFUSAL_IDS = [r[0] for r in _refusals("cpu")] + ["z-cpu", "zw-cpu", "pw-cpu", "iw-cpu", "run-cpu", "mean-cpu"]


@pytest.mark.parametrize("name", _REFUSAL_IDS)
@pytest.mark.parametrize("impl", backend_params(("cpp", "cuda")))
def test_kernel_refusals(impl, name):
    cases = {r[0]: r[1:] for r in _refusals(device_of(impl))}
    if name not in cases:
        pytest.skip(f"{name} concerns CUDA tensors only")
    words, call = cases[name]
    with pytest.raises(RuntimeError) as info:
        call()
    msg = str(info.value)
    assert "adarts mixed_sum:" in msg and words in msg, (name, msg)


@pytest.mark.parametrize("impl", backend_params(("triton",)))
def test_triton_shape_errors_name_the_op(impl):
    from adarts_kernels.triton.mixed_sum import mixed_sum_bwd, mixed_sum_fwd
    dev = device_of(impl)
    c = Case(2, 3, 4, 4, device=dev, seed=40)
    z, x, (zw, pw, iw) = c.z, c.x, c.weights()
    with pytest.raises(ValueError, match="mixed_sum_fwd"):
        mixed_sum_fwd(z[:3], x, zw, pw, iw, 1, EPS, None, None)               # 3 z, 4 weights
    with pytest.raises(ValueError, match="mixed_sum_fwd"):
        mixed_sum_fwd(z, x, zw, pw, None, 2, EPS, None, None)                 # full-size z at stride 2
    with pytest.raises(ValueError, match="mixed_sum_fwd.*at most 5"):
        mixed_sum_fwd(z + z[:2], x, torch.ones(6, device=dev), pw, iw, 1, EPS, None, None)
    with pytest.raises(ValueError, match="mixed_sum_fwd.*pool_weights"):
        mixed_sum_fwd(z, x, zw, pw[:1], iw, 1, EPS, None, None)
    with pytest.raises(ValueError, match="mixed_sum_fwd.*identity_weight must be None at stride 2"):
        mixed_sum_fwd([t[:, :, :2, :2] for t in z], x, zw, pw, iw, 2, EPS, None, None)
    with pytest.raises(ValueError, match="mixed_sum_fwd"):
        mixed_sum_fwd(z, x, zw, pw, iw, 1, EPS, torch.zeros(5, 3, device=dev), torch.ones(5, 3, device=dev))
    with pytest.raises(ValueError, match="mixed_sum_bwd"):
        mixed_sum_bwd(x[:, :, :2], z, x, zw, pw, iw, c.run_mean, c.run_var, 1, EPS, True)
    x5 = torch.randn(2, 3, 5, 5, device=dev)
    z2 = [torch.randn(2, 3, 2, 2, device=dev) for _ in range(5)]
    with pytest.raises(ValueError, match="mixed_sum_bwd"):
        mixed_sum_bwd(z2[0], z2, x5, torch.ones(5, device=dev), pw, None, torch.zeros(7, 3, device=dev),
                      torch.ones(7, 3, device=dev), 2, EPS, True)


# ----------------------------------------------------------------------------- nothing silent

@pytest.mark.parametrize("impl", IMPLS)
def test_eval_statistics_in_the_accumulation_dtype_of_x(impl):
    """Eval mode with running buffers of another dtype than x: ``mean, var`` come back in x's
    accumulation dtype (float32 for float32 and half x, float64 for float64 x), as the
    reference and the fake say, on every backend; opcheck's fake-tensor test agrees."""
    dev = device_of(impl)
    for dtype, buffers in ((torch.float32, torch.float64), (torch.float64, torch.float32),
                           (torch.bfloat16, torch.float64)):
        c = Case(2, 2, 4, 4, dtype=dtype, device=dev, seed=41)
        rm, rv = c.run_mean.to(buffers), c.run_var.to(buffers)
        y, mean, var = mixed_sum(c.z, c.x, *c.weights(), 1, EPS, rm, rv, impl=impl)
        ref = R.mixed_sum_fwd(c.z, c.x, *c.weights(), 1, EPS, rm, rv)
        assert y.dtype == dtype and mean.dtype == var.dtype == stats_dtype(dtype) == ref[1].dtype
        torch.testing.assert_close(mean, ref[1], rtol=0, atol=0)
        torch.testing.assert_close(var, ref[2], rtol=0, atol=0)
        if dtype in LOW:
            assert_low_precision((y,), (ref[0],), (R.mixed_sum_fwd(*upcast([c.z, c.x, *c.weights()]), 1, EPS,
                                                                   rm, rv)[0],), dtype, "y")
        else:
            close(y, ref[0], dtype, "y")
        ins = _leaves(c)
        z, x, zw, pw, iw = _split(c, ins)
        torch.library.opcheck(_mixed_sum, (z, x, zw, pw, iw, 1, EPS, rm, rv, impl))


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")   # inf - inf in the interpreter
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("stride", (1, 2))
def test_training_statistics_of_infinities_follow_sum_over_n(impl, stride):
    """Training statistics of BN inputs holding infinities: ``mean = sum / N`` on every
    backend (the reference included; ``torch.var_mean`` alone gives NaN): ``-inf`` for a
    window of ``-inf`` through both pools, ``+inf`` for one ``+inf``, NaN for infinities
    of both signs or a NaN; ``var`` NaN there, finite values on a clean channel. The planes
    hold more than 1024 outputs, so a Triton lane meets an infinity and then finite values."""
    dev = device_of(impl)
    H = W = 36 * stride
    x = torch.randn(1, 4, H, W, generator=gen(43), dtype=torch.float64)
    x[0, 0, 10:13, 10:13] = float("-inf")        # a window of -inf: both pools give -inf
    x[0, 1, 0, 0] = float("inf")                 # first window: +inf, the rest finite
    x[0, 2, 5, 5], x[0, 2, 20, 20] = float("inf"), float("-inf")
    c = Case(1, 4, H, W, stride=stride, P=2, identity=False, dtype=torch.float64, device=dev, seed=43, x=x)
    c.z[0][0, 0, 0, 0] = float("inf")
    c.z[0][0, 1, 0, 1] = float("-inf")
    c.z[1][0, 2, 3, 3] = float("nan")
    args = (c.z, c.x, *c.weights(), stride, EPS, None, None)
    us = list(R.mixed_sum_pools(c.x.cpu(), stride)) + [t.cpu() for t in c.z]
    expected = torch.stack([u.sum(dim=(0, 2, 3)) / (u.numel() // u.shape[1]) for u in us])
    assert torch.isposinf(expected).any() and torch.isneginf(expected).any() and torch.isnan(expected).any()
    ref = R.mixed_sum_fwd(*args)
    torch.testing.assert_close(ref[1].cpu(), expected, rtol=1e-12, atol=0, equal_nan=True)
    y, mean, var = kernel_fwd(impl)(*args)
    torch.testing.assert_close(mean.cpu(), expected, rtol=1e-12, atol=0, equal_nan=True)
    assert torch.isnan(var[~torch.isfinite(mean)]).all()
    assert torch.isfinite(mean[:, 3]).all() and torch.isfinite(var[:, 3]).all()
    close(var, ref[2], torch.float64, "var", equal_nan=True)
    close(y, ref[0], torch.float64, "y", scale=10.0, equal_nan=True)


@pytest.mark.parametrize("impl", IMPLS)
def test_missing_tensors_and_empty_planes_named(impl):
    """``None`` for x or inside z: a TypeError naming the op and the argument (not an
    AttributeError from inside); H = 0 or W = 0: the op's own message on every backend."""
    c = Case(2, 2, 4, 4, device=device_of(impl), seed=44)
    z, x, (zw, pw, iw) = c.z, c.x, c.weights()
    with pytest.raises(TypeError, match=r"adarts mixed_sum: x must be a tensor, got NoneType"):
        mixed_sum(z, None, zw, pw, iw, 1, impl=impl)
    with pytest.raises(TypeError, match=r"adarts mixed_sum: z\[2\] must be a tensor, got NoneType"):
        mixed_sum([z[0], z[1], None, z[3]], x, zw, pw, iw, 1, impl=impl)
    with pytest.raises(TypeError, match=r"adarts mixed_sum: pool_weights must be a tensor, got NoneType"):
        mixed_sum(z, x, zw, None, iw, 1, impl=impl)
    with pytest.raises(TypeError, match=r"adarts mixed_sum: z_weights must be a tensor, got NoneType"):
        mixed_sum(z, x, None, pw, iw, 1, impl=impl)
    for sl in ((slice(None), slice(0, 0)), (slice(0, 0), slice(None))):
        with pytest.raises(ValueError, match=r"adarts mixed_sum: x must have non-empty planes"):
            mixed_sum([t[:, :, sl[0], sl[1]] for t in z], x[:, :, sl[0], sl[1]], zw, pw, iw, 1, impl=impl)


@pytest.mark.parametrize("impl", backend_params(("triton",)))
def test_triton_refuses_empty_planes(impl):
    from adarts_kernels.triton.mixed_sum import mixed_sum_fwd
    c = Case(2, 2, 4, 4, device=device_of(impl), seed=45)
    with pytest.raises(ValueError, match="adarts mixed_sum_fwd: x must have non-empty planes"):
        mixed_sum_fwd([t[:, :, :0] for t in c.z], c.x[:, :, :0], *c.weights(), 1, EPS, None, None)


@pytest.mark.parametrize("impl", backend_params(("cpp",)))
def test_cpu_backward_refuses_planes_past_int32_positions(impl):
    """The C++ backward keeps max-pool positions ``r * W + column < H * W`` as int32: a
    plane of 2^31 elements is refused with a clear error. An empty batch (B = 0) carries
    the plane size without memory; the check runs before anything is allocated or read."""
    shape = (0, 1, 2 ** 16, 2 ** 15)
    args = (torch.empty(shape), [], torch.empty(shape), torch.empty(0), torch.ones(2), None, torch.zeros(2, 1),
            torch.ones(2, 1), 1, EPS, True)
    with pytest.raises(RuntimeError, match=r"adarts mixed_sum: planes H\*W must have fewer than 2\^31"):
        torch.ops.adarts_C.mixed_sum_bwd(*args)


@pytest.mark.parametrize("impl", IMPLS)
def test_double_backward_refused_by_name(impl):
    """A gradient of the gradient through the fused op raises naming the op (first-order
    gradients with ``create_graph=True`` still come out)."""
    c = Case(2, 2, 4, 4, dtype=torch.float64, device=device_of(impl), seed=46)
    ins = _leaves(c)
    y, _, _ = mixed_sum(*_split(c, ins), 1, impl=impl)
    gx = torch.autograd.grad((y * y).sum(), ins[c.P], create_graph=True)[0]
    assert gx.shape == c.x.shape and torch.isfinite(gx).all()
    with pytest.raises(RuntimeError, match="adarts mixed_sum: double backward is not supported"):
        gx.sum().backward()
