"""The recomputing building blocks of the fused candidates and edge recomputation."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from adarts_kernels.nn.batchnorm import BatchNormKeepOutput, batch_norm_keep_output, update_running_stats
from adarts_kernels.nn.units import BnReluDwPw, SharedReluConvs
from adarts_kernels.nn.edges import AttentionMixedOp
from adarts_kernels.nn.recompute import recompute_edge
from adarts_kernels.profiling import saved_activation_bytes

D = torch.float64


def rnd(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=D)


@pytest.mark.parametrize("stride", [1, 2])
def test_shared_relu_convs_gradcheck_and_matches_modules(stride):
    n = 3
    u = rnd(2, n, 6, 6, seed=1).requires_grad_()
    specs = (("dwpw", stride, 1, 1), ("dwpw", stride, 4, 2), ("fr",), ("conv", 1, 0))
    ws = [rnd(n, 1, 3, 3, seed=2), rnd(n, n, 1, 1, seed=3), rnd(n, 1, 5, 5, seed=4), rnd(n, n, 1, 1, seed=5),
          rnd(2, n, 1, 1, seed=6), rnd(2, n, 1, 1, seed=7), rnd(5, n, 1, 1, seed=8)]
    ws = [w.requires_grad_() for w in ws]
    assert torch.autograd.gradcheck(lambda u, *w: SharedReluConvs.apply(u, specs, False, *w), (u, *ws))
    outs = SharedReluConvs.apply(u, specs, False, *ws)
    r = F.relu(u)
    expect = [F.conv2d(F.conv2d(r, ws[0], None, stride, 1, 1, n), ws[1]),
              F.conv2d(F.conv2d(r, ws[2], None, stride, 4, 2, n), ws[3]),
              torch.cat([F.conv2d(r, ws[4], stride=2), F.conv2d(r[:, :, 1:, 1:], ws[5], stride=2)], 1),
              F.conv2d(r, ws[6])]
    for o, e in zip(outs, expect):
        torch.testing.assert_close(o, e)


def test_shared_relu_convs_keeps_only_its_input():
    u0 = torch.randn(4, 4, 8, 8, requires_grad=True)
    w = [torch.randn(4, 1, 3, 3, requires_grad=True), torch.randn(4, 4, 1, 1, requires_grad=True)]
    specs = (("dwpw", 1, 1, 1),) * 4
    nbytes = saved_activation_bytes(lambda: SharedReluConvs.apply(u0 * 1.0, specs, False, *(w * 4)))
    assert nbytes == u0.numel() * 4        # u once; no ReLU or depthwise outputs


@pytest.mark.parametrize("training", [True, False])
def test_bn_relu_dw_pw_gradcheck_and_matches_modules(training):
    n = 3
    u = rnd(3, n, 5, 5, seed=1).mul(2).add(1).requires_grad_()
    wd, wp = rnd(n, 1, 3, 3, seed=2).requires_grad_(), rnd(4, n, 1, 1, seed=3).requires_grad_()
    rm, rv = rnd(n, seed=4), rnd(n, seed=5).abs() + 0.5
    assert torch.autograd.gradcheck(
        lambda u, a, b: BnReluDwPw.apply(u, a, b, 1, 2, 2, training, rm, rv, 1e-5, False)[0], (u, wd, wp))
    bn = nn.BatchNorm2d(n, affine=False).double().train(training)
    bn.running_mean.copy_(rm), bn.running_var.copy_(rv)
    expect = F.conv2d(F.conv2d(F.relu(bn(u)), wd, None, 1, 2, 2, n), wp)
    z, mean, var = BnReluDwPw.apply(u, wd, wp, 1, 2, 2, training, None if training else rm,
                                    None if training else rv, 1e-5, False)
    torch.testing.assert_close(z, expect)
    if training:
        torch.testing.assert_close(mean, u.detach().mean((0, 2, 3)))


@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_keep_output(training):
    u = rnd(3, 4, 5, 3, seed=9).mul(3).add(-1).requires_grad_()
    rm, rv = rnd(4, seed=4), rnd(4, seed=5).abs() + 0.5
    assert torch.autograd.gradcheck(lambda u: BatchNormKeepOutput.apply(u, training, rm, rv, 1e-5)[0], (u,))
    bn, bn2 = (nn.BatchNorm2d(4, affine=False).double().train(training) for _ in range(2))
    for b in (bn, bn2):
        b.running_mean.copy_(rm), b.running_var.copy_(rv)
    torch.testing.assert_close(batch_norm_keep_output(u, bn), bn2(u))
    torch.testing.assert_close(bn.running_mean, bn2.running_mean)
    torch.testing.assert_close(bn.running_var, bn2.running_var)
    assert int(bn.num_batches_tracked) == int(bn2.num_batches_tracked)
    with pytest.raises(ValueError, match="affine-free"):
        batch_norm_keep_output(u, nn.BatchNorm2d(4).double())


@pytest.mark.parametrize("momentum", [0.1, 0.5, None])   # None: the cumulative average
def test_update_running_stats_like_batchnorm(momentum):
    bns = [nn.BatchNorm2d(3, affine=False, momentum=momentum) for _ in range(2)]
    refs = [nn.BatchNorm2d(3, affine=False, momentum=momentum) for _ in range(2)]
    eval_bn = nn.BatchNorm2d(3, affine=False).eval()
    for step in range(3):
        us = [torch.randn(4, 3, 5, 5) * (q + 1) + step for q in range(2)]
        for r, u in zip(refs, us):
            r(u)
        var, mean = zip(*[torch.var_mean(u, dim=(0, 2, 3), unbiased=False) for u in us])
        update_running_stats(bns, torch.stack(mean), torch.stack(var), 100)
        update_running_stats([eval_bn], torch.stack(mean)[:1], torch.stack(var)[:1], 100)
    for a, b in zip(bns, refs):
        torch.testing.assert_close(a.running_mean, b.running_mean)
        torch.testing.assert_close(a.running_var, b.running_var)
        assert int(a.num_batches_tracked) == int(b.num_batches_tracked) == 3
    # a BN in eval mode is left alone
    assert torch.equal(eval_bn.running_mean, torch.zeros(3)) and int(eval_bn.num_batches_tracked) == 0


@pytest.mark.parametrize("stride", [1, 2])
def test_recompute_edge_same_gradients_buffers_once_and_counts_inputs(stride):
    torch.manual_seed(stride)
    e1, e2 = AttentionMixedOp(8, stride, 4), AttentionMixedOp(8, stride, 4)
    e2.load_state_dict(e1.state_dict())
    x = torch.randn(3, 8, 6, 6)
    alpha, beta = torch.randn(8), torch.randn(())
    ins = [[t.clone().requires_grad_() for t in (x, alpha, beta)] for _ in range(2)]
    o1 = e1(ins[0][0], F.softmax(ins[0][1], 0), torch.sigmoid(ins[0][2]))
    o2 = recompute_edge(e2, ins[1][0], F.softmax(ins[1][1], 0), torch.sigmoid(ins[1][2]))
    torch.testing.assert_close(o2, o1)
    g = torch.randn(o1.shape)
    o1.backward(g)
    o2.backward(g)
    for a, b in zip(ins[0], ins[1]):
        torch.testing.assert_close(b.grad, a.grad)
    for (n, p), (_, q) in zip(e1.named_parameters(), e2.named_parameters()):
        torch.testing.assert_close(q.grad, p.grad, msg=n)
    for (n, p), (_, q) in zip(e1.named_buffers(), e2.named_buffers()):
        torch.testing.assert_close(q, p, msg=n)        # running statistics moved once, not twice
    # only the inputs are kept: x (non-leaf here), the weights row and beta, and the
    # forward's channels for the replay (C/k = 2 int64)
    xin = torch.randn(3, 8, 6, 6, requires_grad=True)
    nbytes = saved_activation_bytes(lambda: recompute_edge(e2, xin * 1.0, F.softmax(alpha, 0), beta), module=e2)
    assert nbytes == xin.numel() * 4 + 8 * 4 + 4 + 2 * 8


@pytest.mark.parametrize("stride", [1, 2])
def test_keep_holds_intermediates_same_gradients(stride):
    n = 3
    u0 = rnd(2, n, 6, 6, seed=1)
    specs = (("dwpw", stride, 1, 1), ("fr",), ("conv", 1, 0))
    ws0 = [rnd(n, 1, 3, 3, seed=2), rnd(n, n, 1, 1, seed=3), rnd(1, n, 1, 1, seed=6), rnd(1, n, 1, 1, seed=7),
           rnd(4, n, 1, 1, seed=8)]
    wd, wp = rnd(n, 1, 3, 3, seed=4), rnd(n, n, 1, 1, seed=5)
    res = []
    for keep in (False, True):
        u = u0.clone().requires_grad_()
        ws = [w.clone().requires_grad_() for w in ws0 + [wd, wp]]
        outs = SharedReluConvs.apply(u * 1.0, specs, keep, *ws[:5])
        z2, _, _ = BnReluDwPw.apply(outs[0], ws[5], ws[6], 1, 1, 1, True, None, None, 1e-5, keep)
        nbytes = saved_activation_bytes(lambda u=u, keep=keep, ws=ws: SharedReluConvs.apply(u * 1.0, specs, keep, *ws[:5]))
        (sum(o.square().sum() for o in outs[1:]) + z2.square().sum()).backward()
        res.append(([u.grad] + [w.grad for w in ws], nbytes))
    for a, b in zip(res[0][0], res[1][0]):
        torch.testing.assert_close(a, b)
    assert res[1][1] > res[0][1]        # kept: ReLU and depthwise outputs too


def test_grad_like_keeps_the_weights_strides():
    """A channels_last convolution gradient of a depthwise weight ``(n, 1, k, k)`` differs from
    the weight's strides only on the size-1 axis: re-strided without a copy (what data
    parallelism's gradient buckets expect); other layouts are copied; values unchanged."""
    from adarts_kernels.nn.units import grad_like
    w = torch.randn(8, 1, 5, 5)
    g = torch.randn(8, 5, 5, 1).permute(0, 3, 1, 2)          # strides (25, 1, 5, 1)
    assert g.stride() != w.stride()
    out = grad_like(g, w)
    assert out.stride() == w.stride() and out.data_ptr() == g.data_ptr() and torch.equal(out, g)
    w2 = torch.randn(4, 6, 3, 3)
    g2 = torch.randn(4, 3, 3, 6).permute(0, 3, 1, 2)         # a real channels_last layout: copied
    out2 = grad_like(g2, w2)
    assert out2.stride() == w2.stride() and torch.equal(out2, g2)
    assert grad_like(g2.double(), w2).dtype == torch.float32


