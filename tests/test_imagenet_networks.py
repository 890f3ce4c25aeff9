"""The ImageNet networks: PC-DARTS's ImageNet search supernet (``SearchNetwork(stem="imagenet")``),
DARTS's NetworkImageNet and PC-DARTS's ImageNet cell; the memory report's ImageNet option."""
import pytest
import torch
import torch.nn as nn

from adarts_kernels.nas import NetworkImageNet, SearchNetwork, count_parameters, genotypes
from adarts_kernels.nas.eval_model import AuxiliaryHeadImageNet
from adarts_kernels.nas.genotypes import PRIMITIVES
from adarts_kernels.nn.operations import FactorizedReduce, ReLUConvBN


def n_params(ps):
    return sum(p.numel() for p in ps)


def output_shapes(net, x, names):
    """``{name: output shape}`` of the submodules ``names`` in one forward of ``x``."""
    shapes, hooks = {}, []
    mods = dict(net.named_modules())
    for name in names:
        hooks.append(mods[name].register_forward_hook(
            lambda m, a, out, name=name: shapes.__setitem__(name, tuple(out.shape))))
    try:
        out = net(x)
    finally:
        for h in hooks:
            h.remove()
    return shapes, out


# ------------------------------------------------------------------ search supernet
def test_search_supernet_layout_at_224():
    """PC-DARTS's ImageNet supernet: C=16, 8 cells, 3 -> 24 -> 48 (56x56) -> 48 (28x28),
    reductions at cells 2 and 5 (28 -> 14 -> 7), k=2, cell 0's preprocess0 a FactorizedReduce."""
    torch.manual_seed(0)
    net = SearchNetwork(C=16, num_classes=1000, layers=8, edge="pcdarts", stem="imagenet").eval()
    assert net.k == 2 and all(e.k == 2 for cell in net.cells for e in cell._ops)
    convs = [m for m in list(net.stem0) + list(net.stem1) if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding) for c in convs] == [
        (3, 24, (3, 3), (2, 2), (1, 1)), (24, 48, (3, 3), (2, 2), (1, 1)), (48, 48, (3, 3), (2, 2), (1, 1))]
    assert not hasattr(net, "stem")
    assert [i for i, c in enumerate(net.cells) if c.reduction] == [2, 5]
    pre0 = [type(c.preprocess0) for c in net.cells]
    assert [i for i, t in enumerate(pre0) if issubclass(t, FactorizedReduce)] == [0, 3, 6]
    assert all(issubclass(t, ReLUConvBN) for i, t in enumerate(pre0) if i not in (0, 3, 6))
    assert net.cells[0].preprocess0.conv_1.in_channels == 48
    names = ["stem0", "stem1"] + [f"cells.{i}" for i in range(8)]
    with torch.no_grad():
        shapes, logits = output_shapes(net, torch.randn(1, 3, 224, 224), names)
    assert shapes["stem0"] == (1, 48, 56, 56) and shapes["stem1"] == (1, 48, 28, 28)
    expected = [(64, 28)] * 2 + [(128, 14)] * 3 + [(256, 7)] * 3
    assert [shapes[f"cells.{i}"] for i in range(8)] == [(1, c, s, s) for c, s in expected]
    assert logits.shape == (1, 1000) and net.classifier.in_features == 256


def test_search_supernet_weights_differ_from_cifar_by_the_stems_only():
    """Same cells and classifier; the CIFAR stem (Conv3x3 3 -> 48, BN) is replaced by the
    ImageNet stems; cell 0's FactorizedReduce has as many weights as the ReLUConvBN it replaces."""
    for edge in ("adarts", "pcdarts", "darts"):
        img = SearchNetwork(C=16, num_classes=1000, layers=8, edge=edge, stem="imagenet")
        cif = SearchNetwork(C=16, num_classes=1000, layers=8, edge=edge, k=2)
        cifar_stem = 9 * 3 * 48 + 2 * 48
        imagenet_stems = 9 * 3 * 24 + 2 * 24 + 9 * 24 * 48 + 2 * 48 + 9 * 48 * 48 + 2 * 48
        assert n_params(img.weight_parameters()) == n_params(cif.weight_parameters()) - cifar_stem + imagenet_stems
        assert n_params(img.arch_parameters()) == n_params(cif.arch_parameters())


VARIANTS = [("adarts", "fused", "none"), ("adarts", "modules", "none"), ("adarts", "fused", "edge"),
            ("pcdarts", "modules", "none"), ("pcdarts", "modules", "edge"), ("darts", "modules", "none")]


