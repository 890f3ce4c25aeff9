"""Edge semantics on small hand-checked cases (docs/method.md sections 2 and 5)."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from adarts_kernels.nn import (PRIMITIVES, AttentionMixedOp, MixedOp, PartialMixedOp, channel_shuffle, make_op,
                               select_channels)


def onehot(name, dtype=torch.float32):
    w = torch.zeros(len(PRIMITIVES), dtype=dtype)
    w[PRIMITIVES.index(name)] = 1.0
    return w


class FixedAttention(nn.Module):
    """Stands in for the attention MLP so that ``a`` is known exactly."""

    def __init__(self, a):
        super().__init__()
        self.a = a

    def forward(self, x):
        return self.a


def edge_with_attention(C, stride, k, a):
    edge = AttentionMixedOp(C, stride, k)
    edge.attention = FixedAttention(a)
    return edge


def test_select_channels_descending_and_ties_to_lower_index():
    s = torch.tensor([0.5, 2.0, 1.0, 2.0, 0.5, 1.0, 3.0, 1.0])
    assert select_channels(s, 4).tolist() == [6, 1, 3, 2]
    assert select_channels(torch.zeros(8), 3).tolist() == [0, 1, 2]
    s = torch.tensor([1.0, 1.0, 1.0, 5.0, 1.0])
    assert select_channels(s, 3).tolist() == [3, 0, 1]


def test_selection_uses_batch_sum_and_writes_back_in_place():
    torch.manual_seed(0)
    B, C, H, W = 3, 8, 4, 4
    x = torch.randn(B, C, H, W)
    a = torch.rand(B, C)
    # make the batch sum pick channels 5 then 2 even though sample 0 alone would prefer others
    a[:, 5] = torch.tensor([0.1, 0.95, 0.99])
    a[:, 2] = torch.tensor([0.2, 0.9, 0.9])
    a[0, 0] = 0.999
    for c in (0, 1, 3, 4, 6, 7):
        a[1:, c] = 0.01
    edge = edge_with_attention(C, 1, 4, a)
    xa = x * a[:, :, None, None]
    s = a.sum(0)
    expected = torch.argsort(-s)[:2]
    out = edge(x, onehot("none"))
    assert edge.last_idx.tolist() == expected.tolist() == [5, 2]
    # 'none': the selected channels are zero, every other channel is x * a, untouched
    keep = [c for c in range(C) if c not in (5, 2)]
    assert torch.equal(out[:, [5, 2]], torch.zeros(B, 2, H, W))
    torch.testing.assert_close(out[:, keep], xa[:, keep], rtol=0, atol=0)
    # skip_connect at stride 1: the selected channels come back to where they came from
    out = edge(x, onehot("skip_connect"))
    torch.testing.assert_close(out, xa, rtol=0, atol=0)


def test_slot_j_holds_jth_highest_channel():
    B, C, H, W = 2, 8, 4, 4
    x = torch.randn(B, C, H, W)
    a = torch.full((B, C), 0.5)
    a[:, 7], a[:, 1] = 0.9, 0.8          # slot 0 <- channel 7, slot 1 <- channel 1
    edge = edge_with_attention(C, 1, 4, a)
    seen = {}
    edge.cands.mixed = lambda xs, w: (seen.setdefault("x_sel", xs), xs * 0 + torch.arange(2.0)[None, :, None, None])[1]
    out = edge(x, onehot("skip_connect"))
    xa = x * a[:, :, None, None]
    torch.testing.assert_close(seen["x_sel"], xa[:, [7, 1]])
    assert torch.all(out[:, 7] == 0.0) and torch.all(out[:, 1] == 1.0)


def test_ties_in_attention_pick_lower_channels():
    B, C, H, W = 2, 8, 2, 2
    x = torch.randn(B, C, H, W)
    a = torch.full((B, C), 0.5)         # all equal: channels 0 and 1
    edge = edge_with_attention(C, 1, 4, a)
    out = edge(x, onehot("none"))
    assert edge.last_idx.tolist() == [0, 1]
    assert torch.equal(out[:, :2], torch.zeros(B, 2, H, W))


def test_stride2_writes_into_maxpooled_attended_input():
    torch.manual_seed(1)
    B, C, H, W = 2, 8, 6, 6
    x = torch.randn(B, C, H, W)
    a = torch.rand(B, C)
    edge = edge_with_attention(C, 2, 4, a)
    out = edge(x, onehot("none"))
    idx = edge.last_idx.tolist()
    base = F.max_pool2d(x * a[:, :, None, None], 2, 2)
    assert out.shape == (B, C, 3, 3)
    keep = [c for c in range(C) if c not in idx]
    torch.testing.assert_close(out[:, keep], base[:, keep], rtol=0, atol=0)
    assert torch.equal(out[:, idx], torch.zeros(B, 2, 3, 3))
    # with max_pool_3x3 the selected slots hold BN(maxpool3x3/2(x_sel)) (BN affine-free, batch stats)
    out = edge(x, onehot("max_pool_3x3"))
    x_sel = (x * a[:, :, None, None])[:, idx]
    y = F.batch_norm(F.max_pool2d(x_sel, 3, 2, 1), None, None, training=True)
    torch.testing.assert_close(out[:, idx], y, rtol=1e-5, atol=1e-5)


def test_edge_weight_scales_everything():
    torch.manual_seed(2)
    x = torch.randn(2, 8, 4, 4)
    w = torch.softmax(torch.randn(8), 0)
    e = torch.tensor(0.3)
    for edge in (AttentionMixedOp(8, 1, 4), PartialMixedOp(8, 1, 4), MixedOp(8, 1), AttentionMixedOp(8, 2, 2)):
        edge.eval()  # deterministic BN
        torch.testing.assert_close(edge(x, w, e), 0.3 * edge(x, w), rtol=1e-6, atol=1e-6)


def test_attention_learns_through_reweighting_only():
    torch.manual_seed(3)
    edge = AttentionMixedOp(8, 1, 4)
    x = torch.randn(4, 8, 4, 4, requires_grad=True)
    alpha = torch.randn(8, requires_grad=True)
    beta = torch.randn((), requires_grad=True)
    out = edge(x, torch.softmax(alpha, 0), torch.sigmoid(beta))
    out.square().sum().backward()
    for p in edge.attention.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert alpha.grad.abs().sum() > 0 and beta.grad.abs() > 0 and x.grad.abs().sum() > 0


def test_attention_module_is_cbam_channel_branch():
    torch.manual_seed(4)
    edge = AttentionMixedOp(8, 1, 4)
    x = torch.randn(3, 8, 5, 5)
    w1 = edge.attention.mlp[0].weight.flatten(1)   # (4, 8)
    w2 = edge.attention.mlp[2].weight.flatten(1)   # (8, 4)
    mlp = lambda v: F.relu(v @ w1.T) @ w2.T        # noqa: E731
    a = torch.sigmoid(mlp(x.mean((2, 3))) + mlp(x.amax((2, 3))))
    torch.testing.assert_close(edge.attention(x), a)
    assert w1.shape == (4, 8) and w2.shape == (8, 4)


def test_pcdarts_edge_shuffle_and_bypass():
    B, C, H, W = 2, 8, 4, 4
    x = torch.randn(B, C, H, W)
    edge = PartialMixedOp(C, 1, 4)
    out = edge(x, onehot("skip_connect"))
    # first C/4 = 2 channels go through skip (identity), then shuffle with 4 groups
    assert torch.equal(out, x[:, [0, 2, 4, 6, 1, 3, 5, 7]])
    out = edge(x, onehot("none"), torch.tensor(0.5))
    # channels 0 and 1 (the mixed part) land at positions 0 and 4 and are zero
    assert torch.equal(out[:, [0, 4]], torch.zeros(B, 2, H, W))
    torch.testing.assert_close(out[:, [1, 2, 3, 5, 6, 7]], 0.5 * x[:, [2, 4, 6, 3, 5, 7]])
    edge2 = PartialMixedOp(C, 2, 4)
    out = edge2(x, onehot("none"), torch.tensor(2.0))
    mp = F.max_pool2d(x, 2, 2)
    assert out.shape == (B, C, 2, 2)
    torch.testing.assert_close(out[:, [1, 2, 3, 5, 6, 7]], 2.0 * mp[:, [2, 4, 6, 3, 5, 7]])


def test_channel_shuffle_is_a_transpose():
    x = torch.arange(12.0).view(1, 12, 1, 1)
    assert channel_shuffle(x, 3).flatten().tolist() == [0, 4, 8, 1, 5, 9, 2, 6, 10, 3, 7, 11]


def test_darts_edge_uses_all_channels():
    x = torch.randn(2, 4, 4, 4)
    edge = MixedOp(4, 1)
    torch.testing.assert_close(edge(x, onehot("skip_connect")), x)
    edge2 = MixedOp(4, 2)
    assert edge2(x, onehot("none")).shape == (2, 4, 2, 2)


def test_edges_make_no_host_sync(monkeypatch):
    """No value is read back to the host in forward or backward (the selection stays on device)."""
    torch.manual_seed(5)
    x = torch.randn(2, 8, 4, 4, requires_grad=True)
    alpha = torch.randn(8, requires_grad=True)
    edges = [AttentionMixedOp(8, 1, 4), AttentionMixedOp(8, 2, 4), PartialMixedOp(8, 2, 4)]

    def refuse(*args, **kwargs):
        raise AssertionError("host synchronisation in an edge")

    for name in ("item", "tolist", "numpy", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    for edge in edges:
        out = edge(x, torch.softmax(alpha, 0), torch.tensor(0.7))
        out.sum().backward()


@pytest.mark.parametrize("cls", [AttentionMixedOp, PartialMixedOp])
def test_c_not_divisible_by_k(cls):
    with pytest.raises(ValueError, match="not divisible by k=4"):
        cls(10, 1, 4)
    with pytest.raises(ValueError, match="k must be a positive integer"):
        cls(8, 1, 0)


def test_bad_inputs_are_named():
    edge = AttentionMixedOp(8, 1, 4)
    w = torch.softmax(torch.randn(8), 0)
    with pytest.raises(ValueError, match=r"expected x of shape \(B, C, H, W\)"):
        edge(torch.randn(8, 4, 4), w)
    with pytest.raises(ValueError, match="built for C=8 channels, got x with 6"):
        edge(torch.randn(2, 6, 4, 4), w)
    with pytest.raises(ValueError, match=r"weights must have shape \(8,\)"):
        edge(torch.randn(2, 8, 4, 4), w[:5])
    with pytest.raises(TypeError, match="floating-point"):
        edge(torch.ones(2, 8, 4, 4, dtype=torch.int64), w)
    with pytest.raises(ValueError, match="even H and W"):
        AttentionMixedOp(8, 2, 4)(torch.randn(2, 8, 5, 5), w)
    with pytest.raises(ValueError, match="stride must be 1 or 2"):
        AttentionMixedOp(8, 3, 4)


def test_unknown_op_name():
    with pytest.raises(ValueError, match="unknown operation 'conv_7x7'"):
        make_op("conv_7x7", 8, 1, affine=False)
