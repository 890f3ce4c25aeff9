"""Supernets, retrain networks, derivation and the saved-bytes accounting."""
import pytest
import torch
import torch.nn.functional as F

from adarts_kernels.backend import why_unavailable
from adarts_kernels.nas import EvalNetwork, SearchNetwork, count_parameters, genotypes
from adarts_kernels.nas.genotypes import PRIMITIVES, derive
from adarts_kernels.nn import AttentionMixedOp, FusedAttentionMixedOp
from adarts_kernels.profiling import saved_activation_bytes


def n_params(ps):
    return sum(p.numel() for p in ps)


@pytest.mark.parametrize("edge,weights,arch", [("pcdarts", 299_578, 252), ("darts", 1_930_618, 224)])
def test_baseline_supernet_sizes_are_the_published_ones(edge, weights, arch):
    net = SearchNetwork(C=16, num_classes=10, layers=8, edge=edge, k=4)
    assert n_params(net.weight_parameters()) == weights
    assert n_params(net.arch_parameters()) == arch
    assert n_params(net.parameters()) == weights + arch


def test_adarts_supernet_adds_exactly_the_attention_mlps():
    net = SearchNetwork(C=16, num_classes=10, layers=8, edge="adarts", k=4)
    pc = SearchNetwork(C=16, num_classes=10, layers=8, edge="pcdarts", k=4)
    # one CBAM channel MLP per edge: C*C/2 + C/2*C = C^2 weights for the edge's C channels
    extra = sum(e.C ** 2 for cell in net.cells for e in cell._ops)
    assert n_params(net.weight_parameters()) == n_params(pc.weight_parameters()) + extra
    assert n_params(net.arch_parameters()) == 252
    names = {n for n, _ in net.named_parameters()}
    assert {"alphas_normal", "alphas_reduce", "betas_normal", "betas_reduce"} <= names  # in state_dict
    arch_ids = {id(p) for p in net.arch_parameters()}
    assert not any(id(p) in arch_ids for p in net.weight_parameters())


@pytest.mark.parametrize("name,millions", [("DARTS_V2", 3.3), ("PC_DARTS", 3.6), ("ADARTS_V1", 2.9)])
def test_retrain_network_sizes(name, millions):
    net = EvalNetwork(C=36, num_classes=10, layers=20, auxiliary=True, genotype=genotypes.PUBLISHED[name])
    assert round(count_parameters(net) / 1e6, 1) == millions
    assert count_parameters(net, exclude_auxiliary=False) > count_parameters(net)


@pytest.mark.parametrize("edge", ["adarts", "pcdarts", "darts"])
def test_search_network_forward_backward(edge):
    torch.manual_seed(0)
    net = SearchNetwork(C=8, num_classes=7, layers=4, edge=edge, k=4)
    x = torch.randn(3, 3, 16, 16)
    y = torch.randint(0, 7, (3,))
    logits = net(x)
    assert logits.shape == (3, 7)
    F.cross_entropy(logits, y).backward()
    for p in net.arch_parameters():
        assert p.grad is not None and p.grad.shape == p.shape and p.grad.abs().sum() > 0
    assert all(p.grad is not None for p in net.weight_parameters())


@pytest.mark.parametrize("name", sorted(genotypes.PUBLISHED))
def test_eval_network_forward_backward(name):
    torch.manual_seed(0)
    net = EvalNetwork(C=8, num_classes=10, layers=6, auxiliary=True, genotype=genotypes.PUBLISHED[name])
    net.drop_path_prob = 0.2
    x = torch.randn(2, 3, 32, 32)
    logits, aux = net(x)
    assert logits.shape == (2, 10) and aux.shape == (2, 10)
    (logits.sum() + 0.4 * aux.sum()).backward()
    net.eval()
    logits, aux = net(x)
    assert aux is None


def test_eval_network_small_images_with_auxiliary():
    net = EvalNetwork(C=4, num_classes=10, layers=3, auxiliary=True, genotype=genotypes.PC_DARTS, image_size=16)
    logits, aux = net(torch.randn(2, 3, 16, 16))
    assert logits.shape == aux.shape == (2, 10)


