"""adarts::mixed_sum: the weighted mixed sum with the candidates' BNs folded in."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from adarts_kernels.backend import why_unavailable
from adarts_kernels.ops import mixed_sum
from adarts_kernels.ops.mixed_sum import _mixed_sum

CPU_IMPLS = [n for n in ("reference", "cpp", "triton") if why_unavailable(n, "cpu") is None]


def inputs(B=3, n=5, H=6, W=10, stride=1, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    P = 4 if stride == 1 else 5
    x = torch.randn(B, n, H, W, generator=g, dtype=torch.float64).to(dtype)
    z = [torch.randn(B, n, H // stride, W // stride, generator=g, dtype=torch.float64).mul(1 + i).add(i)
         .to(dtype) for i in range(P)]
    w = torch.softmax(torch.randn(8, generator=g, dtype=torch.float64), 0).to(dtype)
    return z, x, w


def composition(z, x, w, stride, bns):
    """The plain-module composition the op folds: pools + BN modules + weighted sum."""
    us = [F.max_pool2d(x, 3, stride, 1), F.avg_pool2d(x, 3, stride, 1, count_include_pad=False)] + list(z)
    cols = (1, 2, 4, 5, 6, 7) if stride == 1 else (1, 2, 3, 4, 5, 6, 7)
    y = sum(w[o] * bn(u) for o, u, bn in zip(cols, us, bns))
    if stride == 1:
        y = y + w[3] * x
    return y + w[0] * 0.0


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("train", [True, False])
def test_matches_batchnorm_modules(impl, stride, train):
    z, x, w = inputs(B=2, n=3, H=6, W=8, stride=stride, dtype=torch.float32, seed=stride + 2 * train)
    Q = len(z) + 2
    bns = [nn.BatchNorm2d(3, affine=False) for _ in range(Q)]
    for bn in bns:                       # non-trivial running statistics for eval mode
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.train(train)
    rm = torch.stack([bn.running_mean.clone() for bn in bns])
    rv = torch.stack([bn.running_var.clone() for bn in bns])
    ins_ref = [t.clone().requires_grad_() for t in (*z, x, w)]
    ins = [t.clone().requires_grad_() for t in (*z, x, w)]
    y_ref = composition(ins_ref[:-2], ins_ref[-2], ins_ref[-1], stride, bns)
    if train:
        y, mean, var = mixed_sum(ins[:-2], ins[-2], ins[-1], stride, impl=impl)
        N = y.numel() // y.shape[1]
        for q, bn in enumerate(bns):     # the stats returned move running stats like BN does
            torch.testing.assert_close(0.9 * rm[q] + 0.1 * mean[q], bn.running_mean, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(0.9 * rv[q] + 0.1 * var[q] * N / (N - 1), bn.running_var, rtol=1e-5, atol=1e-6)
    else:
        y, mean, var = mixed_sum(ins[:-2], ins[-2], ins[-1], stride, run_mean=rm, run_var=rv, impl=impl)
        torch.testing.assert_close(mean, rm)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(9))
    g = g.transpose(2, 3).contiguous().transpose(2, 3)      # gradient arriving non-contiguous
    y.backward(g)
    y_ref.backward(g)
    for a, b in zip(ins, ins_ref):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5)
    assert ins[-1].grad[0] == 0


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("stride", [1, 2])
def test_gradcheck_float64(impl, stride):
    # Interpreted Triton runs each kernel program in Python: a smaller problem and gradcheck's
    # fast mode (one random projection of the Jacobian) keep it to seconds, not minutes.
    fast = impl == "triton"
    z, x, w = inputs(B=2, n=2, H=4, W=6, stride=stride, seed=3) if not fast else \
        inputs(B=1, n=2, H=4, W=4, stride=stride, seed=3)
    P, n = len(z), x.shape[1]
    ins = [t.requires_grad_() for t in (*z, x, w)]
    rm, rv = torch.rand(P + 2, n, dtype=torch.float64), torch.rand(P + 2, n, dtype=torch.float64) + 0.5
    assert torch.autograd.gradcheck(lambda *a: mixed_sum(list(a[:P]), a[P], a[P + 1], stride, impl=impl)[0], ins,
                                    fast_mode=fast)
    assert torch.autograd.gradcheck(
        lambda *a: mixed_sum(list(a[:P]), a[P], a[P + 1], stride, run_mean=rm, run_var=rv, impl=impl)[0], ins,
        fast_mode=fast)


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_noncontiguous_inputs_and_max_pool_ties(impl):
    z, x, w = inputs(B=2, n=3, H=5, W=7, stride=1, dtype=torch.float32, seed=4)
    x = torch.round(x)                   # many equal values: the first maximum takes the gradient
    nc = [t.transpose(2, 3).contiguous().transpose(2, 3) for t in (*z, x)]
    assert not nc[0].is_contiguous()
    a = [t.clone().requires_grad_() for t in (*nc, w)]
    b = [t.clone().contiguous().requires_grad_() for t in (*nc, w)]
    ya, ma, va = mixed_sum(a[:4], a[4], a[5], 1, impl=impl)
    yb, mb, vb = mixed_sum(b[:4], b[4], b[5], 1, impl="reference")
    torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ma, mb, rtol=1e-5, atol=1e-6)
    g = torch.randn(ya.shape)
    ya.backward(g)
    yb.backward(g)
    for p, q in zip(a, b):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_opcheck(impl):
    for stride in (1, 2):
        z, x, w = inputs(B=2, n=2, H=4, W=4, stride=stride, dtype=torch.float32, seed=5)
        for t in (*z, x, w):
            t.requires_grad_()
        torch.library.opcheck(_mixed_sum, (z, x, w, stride, 1e-5, None, None, impl))
        rm, rv = torch.rand(len(z) + 2, 2), torch.rand(len(z) + 2, 2) + 0.5
        torch.library.opcheck(_mixed_sum, (z, x, w, stride, 1e-5, rm, rv, impl))


def test_compile_fullgraph():
    z, x, w = inputs(B=2, n=2, H=4, W=4, dtype=torch.float32, seed=6)

    def f(z0, z1, z2, z3, x, w):
        y, mean, var = mixed_sum([z0, z1, z2, z3], x, w, 1)
        return (y * y).sum() + mean.sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    a = [t.clone().requires_grad_() for t in (*z, x, w)]
    b = [t.clone().requires_grad_() for t in (*z, x, w)]
    compiled(*a).backward()
    f(*b).backward()
    for p, q in zip(a, b):
        torch.testing.assert_close(p.grad, q.grad)


def test_saves_bn_inputs_and_stats_only():
    from adarts_kernels.profiling import saved_activation_bytes
    z, x, w = inputs(B=4, n=4, H=8, W=8, dtype=torch.float32, seed=7)
    leaves = [t.requires_grad_() for t in (*z, x, w)]
    nbytes = saved_activation_bytes(
        lambda: mixed_sum(*(lambda i: (i[:4], i[4], i[5]))([t * 1.0 for t in leaves]), 1, impl="reference"))
    # the z list and x (non-leaf activations), w (8 floats), mean and var (Q=6 rows of 4 channels)
    assert nbytes == 5 * x.numel() * 4 + 8 * 4 + 2 * 6 * 4 * 4


def test_bad_arguments_named():
    z, x, w = inputs(B=2, n=2, H=4, W=4, dtype=torch.float32)
    with pytest.raises(ValueError, match="mixed_sum: stride 1 takes 4 BN inputs in z, got 3"):
        mixed_sum(z[:3], x, w, 1)
    with pytest.raises(ValueError, match=r"expected z\[1\] of shape"):
        mixed_sum([z[0], z[1][:, :1], z[2], z[3]], x, w, 1)
    with pytest.raises(TypeError, match="dtype mismatch"):
        mixed_sum(z, x.double(), w, 1)
    with pytest.raises(ValueError, match="expected w of shape"):
        mixed_sum(z, x, w[:7], 1)
    with pytest.raises(ValueError, match="both run_mean and run_var"):
        mixed_sum(z, x, w, 1, run_mean=torch.zeros(6, 2))
    with pytest.raises(ValueError, match="stride 2 needs even H and W"):
        mixed_sum([t[:, :, :2, :2] for t in z] + [z[0][:, :, :2, :2]], torch.randn(2, 2, 5, 4), w, 2)
    with pytest.raises(TypeError, match="must be a list"):
        mixed_sum(z[0], x, w, 1)