# the DARTS candidates' chains at stride s: sep_conv 3x3 / 5x5 and dil_conv 3x3 / 5x5 first halves,
# a non-centred depthwise chain (padding 0: never merged), FactorizedReduce and a dense convolution
MERGE_SPECS = {s: (("dwpw", s, 1, 1), ("dwpw", s, 2, 1), ("dwpw", s, 2, 2), ("dwpw", s, 4, 2), ("dwpw", s, 0, 1),
                   ("fr",), ("conv", 1, 0)) for s in (1, 2)}


def _merge_weights(n, seed=10):
    ks = (3, 5, 3, 5, 3)
    ws = [w for i, k in enumerate(ks) for w in (rnd(n, 1, k, k, seed=seed + 2 * i), rnd(n, n, 1, 1, seed=seed + 2 * i + 1))]
    return ws + [rnd(2, n, 1, 1, seed=seed + 20), rnd(2, n, 1, 1, seed=seed + 21), rnd(5, n, 1, 1, seed=seed + 22)]


def test_merge_groups_rule():
    """Centred odd kernels with one stride and dilation share a call, in the order of their first
    chain; other chains (off-centre, even, FactorizedReduce, dense) stay alone."""
    from adarts_kernels.nn.units import merge_groups
    specs = MERGE_SPECS[1]
    outs = (4, 4, 4, 4, 4, -1, -1)
    assert merge_groups(specs, (3, 5, 3, 5, 3, -1, -1), outs) == ((0, 1), (2, 3), (4,), (5,), (6,))
    assert merge_groups(specs, (3, 5, 3, 4, 3, -1, -1), outs) == ((0, 1), (2,), (3,), (4,), (5,), (6,))
    assert merge_groups(specs, (3, 5, 3, 5, 3, -1, -1), (4, 6, 4, 4, 4, -1, -1)) == ((0,), (1,), (2, 3), (4,), (5,),
                                                                                      (6,))
    assert merge_groups((("dwpw", 1, 2, 2), ("dwpw", 2, 2, 2), ("dwpw", 1, 4, 2)), (3, 3, 5), (4, 4, 4)) == ((0, 2),
                                                                                                            (1,))