@pytest.mark.parametrize("edge,kernels,recompute", VARIANTS)
def test_every_edge_kind_runs_forward_backward(edge, kernels, recompute):
    torch.manual_seed(0)
    net = SearchNetwork(C=8, num_classes=11, layers=4, edge=edge, kernels=kernels, recompute=recompute,
                        stem="imagenet")
    assert net.k == 2 and net.kernels == kernels
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 11, (2,))
    loss = net.loss(x, y)
    loss.backward()
    for p in net.arch_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert all(p.grad is not None for p in net.weight_parameters())


def test_fused_imagenet_supernet_matches_the_modules():
    torch.manual_seed(0)
    ref = SearchNetwork(C=8, num_classes=5, layers=3, edge="adarts", kernels="modules", stem="imagenet")
    net = SearchNetwork(C=8, num_classes=5, layers=3, edge="adarts", kernels="fused", stem="imagenet")
    net.load_state_dict(ref.state_dict())
    x, y = torch.randn(3, 3, 32, 32), torch.randint(0, 5, (3,))
    l_ref, l_net = ref.loss(x, y), net.loss(x, y)
    torch.testing.assert_close(l_net, l_ref, rtol=1e-5, atol=1e-5)
    l_ref.backward()
    l_net.backward()
    for (n, p), (_, q) in zip(ref.named_parameters(), net.named_parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=n)


def test_imagenet_supernet_genotype_derivation():
    torch.manual_seed(0)
    net = SearchNetwork(C=4, num_classes=10, layers=3, edge="pcdarts", stem="imagenet")
    with torch.no_grad():
        net.alphas_normal.zero_()
        net.alphas_normal[:, PRIMITIVES.index("sep_conv_3x3")] = 2.0
        net.alphas_normal[2, PRIMITIVES.index("dil_conv_3x3")] = 3.0
        net.betas_normal.zero_()
    assert net.genotype().normal[2] == ("dil_conv_3x3", 0)
    with torch.no_grad():
        net.betas_normal[2] = -5.0
        net.betas_normal[3] = net.betas_normal[4] = 5.0
    g = genotypes.validate(net.genotype())
    assert [i for _, i in g.normal[2:4]] == [1, 2]
    assert g.normal_concat == [2, 3, 4, 5] and g.reduce_concat == [2, 3, 4, 5]
    darts = SearchNetwork(C=4, num_classes=10, layers=3, edge="darts", stem="imagenet")
    assert darts.betas_normal is None and len(genotypes.validate(darts.genotype()).reduce) == 8
    logits, _ = NetworkImageNet(C=8, num_classes=10, layers=3, genotype=g, image_size=64).eval()(
        torch.randn(1, 3, 64, 64))
    assert logits.shape == (1, 10)


def test_imagenet_supernet_arguments():
    with pytest.raises(ValueError, match="unknown stem 'svhn'"):
        SearchNetwork(C=8, layers=3, stem="svhn")
    assert SearchNetwork(C=8, layers=3).k == 4 and SearchNetwork(C=8, layers=3, stem="imagenet", k=4).k == 4
    with pytest.raises(ValueError, match="not divisible by k=2"):
        SearchNetwork(C=9, layers=3, stem="imagenet")
    net = SearchNetwork(C=4, num_classes=10, layers=3, edge="pcdarts", stem="imagenet")
    with pytest.raises(ValueError, match="divisible by 32"):
        net(torch.randn(1, 3, 48, 48))
    with pytest.raises(ValueError, match=r"expected images of shape \(B, 3, H, W\)"):
        net(torch.randn(1, 1, 32, 32))


