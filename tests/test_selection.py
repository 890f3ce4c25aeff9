"""The pluggable channel selector of the ADARTS edges (adarts_kernels/nn/selection.py).

A selector that forces other channels than the top-k: every edge then computes the
reference edge's function on those channels (built by hand below); without a selector,
or with the default top-k, nothing changes, bit for bit; a re-run in backward
(``recompute="edge"``) never calls the selector.
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from adarts_kernels.backend import why_unavailable
from adarts_kernels.nas import SearchNetwork
from adarts_kernels.nn import (AttentionMixedOp, FusedAttentionMixedOp, local_selector, select_channels,
                               selects_channels)
from adarts_kernels.ops import attention_gather, attention_score, attention_writeback

IMPLS = [n for n in ("reference", "cpp") if why_unavailable(n, "cpu") is None]
KINDS = ["modules"] + [f"fused-{impl}" for impl in IMPLS]


def make_pair(kind, C, stride, k, seed, selector=None):
    """``(ref, edge)`` with the same parameters: ``ref`` the plain edge without selector."""
    torch.manual_seed(seed)
    ref = AttentionMixedOp(C, stride, k)
    if kind == "modules":
        edge = AttentionMixedOp(C, stride, k, selector=selector)
    else:
        edge = FusedAttentionMixedOp(C, stride, k, impl=kind.split("-", 1)[1], selector=selector)
    edge.load_state_dict(ref.state_dict())
    return ref, edge


def lowest(score, n):
    """The n lowest-scored channels, ascending: never the top-k."""
    return torch.sort(score, stable=True).indices[:n]


def permuted(score, n):
    """The first n channels of a fixed random permutation."""
    g = torch.Generator().manual_seed(score.numel())
    return torch.randperm(score.numel(), generator=g)[:n].to(score.device)


class Recorder:
    """A selector that records each score it is given, then answers ``pick(score, n)``."""

    def __init__(self, pick, log=None, name=None):
        self.pick, self.calls, self.log, self.name = pick, [], log, name

    def __call__(self, score, n):
        self.calls.append(score.clone())
        if self.log is not None:
            self.log.append(self.name)
        return self.pick(score, n)


def inputs(B, C, H, W, seed):
    """Non-contiguous ``x`` (a channels-last layout), the softmax of a random alpha row and a
    sigmoid beta, all requiring grad through leaves returned with them."""
    g = torch.Generator().manual_seed(seed)
    leaves = [torch.randn(B, H, W, C, generator=g), torch.randn(8, generator=g), torch.randn((), generator=g)]
    leaves = [t.requires_grad_() for t in leaves]
    x = leaves[0].permute(0, 3, 1, 2)
    assert not x.is_contiguous()
    return leaves, (x, F.softmax(leaves[1], 0), torch.sigmoid(leaves[2]))


def by_hand(ref, x, weights, edge_weight, idx):
    """The reference formula on the channels ``idx``: ``xa = x * a``, the candidates on
    ``xa[:, idx]``, written back into ``xa`` (max-pooled 2x2 at stride 2), times the edge weight."""
    a = ref.attention(x)
    xa = x * a[:, :, None, None]
    y = ref.cands.mixed(xa[:, idx], weights)
    out = (xa if ref.stride == 1 else F.max_pool2d(xa, 2, 2)).clone()
    out[:, idx] = y
    return edge_weight * out


def grads_of(leaves, module):
    return [t.grad for t in leaves] + [p.grad for p in module.parameters()]


def assert_all_close(got, want, **tol):
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        torch.testing.assert_close(g, w, msg=f"tensor {i}", **tol)


def assert_all_equal(got, want, what=""):
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert (g is None and w is None) or torch.equal(g, w), f"{what}: tensor {i} differs"


# ----------------------------------------------------------------------------- forced selection

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("pick", [lowest, permuted], ids=["lowest", "permuted"])
def test_forced_channels_give_the_reference_formula(kind, stride, pick):
    C, k, B, H, W = 12, 3, 3, 6, 10
    sel = Recorder(pick)
    ref, edge = make_pair(kind, C, stride, k, seed=stride, selector=sel)
    leaves_e, ins_e = inputs(B, C, H, W, seed=7)
    leaves_r, ins_r = inputs(B, C, H, W, seed=7)

    out = edge(*ins_e)
    assert len(sel.calls) == 1                                   # once per forward
    score = sel.calls[0]
    a = ref.attention(ins_r[0]).detach()
    assert score.shape == (C,) and score.dtype == torch.float32
    torch.testing.assert_close(score, a.sum(0), rtol=1e-6, atol=1e-6)
    idx = pick(score, C // k)
    assert torch.equal(edge.last_idx, idx)
    if pick is lowest:
        assert not set(idx.tolist()) & set(select_channels(score, C // k).tolist())   # not the top-k

    want = by_hand(ref, *ins_r, idx)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    grad = torch.randn(want.shape, generator=torch.Generator().manual_seed(3))
    out.backward(grad)
    want.backward(grad)
    assert len(sel.calls) == 1                                   # not called by backward
    assert_all_close(grads_of(leaves_e, edge), grads_of(leaves_r, ref), rtol=1e-4, atol=1e-5)
    for (n, b1), (_, b2) in zip(ref.named_buffers(), edge.named_buffers()):
        torch.testing.assert_close(b2, b1, msg=n)                # BN statistics moved once, alike


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("stride", [1, 2])
def test_given_idx_is_used_and_no_selector_called(kind, stride):
    C, k = 8, 4
    sel = Recorder(local_selector)
    ref, edge = make_pair(kind, C, stride, k, seed=5, selector=sel)
    leaves_e, ins_e = inputs(2, C, 4, 6, seed=9)
    leaves_r, ins_r = inputs(2, C, 4, 6, seed=9)
    idx = torch.tensor([6, 1])
    out = edge(*ins_e, idx=idx)
    assert sel.calls == [] and edge.last_idx is idx
    want = by_hand(ref, *ins_r, idx)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    out.sum().backward()
    want.sum().backward()
    assert_all_close(grads_of(leaves_e, edge), grads_of(leaves_r, ref), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["modules", "fused-reference"])
def test_half_precision_score_in_float32(kind):
    sel = Recorder(local_selector)
    ref, edge = make_pair(kind, 8, 1, 4, seed=2, selector=sel)
    x = torch.randn(2, 8, 4, 4).to(torch.bfloat16)
    w = F.softmax(torch.randn(8), 0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = edge(x, w)
        a = ref.attention(x)
    assert out.dtype == torch.bfloat16 and len(sel.calls) == 1
    assert sel.calls[0].dtype == torch.float32
    torch.testing.assert_close(sel.calls[0], a.float().sum(0), rtol=2e-2, atol=2e-2)


# ----------------------------------------------------------------------------- nothing changes

def modules_today(edge, x, weights, edge_weight):
    """The reference edge's forward as it is without selector."""
    a = edge.attention(x)
    xa = x * a[:, :, None, None]
    idx = select_channels(a.detach().sum(dim=0), edge.C // edge.k)
    y = edge.cands.mixed(xa.index_select(1, idx), weights)
    base = xa if edge.stride == 1 else F.max_pool2d(xa, 2, 2)
    return edge_weight * base.index_copy(1, idx, y)


def fused_today(edge, x, weights, edge_weight):
    """The fused edge's forward as it is without selector: the channels attention_score returns."""
    mlp = edge.attention.mlp
    a, idx = attention_score(x, mlp[0].weight, mlp[2].weight, edge.C // edge.k, impl=edge.impl)
    xs = attention_gather(x, a, idx, impl=edge.impl, validate_idx=False)
    y = edge._mixed(xs, weights, False)
    return attention_writeback(x, a, idx, y, edge_weight.reshape(()), edge.stride, impl=edge.impl,
                               validate_idx=False)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("stride", [1, 2])
def test_no_selector_and_default_selector_bitwise_unchanged(kind, stride):
    C, k = 12, 3
    runs = []
    for how in ("today", "none", "local", "idx"):
        _, edge = make_pair(kind, C, stride, k, seed=11, selector=local_selector if how == "local" else None)
        leaves, ins = inputs(3, C, 6, 10, seed=4)
        if how == "today":
            out = (modules_today if kind == "modules" else fused_today)(edge, *ins)
            today_idx = select_channels(edge.attention(ins[0]).detach().sum(0), C // k)
        elif how == "idx":
            out = edge(*ins, idx=today_idx)
        else:
            out = edge(*ins)
            assert torch.equal(edge.last_idx, today_idx)
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1)))
        runs.append([out] + grads_of(leaves, edge) + list(edge.buffers()))
    for how, run in zip(("none", "local", "idx"), runs[1:]):
        assert_all_equal(run, runs[0], how)