@pytest.mark.parametrize("stride", [1, 2])
def test_merged_depthwise_gradcheck_and_matches_separate(stride, monkeypatch):
    """With the depthwise convolutions merged (forced): gradcheck in float64, outputs equal to
    the modules' and outputs and gradients equal to the separate calls', also when a merged
    chain has no gradient and with the intermediates kept."""
    from adarts_kernels.nn import units
    n = 3
    specs = MERGE_SPECS[stride]
    u = rnd(2, n, 6, 6, seed=1).requires_grad_()
    ws = [w.requires_grad_() for w in _merge_weights(n)]
    monkeypatch.setattr(units, "_merge_pays", lambda t, c: True)
    calls = []
    real = units._group_fwd
    monkeypatch.setattr(units, "_group_fwd", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    assert torch.autograd.gradcheck(lambda u, *w: SharedReluConvs.apply(u, specs, False, *w), (u, *ws))
    assert calls, "the merged path did not run"
    r = F.relu(u)
    expect = [F.conv2d(F.conv2d(r, ws[2 * i], None, stride, p, d, n), ws[2 * i + 1])
              for i, (_, _, p, d) in enumerate(specs[:5])]
    res = {}
    for merged in (True, False):
        monkeypatch.setattr(units, "_merge_pays", lambda t, c, m=merged: m)
        for keep in (False, True):
            uu = u.detach().clone().requires_grad_()
            ww = [w.detach().clone().requires_grad_() for w in ws]
            outs = SharedReluConvs.apply(uu, specs, keep, *ww)
            for o, e in zip(outs[:5], expect):
                torch.testing.assert_close(o, e)
            (outs[0].square().sum() + outs[1].cos().sum() + outs[2].sin().sum() + outs[3].sum()
             + outs[4].exp().sum() + outs[5].sum() + outs[6].square().sum()).backward()
            res[merged, keep] = [uu.grad] + [w.grad for w in ww]
        # a chain without gradient (None: chain 1, merged with chain 0): None weight gradients
        gzs = [rnd(*o.shape, seed=30 + i) for i, o in enumerate(outs)]
        gzs[1] = None
        du, grads = units.relu_convs_bwd(gzs, u.detach(), specs, [w.detach() for w in ws])
        res[merged, "none"] = [du] + grads
        assert grads[2] is None and grads[3] is None and all(g is not None for g in grads[:2] + grads[4:])
    for key in res:
        base = res[(False, "none") if key[1] == "none" else (False, False)]
        for a, b in zip(res[key], base):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b)