# ------------------------------------------------------------------ retrain network
def test_network_imagenet_at_224():
    """C=48, 14 cells: stems 224 -> 56 -> 28, reductions at cells 4 and 9, auxiliary head on
    the 7x7 output of cell 9 (train mode only), (B, 1000) logits."""
    torch.manual_seed(0)
    net = NetworkImageNet(C=48, num_classes=1000, layers=14, auxiliary=True, genotype=genotypes.DARTS_V2)
    assert [i for i, c in enumerate(net.cells) if c.reduction] == [4, 9]
    assert isinstance(net.cells[0].preprocess0, FactorizedReduce)
    net.drop_path_prob = 0.2
    x = torch.randn(2, 3, 224, 224)
    shapes, (logits, aux) = output_shapes(net, x, ["stem0", "stem1", "cells.9", "auxiliary_head.features",
                                                   "global_pooling"])
    assert shapes["stem0"] == (2, 48, 56, 56) and shapes["stem1"] == (2, 48, 28, 28)
    assert shapes["cells.9"] == (2, 4 * 192, 7, 7)
    assert shapes["auxiliary_head.features"] == (2, 768, 1, 1)
    assert shapes["global_pooling"] == (2, 4 * 192, 1, 1)
    assert logits.shape == (2, 1000) and aux.shape == (2, 1000)
    (logits.logsumexp(1).mean() + 0.4 * aux.logsumexp(1).mean()).backward()
    assert all(p.grad is not None for p in net.parameters())
    net.eval()
    with torch.no_grad():
        logits, aux = net(x[:1])
    assert logits.shape == (1, 1000) and aux is None


def test_auxiliary_head_and_adaptive_pool_at_7x7():
    head = AuxiliaryHeadImageNet(768, 1000)
    pool = head.features[1]
    assert isinstance(pool, nn.AvgPool2d) and (pool.kernel_size, pool.stride, pool.padding) == (5, 2, 0)
    assert pool.count_include_pad is False
    # DARTS's AuxiliaryHeadImageNet has no BN after the 2x2 conv: only BatchNorm2d(128)
    assert [m.num_features for m in head.modules() if isinstance(m, nn.BatchNorm2d)] == [128]
    x = torch.randn(3, 768, 7, 7)
    assert tuple(pool(x).shape) == (3, 768, 2, 2)
    net = NetworkImageNet(C=8, num_classes=10, layers=3, genotype=genotypes.PC_DARTS_image)
    torch.testing.assert_close(net.global_pooling(x), nn.AvgPool2d(7)(x))
    assert isinstance(AuxiliaryHeadImageNet(8, 10, spatial=2).features[1], nn.AdaptiveAvgPool2d)


def test_network_imagenet_small_input_and_arguments():
    net = NetworkImageNet(C=8, num_classes=10, layers=3, auxiliary=True, genotype=genotypes.PC_DARTS_image,
                          image_size=64)
    net.drop_path_prob = 0.1
    logits, aux = net(torch.randn(2, 3, 64, 64))
    assert logits.shape == aux.shape == (2, 10)
    with pytest.raises(ValueError, match="divisible by 32"):
        net(torch.randn(2, 3, 40, 40))
    with pytest.raises(ValueError, match="needs a genotype"):
        NetworkImageNet(C=8)
    with pytest.raises(ValueError, match="at least 3 layers"):
        NetworkImageNet(C=8, layers=2, genotype=genotypes.DARTS_V2)


