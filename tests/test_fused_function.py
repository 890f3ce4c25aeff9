"""The fused edge's one-node eager path (adarts_kernels/nn/fused_function.py) against the
composed ``adarts::`` ops it replaces in eager mode: the same kernels in the same order, so
outputs, every gradient and the BatchNorm buffers are bitwise equal; the same bytes saved
for backward; the composed path wherever the one-node path may not run (torch.compile,
fake tensors); first-order backward only."""
import copy

import pytest
import torch
import torch.nn.functional as F

from adarts_kernels.backend import why_unavailable
from adarts_kernels.nn import FusedAttentionMixedOp
from adarts_kernels.nn import fused_function as FF
from adarts_kernels.nn.recompute import recompute_edge
from adarts_kernels.profiling import saved_activation_bytes
from torch.utils._python_dispatch import TorchDispatchMode

IMPLS = [i for i in ("reference", "cpp") if why_unavailable(i, "cpu") is None]


def edges(C, stride, k, impl, seed):
    torch.manual_seed(seed)
    one = FusedAttentionMixedOp(C, stride, k, impl=impl)
    composed = copy.deepcopy(one)
    composed.one_node = False
    return one, composed


def inputs(B, C, H, W, seed, layout=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, H, W, generator=g)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "sliced":    # a non-contiguous view of a larger tensor
        x = torch.randn(B, C + 3, H, W + 2, generator=g)[:, 1:C + 1, :, 1:W + 1]
    alpha = torch.randn(8, generator=g)
    beta = torch.randn((), generator=g)
    return x, alpha, beta, g


def run_pair(one, composed, x, alpha, beta, g, edge_weight=True, recompute=False):
    outs, leaves = [], []
    for m in (one, composed):
        xi, ai, bi = (t.detach().clone().requires_grad_() for t in (x, alpha, beta))
        ew = torch.sigmoid(bi) if edge_weight else None
        w = F.softmax(ai, 0)
        out = recompute_edge(m, xi, w, ew) if recompute else m(xi, w, ew)
        outs.append(out)
        leaves.append((xi, ai, bi))
    grad = torch.randn(outs[0].shape, generator=g)
    for o in outs:
        o.backward(grad)
    return outs, leaves


def assert_bitwise(one, composed, outs, leaves, edge_weight=True):
    assert torch.equal(outs[0], outs[1])
    assert torch.equal(one.last_idx, composed.last_idx)
    names = ("x", "alpha", "beta") if edge_weight else ("x", "alpha")
    for name, a, b in zip(names, leaves[0], leaves[1]):
        assert torch.equal(a.grad, b.grad), name
    for (n, p), (_, q) in zip(one.named_parameters(), composed.named_parameters()):
        assert (p.grad is None) == (q.grad is None), n
        if p.grad is not None:
            assert torch.equal(p.grad, q.grad), n
            assert p.grad.stride() == q.grad.stride(), n
    for (n, b1), (_, b2) in zip(one.named_buffers(), composed.named_buffers()):
        assert torch.equal(b1, b2), n


#: the one-node path's variants: the autograd node in C++ (adarts_C::edge), FusedEdgeFunction with
#: the C++ host sequence, FusedEdgeFunction with the Python sequence
PATHS = ["node", "cxx", "python"]


def use_path(path: str, monkeypatch) -> None:
    monkeypatch.setattr(FF, "USE_CXX_NODE", path == "node")
    monkeypatch.setattr(FF, "USE_CXX", path != "python")