# ----------------------------------------------------------------------------- recompute

@pytest.mark.parametrize("kernels", ["modules", "fused"])
def test_recompute_calls_each_selector_once_and_never_in_backward(kernels):
    torch.manual_seed(4)
    plain = SearchNetwork(C=8, num_classes=10, layers=3, edge="adarts", kernels=kernels)
    rec = SearchNetwork(C=8, num_classes=10, layers=3, edge="adarts", kernels=kernels, recompute="edge")
    rec.load_state_dict(plain.state_dict())
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(4, 3, 16, 16, generator=g), torch.randint(0, 10, (4,), generator=g)
    plain.set_selector(lowest)
    l_plain = plain.loss(x, y)
    l_plain.backward()

    # one selector per edge
    log = []
    names = [name for name, _ in rec.selecting_edges()]
    for name, edge in rec.selecting_edges():
        edge.selector = Recorder(lowest, log, name)
    l_rec = rec.loss(x, y)
    assert log == names                          # once per edge, in forward order
    l_rec.backward()
    assert log == names                          # the replays in backward call none
    torch.testing.assert_close(l_rec, l_plain, rtol=1e-5, atol=1e-6)
    for (n, p), (_, q) in zip(plain.named_parameters(), rec.named_parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=n)

    # the scope may end before backward: the replays use the channels of their forward
    rec.zero_grad()
    shared = Recorder(lowest)
    with rec.selector_scope(shared):
        l_rec = rec.loss(x, y)
    assert all(edge.selector.name == name for name, edge in rec.selecting_edges())   # restored
    assert len(shared.calls) == len(names)
    l_rec.backward()
    assert len(shared.calls) == len(names) and log == names
    for (n, p), (_, q) in zip(plain.named_parameters(), rec.named_parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=n)