# ------------------------------------------------------------------ parameter counts
def _op_params(op: str, C: int, stride: int) -> int:
    """Weights of one retrain candidate on C channels (affine BN: 2C)."""
    sep = lambda k: 2 * (k * k * C + C * C + 2 * C)      # noqa: E731  two [dw kxk, pw 1x1, BN]
    dil = lambda k: k * k * C + C * C + 2 * C            # noqa: E731  dw kxk, pw 1x1, BN
    return {"max_pool_3x3": 0, "avg_pool_3x3": 0,
            "skip_connect": 0 if stride == 1 else 2 * (C * (C // 2)) + 2 * C,   # FactorizedReduce
            "sep_conv_3x3": sep(3), "sep_conv_5x5": sep(5), "dil_conv_3x3": dil(3), "dil_conv_5x5": dil(5)}[op]


def expected_imagenet_params(genotype, C=48, layers=14, num_classes=1000, auxiliary=False) -> int:
    """NetworkImageNet's weights counted from the layer shapes (bias-free convs, affine BN)."""
    n = 9 * 3 * (C // 2) + 2 * (C // 2) + 9 * (C // 2) * C + 2 * C      # stem0
    n += 9 * C * C + 2 * C                                              # stem1
    c_pp, c_p, c, red_prev, c_aux = C, C, C, True, None
    for i in range(layers):
        red = i in (layers // 3, 2 * layers // 3)
        c = 2 * c if red else c
        n += (2 * c_pp * (c // 2) if red_prev else c_pp * c) + 2 * c      # preprocess0
        n += c_p * c + 2 * c                                            # preprocess1
        for op, inp in (genotype.reduce if red else genotype.normal):
            n += _op_params(op, c, 2 if red and inp < 2 else 1)
        c_pp, c_p, red_prev = c_p, 4 * c, red
        if i == 2 * layers // 3:
            c_aux = c_p
    n += c_p * num_classes + num_classes                                # classifier
    if auxiliary:   # Conv1x1 -> 128, BN, Conv2x2 -> 768 (no BN), Linear(768, classes)
        n += c_aux * 128 + 2 * 128 + 4 * 128 * 768 + 768 * num_classes + num_classes
    return n


@pytest.mark.parametrize("name,millions", [("DARTS_V2", 4.7), ("PC_DARTS_image", 5.3)])
def test_network_imagenet_parameter_counts(name, millions):
    """The published mobile-setting sizes: DARTS 4.7M (DARTS_V2), PC-DARTS 5.3M (its ImageNet cell)."""
    g = genotypes.PUBLISHED[name]
    net = NetworkImageNet(C=48, num_classes=1000, layers=14, auxiliary=True, genotype=g)
    without, with_aux = count_parameters(net), count_parameters(net, exclude_auxiliary=False)
    print(f"{name}: {without:,} weights without the auxiliary head, {with_aux:,} with it")
    assert without == expected_imagenet_params(g)
    assert with_aux == expected_imagenet_params(g, auxiliary=True)
    assert 4.5e6 <= without <= 5.5e6 and round(without / 1e6, 1) == millions
    bare = NetworkImageNet(C=48, num_classes=1000, layers=14, auxiliary=False, genotype=g)
    assert bare.auxiliary_head is None and count_parameters(bare, exclude_auxiliary=False) == without


def test_pc_darts_image_is_published():
    g = genotypes.load("PC_DARTS_image")
    assert g is genotypes.PC_DARTS_image and genotypes.validate(g) is g
    assert g.normal[-1] == ("dil_conv_5x5", 4) and g.reduce[-2:] == [("sep_conv_5x5", 0), ("sep_conv_3x3", 3)]
    assert g != genotypes.PC_DARTS


# ------------------------------------------------------------------ memory report
def test_memory_report_imagenet_option(capsys):
    from adarts_kernels.profiling.__main__ import main, parse_args
    from adarts_kernels.profiling.report import build_supernet, memory_report
    a = parse_args(["--dataset", "imagenet"])
    assert (a.size, a.k, a.batch, a.C, a.layers) == (224, 2, 2, 16, 8)
    a = parse_args([])
    assert (a.size, a.k, a.batch) == (32, 4, 4)
    net = build_supernet("pcdarts", C=8, layers=3, dataset="imagenet")
    assert net.stem_kind == "imagenet" and net.k == 2 and net.classifier.out_features == 1000
    rows = memory_report(["pcdarts", "adarts-fused"], C=8, layers=3, size=32, batch=2, gib=1.0, dataset="imagenet")
    by = {r["variant"]: r for r in rows}
    assert 0 < by["adarts-fused"]["mb_per_sample"] < by["pcdarts"]["mb_per_sample"]
    assert main(["--dataset", "imagenet", "--C", "8", "--layers", "3", "--size", "32", "--batch", "2",
                 "--variants", "pcdarts"]) == 0
    assert "ImageNet supernet C=8, 3 cells, 32x32, k=2" in capsys.readouterr().out
    assert main(["--dataset", "imagenet", "--C", "8", "--layers", "3", "--size", "48"]) == 2
    assert "size by 32 (imagenet)" in capsys.readouterr().err


def test_supernet_benchmark_takes_the_imagenet_supernet(tmp_path):
    """benchmarks/supernet.py --dataset imagenet: saved bytes and step time of the ImageNet
    supernet side by side (tiny here: C=4, 3 cells, 32x32), written to its own results file."""
    import json
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parents[1] / "benchmarks"
    sys.path.insert(0, str(bench))
    try:
        import supernet
    finally:
        sys.path.remove(str(bench))
    supernet.main(["--dataset", "imagenet", "--C", "4", "--layers", "3", "--size", "32", "--batch", "2",
                   "--reps", "1", "--variants", "pcdarts", "adarts-fused", "--impl", "reference",
                   "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "supernet_imagenet_reference_cpu.json").read_text())["rows"]
    assert [r["variant"] for r in rows] == ["pcdarts", "adarts-fused"]
    assert rows[1]["mb_per_sample"] < rows[0]["mb_per_sample"] and rows[1]["step_ms"] > 0