class EdgeCalls(TorchDispatchMode):
    """Records the adarts_C::edge_* calls (the C++ host sequence) made under it."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "edge_" in str(func):
            self.calls.append(str(func).split(".")[1])
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("path", PATHS)
def test_bitwise_equal_to_the_composed_ops(impl, stride, train, recompute, path, monkeypatch):
    """The one-node path (the autograd node in C++, adarts_C::edge, or FusedEdgeFunction), its host
    sequence in C++ (adarts_C::edge_fwd/edge_bwd: the compiled backends in training mode) or in
    Python, against the composed ops."""
    use_path(path, monkeypatch)
    one, composed = edges(12 if stride == 1 else 16, stride, 4, impl, seed=stride + 2 * train)
    one.train(train), composed.train(train)
    x, alpha, beta, g = inputs(3, one.C, 6, 10, seed=5 + stride)
    with EdgeCalls() as calls:
        outs, leaves = run_pair(one, composed, x, alpha, beta, g, recompute=recompute)
    assert_bitwise(one, composed, outs, leaves)
    expect_cxx = path != "python" and train and impl != "reference"
    assert calls.calls == (["edge_fwd", "edge_fwd", "edge_bwd"] if recompute else ["edge_fwd", "edge_bwd"]
                           ) * expect_cxx, calls.calls
    assert ("EdgeNode" in outs[0].grad_fn.name()) == (expect_cxx and path == "node"), outs[0].grad_fn.name()


@pytest.mark.parametrize("stride", [1, 2])
def test_selector_bitwise_equal_to_the_composed_ops(stride):
    """With a selector the attention is computed first, the selector chooses, and the rest runs
    as one call: the same result as the composed ops."""
    from adarts_kernels.nn.selection import select_channels

    class Trusted:
        trusted = True

        def __call__(self, score, n):
            return select_channels(score, n)
    one, composed = edges(16, stride, 4, None, seed=11)
    for m in (one, composed):
        m.selector = Trusted()
    x, alpha, beta, g = inputs(3, 16, 6, 10, seed=12)
    outs, leaves = run_pair(one, composed, x, alpha, beta, g)
    assert_bitwise(one, composed, outs, leaves)


@pytest.mark.parametrize("layout", ["channels_last", "sliced"])
@pytest.mark.parametrize("stride", [1, 2])
def test_non_contiguous_and_odd_shapes(layout, stride):
    one, composed = edges(8, stride, 2, None, seed=7)
    x, alpha, beta, g = inputs(3, 8, 7 if stride == 1 else 6, 5 if stride == 1 else 10, seed=9, layout=layout)
    assert not x.is_contiguous()
    outs, leaves = run_pair(one, composed, x, alpha, beta, g, edge_weight=False)
    assert_bitwise(one, composed, outs, leaves, edge_weight=False)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("recompute", [False, True])
def test_bf16_autocast_equal_to_the_composed_ops(path, recompute, monkeypatch):
    """Under bfloat16 autocast; with recomputation the re-run inside backward (outside the
    autocast region) replays the forward's autocast state."""
    use_path(path, monkeypatch)
    one, composed = edges(8, 1, 4, None, seed=2)
    x, alpha, beta, g = inputs(4, 8, 8, 8, seed=3)
    outs, grads = [], []
    for m in (one, composed):
        xi = x.detach().clone().requires_grad_()
        with EdgeCalls() as calls:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                args = (xi.to(torch.bfloat16), F.softmax(alpha, 0), torch.sigmoid(beta))
                out = recompute_edge(m, *args) if recompute else m(*args)
            out.float().sum().backward()
        if m is one:
            assert calls.calls == ((["edge_fwd", "edge_fwd", "edge_bwd"] if recompute else ["edge_fwd", "edge_bwd"])
                                   if path != "python" else [])
            assert ("EdgeNode" in out.grad_fn.name()) == (path == "node"), out.grad_fn.name()
        outs.append(out)
        grads.append([xi.grad] + [p.grad for p in m.parameters()])
    assert outs[0].dtype == torch.bfloat16
    assert torch.equal(outs[0], outs[1])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_given_indices_are_still_validated():
    one, _ = edges(8, 1, 4, None, seed=1)
    x = torch.randn(2, 8, 6, 6, requires_grad=True)
    w = torch.softmax(torch.randn(8), 0)
    for on in (True, False):
        one.one_node = on
        with pytest.raises((ValueError, RuntimeError), match="repeat a channel|distinct"):
            one(x, w, idx=torch.tensor([3, 3]))
        with pytest.raises((ValueError, RuntimeError), match=r"\[0, 8\)"):
            one(x, w, idx=torch.tensor([1, 9]))