# ----------------------------------------------------------------------------- the supernet

@pytest.mark.parametrize("kernels,recompute", [("modules", "none"), ("fused", "none"), ("fused", "edge")])
@pytest.mark.parametrize("layers", [2, 3])
def test_set_selector_and_scope_reach_every_edge(kernels, recompute, layers):
    net = SearchNetwork(C=8, num_classes=10, layers=layers, edge="adarts", kernels=kernels, recompute=recompute)
    edges = list(net.selecting_edges())
    modules = dict(net.named_modules())
    all_edges = [m for m in net.modules() if isinstance(m, (AttentionMixedOp, FusedAttentionMixedOp))]
    assert len(edges) == len(all_edges) == 14 * layers
    assert all(modules[name] is edge and selects_channels(edge) for name, edge in edges)
    assert all(edge.selector is None for _, edge in edges)

    def sel(score, n):
        return local_selector(score, n)

    assert net.set_selector(sel) is None
    assert all(edge.selector is sel for _, edge in edges)
    net.set_selector(None)
    assert all(edge.selector is None for _, edge in edges)

    first = edges[0][1]
    first.selector = lowest                      # one edge with its own selector
    with pytest.raises(RuntimeError, match="inside"):
        with net.selector_scope(sel):
            assert all(edge.selector is sel for _, edge in edges)
            raise RuntimeError("inside the scope")
    assert first.selector is lowest and all(edge.selector is None for _, edge in edges[1:])
    with net.selector_scope(None):
        assert first.selector is None
    assert first.selector is lowest

    calls = Recorder(local_selector)
    with torch.no_grad(), net.selector_scope(calls):
        net(torch.randn(2, 3, 16, 16))
    assert len(calls.calls) == len(edges)


@pytest.mark.parametrize("edge", ["pcdarts", "darts"])
def test_baselines_have_no_selecting_edge(edge):
    net = SearchNetwork(C=8, num_classes=10, layers=2, edge=edge)
    assert list(net.selecting_edges()) == []
    calls = Recorder(local_selector)
    net.set_selector(calls)
    with net.selector_scope(calls):
        net(torch.randn(2, 3, 16, 16))
    assert calls.calls == []


# ----------------------------------------------------------------------------- refusals

BAD = {
    "int32": (lambda s, n: local_selector(s, n).int(), TypeError, "int64"),
    "float": (lambda s, n: local_selector(s, n).float(), TypeError, "int64"),
    "short": (lambda s, n: local_selector(s, n)[:-1], ValueError, r"shape \(2,\)"),
    "2-d": (lambda s, n: local_selector(s, n)[None], ValueError, r"shape \(2,\)"),
    "list": (lambda s, n: local_selector(s, n).tolist(), TypeError, "tensor"),
    "device": (lambda s, n: torch.empty(n, dtype=torch.int64, device="meta"), ValueError, "meta"),
}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bad", list(BAD))
def test_wrong_selector_answer_refused_naming_the_edge(kind, bad):
    fn, exc, words = BAD[bad]
    _, edge = make_pair(kind, 8, 1, 4, seed=0, selector=fn)
    name = type(edge).__name__
    x, w = torch.randn(2, 8, 4, 4), F.softmax(torch.randn(8), 0)
    with pytest.raises(exc, match=f"^{name}: .*{words}"):
        edge(x, w)
    edge.selector = None
    good = select_channels(torch.randn(8), 2)
    wrong = fn(torch.randn(8), 2)
    if isinstance(wrong, torch.Tensor):
        with pytest.raises(exc, match=f"^{name}: .*{words}"):
            edge(x, w, idx=wrong)
    assert edge(x, w, idx=good).shape == x.shape


def test_selector_attribute_plain_and_checked():
    edge = FusedAttentionMixedOp(8, 1, 4)
    keys = set(edge.state_dict())
    edge.selector = nn.Identity()                # a module selector is no submodule
    assert set(edge.state_dict()) == keys and "selector" not in dict(edge.named_children())
    with pytest.raises(TypeError, match="FusedAttentionMixedOp: selector must be None or a callable"):
        edge.selector = 3
    with pytest.raises(TypeError, match="AttentionMixedOp: selector must be None or a callable"):
        AttentionMixedOp(8, 1, 4, selector="topk")