def test_bad_network_arguments():
    with pytest.raises(ValueError, match="not divisible by k=4"):
        SearchNetwork(C=10, edge="adarts", k=4)
    with pytest.raises(ValueError, match="unknown edge kind"):
        SearchNetwork(C=16, edge="gdas")
    net = SearchNetwork(C=4, num_classes=10, layers=3, edge="pcdarts")
    with pytest.raises(ValueError, match=r"expected images of shape \(B, 3, H, W\)"):
        net(torch.randn(2, 1, 16, 16))
    with pytest.raises(ValueError, match="divisible by 4"):
        net(torch.randn(2, 3, 18, 18))
    with pytest.raises(ValueError, match="needs a genotype"):
        EvalNetwork(C=8, genotype=None)
    with pytest.raises(ValueError, match="unknown genotype 'NOPE'"):
        genotypes.load("NOPE")
    bad = genotypes.Genotype(normal=[("conv_9x9", 0)] * 8, normal_concat=[2, 3, 4, 5],
                             reduce=genotypes.PC_DARTS.reduce, reduce_concat=[2, 3, 4, 5])
    with pytest.raises(ValueError, match="unknown operation 'conv_9x9'"):
        EvalNetwork(C=8, genotype=bad)


def test_genotype_json_roundtrip(tmp_path):
    p = tmp_path / "g.json"
    genotypes.save(genotypes.ADARTS_V2, str(p))
    assert genotypes.load(str(p)) == genotypes.from_dict(genotypes.to_dict(genotypes.ADARTS_V2))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a genotype JSON"):
        genotypes.load(str(tmp_path / "bad.json"))


def _w(entries, n_edges=14):
    """Edge-weight matrix with the given {(edge, op_name): value} and 0.01 elsewhere."""
    w = torch.full((n_edges, len(PRIMITIVES)), 0.01)
    for (e, op), v in entries.items():
        w[e, PRIMITIVES.index(op)] = v
    return w


def test_derive_hand_made():
    # node 2: edges 0,1; node 3: edges 2,3,4; node 4: 5..8; node 5: 9..13
    w = _w({
        (0, "sep_conv_3x3"): 0.5, (1, "none"): 0.9, (1, "skip_connect"): 0.2,
        (2, "max_pool_3x3"): 0.3, (3, "dil_conv_5x5"): 0.4, (4, "avg_pool_3x3"): 0.35,
        (5, "none"): 0.99, (6, "sep_conv_5x5"): 0.2, (7, "skip_connect"): 0.2, (8, "dil_conv_3x3"): 0.1,
        (12, "sep_conv_3x3"): 0.6, (13, "skip_connect"): 0.7, (9, "max_pool_3x3"): 0.05,
    })
    gene = derive(w)
    assert gene == [
        ("sep_conv_3x3", 0), ("skip_connect", 1),       # 'none' is never chosen
        ("dil_conv_5x5", 1), ("avg_pool_3x3", 2),       # strongest two, strongest first
        ("sep_conv_5x5", 1), ("skip_connect", 2),       # tie 0.2 vs 0.2: lower input first
        ("skip_connect", 4), ("sep_conv_3x3", 3),
    ]


def test_derive_op_ties_go_to_earlier_primitive():
    w = torch.full((14, 8), 0.1)
    gene = derive(w)
    assert gene[:2] == [("max_pool_3x3", 0), ("max_pool_3x3", 1)]


def test_network_genotype_uses_beta():
    torch.manual_seed(0)
    net = SearchNetwork(C=4, num_classes=10, layers=3, edge="pcdarts")
    with torch.no_grad():
        net.alphas_normal.zero_()
        net.alphas_normal[:, PRIMITIVES.index("sep_conv_3x3")] = 2.0
        net.alphas_normal[2, PRIMITIVES.index("dil_conv_3x3")] = 3.0   # node 3, input 0: strongest alpha
        net.betas_normal.zero_()
    g = net.genotype()
    assert g.normal[2] == ("dil_conv_3x3", 0)
    with torch.no_grad():   # beta now strongly prefers node 3's inputs 1 and 2 over input 0
        net.betas_normal[2] = -5.0
        net.betas_normal[3] = net.betas_normal[4] = 5.0
    g = net.genotype()
    assert [i for _, i in g.normal[2:4]] == [1, 2]
    assert g.normal_concat == [2, 3, 4, 5] and g.reduce_concat == [2, 3, 4, 5]


def test_darts_genotype_without_beta():
    net = SearchNetwork(C=4, num_classes=10, layers=3, edge="darts")
    assert net.betas_normal is None
    g = net.genotype()
    assert len(g.normal) == 8 and all(op != "none" for op, _ in g.normal + g.reduce)


@pytest.mark.parametrize("edge,mb", [("pcdarts", 39.9), ("darts", 125.5)])
def test_saved_bytes_per_sample_match_spec(edge, mb):
    """docs/method.md section 8: bytes saved for backward per sample, C=16, 8 cells, 32x32, float32."""
    torch.manual_seed(0)
    net = SearchNetwork(C=16, num_classes=10, layers=8, edge=edge)
    B = 4
    x, y = torch.randn(B, 3, 32, 32), torch.randint(0, 10, (B,))
    per_sample = saved_activation_bytes(lambda: net.loss(x, y), module=net) / B / 1e6
    assert abs(per_sample - mb) / mb < 0.03, per_sample