def test_saved_bytes_equal_to_the_composed_ops():
    for recompute in (False, True):
        one, composed = edges(16, 1, 4, None, seed=4)
        x = torch.randn(4, 16, 8, 8, requires_grad=True)
        w = torch.softmax(torch.randn(8, requires_grad=True), 0)

        def fwd(m, x=x, w=w, recompute=recompute):
            return lambda: (recompute_edge(m, x * 1.0, w) if recompute else m(x * 1.0, w))
        assert saved_activation_bytes(fwd(one), module=one) == saved_activation_bytes(fwd(composed), module=composed)


def test_recompute_moves_the_statistics_once():
    one, _ = edges(8, 1, 4, None, seed=6)
    x = torch.randn(2, 8, 6, 6, requires_grad=True)
    w = torch.softmax(torch.randn(8), 0)
    recompute_edge(one, x, w).sum().backward()
    counts = {int(b) for n, b in one.named_buffers() if n.endswith("num_batches_tracked")}
    assert counts == {1}


def test_double_backward_refused():
    one, _ = edges(8, 1, 4, None, seed=8)
    x = torch.randn(2, 8, 6, 6, requires_grad=True)
    out = one(x, torch.softmax(torch.randn(8), 0))
    (gx,) = torch.autograd.grad(out.pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        gx.sum().backward()


def test_one_node_only_where_it_may_run(monkeypatch):
    x = torch.randn(2, 8, 6, 6)
    assert FF.eager_path_ok(x)
    assert not FF.eager_path_ok(x.to("meta"))
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        assert not FF.eager_path_ok(torch.empty(2, 8, 6, 6))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not FF.eager_path_ok(x)


def test_composed_path_runs_when_the_one_node_path_may_not(monkeypatch):
    """The same edge, told it may not run as one node, calls the custom ops (whose fakes
    torch.compile traces) and gives the same result."""
    one, _ = edges(8, 1, 4, None, seed=3)
    x = torch.randn(2, 8, 6, 6)
    w = torch.softmax(torch.randn(8), 0)
    with torch.no_grad():
        fast = one(x, w)
    called = []
    real = FF.FusedEdgeFunction.apply
    monkeypatch.setattr(FF.FusedEdgeFunction, "apply", lambda *a: called.append(1) or real(*a))
    import adarts_kernels.nn.fused as fused_mod
    monkeypatch.setattr(fused_mod, "eager_path_ok", lambda x: False)
    seen = []
    from torch.utils._python_dispatch import TorchDispatchMode

    class Names(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))
    with torch.no_grad(), Names():
        slow = one(x, w)
    assert not called
    assert any(s.startswith("adarts.mixed_sum") for s in seen), sorted(set(seen))
    assert torch.equal(fast, slow)


def test_backend_resolved_once_per_setting(monkeypatch):
    one, _ = edges(8, 1, 4, None, seed=3)
    import adarts_kernels.backend as B
    calls = []
    real = B.resolve
    monkeypatch.setattr(B, "resolve", lambda *a: calls.append(a) or real(*a))
    x = torch.randn(2, 8, 6, 6)
    w = torch.softmax(torch.randn(8), 0)
    for _ in range(3):
        one(x, w)
    assert len(calls) == 1
    monkeypatch.setenv(B.ENV, "reference")
    one(x, w)
    assert len(calls) == 2 and one._backend(x.device) == "reference"