@pytest.mark.parametrize("training", [True, False])
def test_merged_sep_halves_gradcheck_and_match_separate(training, monkeypatch):
    """The sep_convs' second halves (3x3 and 5x5 at dilation 1, a dilated 3x3 that stays alone)
    merged: gradcheck in float64 and, with and without kept intermediates, outputs, statistics
    and gradients equal to the halves run one by one (BnReluDwPw)."""
    from adarts_kernels.nn.units import BnReluDwPwSeps
    n = 3
    confs = ((1, 1, 1, training, 1e-5), (1, 2, 1, training, 1e-5), (1, 2, 2, training, 1e-3))
    us = [rnd(2, n, 5, 5, seed=40 + i).mul(1 + i).add(i).requires_grad_() for i in range(3)]
    wds = [rnd(n, 1, k, k, seed=50 + i).requires_grad_() for i, k in enumerate((3, 5, 3))]
    wps = [rnd(n, n, 1, 1, seed=60 + i).requires_grad_() for i in range(3)]
    rms = [None] * 3 if training else [rnd(n, seed=70 + i) for i in range(3)]
    rvs = [None] * 3 if training else [rnd(n, seed=80 + i).abs() + 0.5 for i in range(3)]
    calls = []
    from adarts_kernels.nn import units
    real = units._packed_kernel
    monkeypatch.setattr(units, "_packed_kernel", lambda w, side_by_side=False: calls.append(len(w)) or real(w, side_by_side))
    assert torch.autograd.gradcheck(
        lambda *t: BnReluDwPwSeps.apply(confs, True, False, rms, rvs, *t)[:3], (*us, *wds, *wps))
    assert calls and set(calls) == {2}          # the two dilation-1 halves merged, the dilated one alone
    g = [rnd(2, n, 5, 5, seed=90 + i) for i in range(3)]
    expect = []
    for i, (s, p, d, tr, eps) in enumerate(confs):
        z, mean, var = BnReluDwPw.apply(us[i], wds[i], wps[i], s, p, d, tr, rms[i], rvs[i], eps, False)
        expect.append((z, mean, var, torch.autograd.grad(z, (us[i], wds[i], wps[i]), g[i])))
    for keep in (False, True):
        out = BnReluDwPwSeps.apply(confs, True, keep, rms, rvs, *us, *wds, *wps)
        grads = torch.autograd.grad(out[:3], (*us, *wds, *wps), g)
        for i, (z, mean, var, gr) in enumerate(expect):
            torch.testing.assert_close(out[i], z)
            torch.testing.assert_close(out[3 + i], mean)
            torch.testing.assert_close(out[6 + i], var)
            for a, b in zip((grads[i], grads[3 + i], grads[6 + i]), gr):
                torch.testing.assert_close(a, b)