def test_saved_bytes_counts_each_storage_once_and_skips_parameters():
    w = torch.nn.Parameter(torch.randn(64, 64))
    x = torch.randn(8, 64)

    def fn():
        h = x @ w                 # saves x (2 KiB) and w (a parameter: not counted)
        return (h * h).sum()      # saves h once, though it is used twice (2 KiB)
    assert saved_activation_bytes(fn) == 2 * 8 * 64 * 4
    with torch.no_grad():
        assert saved_activation_bytes(fn) == 0


FUSED_OPS = ("attention_score", "attention_gather", "attention_writeback", "mixed_sum")
CPU_IMPLS = [n for n in ("reference", "cpp") if why_unavailable(n, "cpu") is None]


def test_kernels_modules_and_the_old_name():
    with pytest.raises(ValueError, match="now called kernels='modules'"):
        SearchNetwork(C=4, layers=3, edge="adarts", kernels="reference")
    with pytest.raises(ValueError, match="unknown kernels 'cuda'"):
        SearchNetwork(C=4, layers=3, kernels="cuda")
    net = SearchNetwork(C=4, layers=3, edge="adarts", kernels="modules")
    assert net.kernels == "modules" and net.backends() is None
    assert all(isinstance(e, AttentionMixedOp) for cell in net.cells for e in cell._ops)
    assert SearchNetwork(C=4, layers=3, edge="darts").kernels == "modules"


def test_impl_reaches_every_fused_edge(monkeypatch):
    with pytest.raises(ValueError, match="unknown backend impl='fastest'"):
        SearchNetwork(C=4, layers=3, impl="fastest")
    net = SearchNetwork(C=4, layers=3, edge="adarts", impl="Reference")
    edges = [e for cell in net.cells for e in cell._ops]
    assert len(edges) == 3 * 14 and all(isinstance(e, FusedAttentionMixedOp) and e.impl == "reference"
                                        for e in edges)
    assert net.impl == "reference" and net.backends() == {op: "reference" for op in FUSED_OPS}
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run here"):
        SearchNetwork(C=4, layers=3, impl="cuda").backends("cpu")
    # impl=None: the environment default, read when the ops run
    default = SearchNetwork(C=4, layers=3)
    assert default.impl is None and all(e.impl is None for cell in default.cells for e in cell._ops)
    monkeypatch.setenv("ADARTS_KERNELS_IMPL", "reference")
    assert default.backends("cpu") == {op: "reference" for op in FUSED_OPS}


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_fused_supernet_on_each_cpu_backend_matches_the_modules(impl):
    """Same function, forward and backward (weights and architecture), whichever backend
    the fused ops run on; odd batch, fresh random inputs."""
    torch.manual_seed(0)
    ref = SearchNetwork(C=4, num_classes=7, layers=3, edge="adarts", kernels="modules")
    net = SearchNetwork(C=4, num_classes=7, layers=3, edge="adarts", kernels="fused", impl=impl)
    net.load_state_dict(ref.state_dict())
    x = torch.randn(3, 3, 12, 12)
    y = torch.randint(0, 7, (3,))
    l_ref, l_net = ref.loss(x, y), net.loss(x, y)
    torch.testing.assert_close(l_net, l_ref, rtol=1e-5, atol=1e-5)
    l_ref.backward()
    l_net.backward()
    for (n, p), (_, q) in zip(ref.named_parameters(), net.named_parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=n)


@pytest.mark.parametrize("edge,kernels", [("darts", "modules"), ("adarts", "modules"), ("adarts", "fused")])
def test_search_network_logits_keep_the_network_dtype(edge, kernels):
    """A float64 network gives float64 logits (no silent cast to float32), the same function
    as the float32 one; under autocast (``autocast_dtype``) the logits come back float32."""
    torch.manual_seed(0)
    net = SearchNetwork(C=4, num_classes=5, layers=3, edge=edge, kernels=kernels)
    net.eval()
    x = torch.randn(2, 3, 8, 8)
    logits32 = net(x)
    assert logits32.dtype == torch.float32
    logits64 = net.double()(x.double())
    assert logits64.dtype == torch.float64
    torch.testing.assert_close(logits64.float(), logits32, rtol=1e-4, atol=1e-5)
    net.float().autocast_dtype = torch.bfloat16
    assert net(x).dtype == torch.float32