def test_flip_threshold_is_the_same_in_python_and_cxx():
    from pathlib import Path

    from adarts_kernels.nn import units
    src = (Path(__file__).resolve().parents[1] / "csrc" / "edge.cpp").read_text()
    assert f"constexpr int64_t kFlipMinValues = {units.FLIP_MIN_VALUES};" in src


@pytest.mark.parametrize("cxx", PATHS)
def test_bitwise_equal_on_both_sides_of_the_flip_threshold(cxx, monkeypatch):
    """Batch 2 at 8x8 (128 values per channel: one combined convolution backward) and batch 4 at
    32x32 (4096: the flipped forward convolution) against the composed ops."""
    use_path(cxx, monkeypatch)
    for B, S in ((2, 8), (4, 32)):
        one, composed = edges(8, 1, 4, None, seed=B)
        x, alpha, beta, g = inputs(B, 8, S, S, seed=S)
        outs, leaves = run_pair(one, composed, x, alpha, beta, g)
        assert_bitwise(one, composed, outs, leaves)


@pytest.mark.parametrize("cxx", PATHS)
@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("B,S", [(3, 6), (4, 32)])
def test_bitwise_equal_with_the_gpu_layout(cxx, recompute, B, S, monkeypatch):
    """With the GPU's choices injected (NCHW convolutions: ``_channels_last_pays`` -> False; no
    flipped depthwise input gradient: ``_flip_pays`` -> False, which matters from 2048 values
    per channel: the 4x32x32 case; no merged depthwise convolutions: ``_merge_pays`` -> False),
    the C++ and Python host sequences still match the composed ops bit for bit."""
    from adarts_kernels.nn import units
    monkeypatch.setattr(units, "_channels_last_pays", lambda t: False)
    monkeypatch.setattr(units, "_flip_pays", lambda t: False)
    monkeypatch.setattr(units, "_merge_pays", lambda t, channels: False)
    use_path(cxx, monkeypatch)
    one, composed = edges(8, 1, 4, None, seed=21)
    x, alpha, beta, g = inputs(B, 8, S, S, seed=22)
    with EdgeCalls() as calls:
        outs, leaves = run_pair(one, composed, x, alpha, beta, g, recompute=recompute)
    assert_bitwise(one, composed, outs, leaves)
    assert bool(calls.calls) == (cxx != "python")
    for r in outs:
        assert r.is_contiguous()


@pytest.mark.parametrize("cxx", PATHS)
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("merge", [True, False])
def test_bitwise_equal_with_and_without_merged_depthwise(cxx, stride, merge, monkeypatch):
    """The merged depthwise convolutions forced on and off (``_merge_pays``, whose CPU rule
    depends on the size): the C++ and Python host sequences match the composed ops bit for
    bit, with and without recomputation; merged and separate calls agree within rounding."""
    from adarts_kernels.nn import units
    monkeypatch.setattr(units, "_merge_pays", lambda t, channels: merge)
    use_path(cxx, monkeypatch)
    calls = []
    real = units._group_fwd
    monkeypatch.setattr(units, "_group_fwd", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    def run(recompute):
        one, composed = edges(8, stride, 4, None, seed=31)
        x, alpha, beta, g = inputs(3, 8, 8, 8, seed=32)
        outs, leaves = run_pair(one, composed, x, alpha, beta, g, recompute=recompute)
        return one, composed, outs, leaves

    for recompute in (False, True):
        one, composed, outs, leaves = run(recompute)
        assert_bitwise(one, composed, outs, leaves)
    assert bool(calls) == merge      # the composed ops (and the Python sequence) merged or not
    monkeypatch.setattr(units, "_merge_pays", lambda t, channels: not merge)
    other, _, other_outs, other_leaves = run(False)
    torch.testing.assert_close(outs[0], other_outs[0], rtol=1e-4, atol=1e-5)
    for a, b in zip(leaves[0], other_leaves[0]):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5)
    for (n, p), (_, q) in zip(one.named_parameters(), other.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=n)
