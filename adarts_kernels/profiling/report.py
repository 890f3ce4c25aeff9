"""Supernet memory report: bytes saved for backward per sample for every variant, the
largest batch each could fit in a memory budget, and a plot of memory against batch.

``dataset="cifar"`` measures the CIFAR supernet (32x32, k=4, 10 classes by default),
``dataset="imagenet"`` PC-DARTS's ImageNet supernet (stem ``"imagenet"``: 224x224, k=2,
1000 classes by default; see :class:`~adarts_kernels.nas.SearchNetwork`).

Run it as ``python -m adarts_kernels.profiling --help``.
"""
from __future__ import annotations

import os
import resource
from typing import Dict, Iterable, List, Optional, Tuple

import torch

from .saved import saved_activation_bytes

#: variant -> (edge, kernels, recompute); ``kernels="modules"``: the plain-PyTorch modules
VARIANTS: Dict[str, Tuple[str, str, str]] = {
    "darts": ("darts", "modules", "none"),
    "pcdarts": ("pcdarts", "modules", "none"),
    "adarts": ("adarts", "modules", "none"),
    "adarts-fused": ("adarts", "fused", "none"),
    "adarts-fused-recompute": ("adarts", "fused", "edge"),
}

#: the ``torch.utils.checkpoint`` peers (:mod:`.checkpointed`): variant -> (variant of
#: :data:`VARIANTS` it wraps, ``"cell"`` or ``"edge"``). Not in :data:`VARIANTS` and not in
#: the saved-bytes report by default: what ``checkpoint`` keeps escapes the saved-tensor
#: hooks, so their honest number is the peak of live tensors
#: (:class:`~adarts_kernels.profiling.peak.PeakMemoryMode`, ``benchmarks/supernet.py``).
CHECKPOINT_VARIANTS: Dict[str, Tuple[str, str]] = {
    "pcdarts-ckpt-cell": ("pcdarts", "cell"),
    "pcdarts-ckpt-edge": ("pcdarts", "edge"),
    "adarts-ckpt-edge": ("adarts", "edge"),
}

#: dataset -> defaults of the report: input size, k, classes, batch of the measuring forward
DATASETS: Dict[str, Dict[str, int]] = {
    "cifar": {"size": 32, "k": 4, "num_classes": 10, "batch": 4},
    "imagenet": {"size": 224, "k": 2, "num_classes": 1000, "batch": 2},
}


def _dataset(dataset: str) -> Dict[str, int]:
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {list(DATASETS)}")
    return DATASETS[dataset]


def build_supernet(variant: str, C: int = 16, layers: int = 8, k: Optional[int] = None,
                   num_classes: Optional[int] = None, seed: int = 0, impl: Optional[str] = None,
                   dataset: str = "cifar"):
    """The search supernet of ``variant`` (a key of :data:`VARIANTS`) for ``dataset`` (its stem;
    ``k`` and ``num_classes`` default to the dataset's, see :data:`DATASETS`), in training mode;
    ``impl``: the backend of the fused ops (``None``: ``ADARTS_KERNELS_IMPL`` / auto). A key of
    :data:`CHECKPOINT_VARIANTS` gives the network of the variant it wraps, seeded alike, with
    its cells or edges checkpointed."""
    from ..nas import SearchNetwork
    if variant in CHECKPOINT_VARIANTS:
        from .checkpointed import checkpoint_supernet
        base, per = CHECKPOINT_VARIANTS[variant]
        return checkpoint_supernet(build_supernet(base, C, layers, k, num_classes, seed, impl, dataset), per)
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {list(VARIANTS) + list(CHECKPOINT_VARIANTS)}")
    d = _dataset(dataset)
    edge, kernels, recompute = VARIANTS[variant]
    torch.manual_seed(seed)
    return SearchNetwork(C=C, num_classes=d["num_classes"] if num_classes is None else num_classes, layers=layers,
                         edge=edge, k=d["k"] if k is None else k, kernels=kernels, recompute=recompute, impl=impl,
                         stem=dataset).train()


def saved_bytes_per_sample(net, size: int = 32, batch: int = 4, device="cpu") -> float:
    """Bytes one training forward (logits + cross-entropy) keeps for backward, per sample."""
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, net.classifier.out_features, (batch,), device=device)
    return saved_activation_bytes(lambda: net.loss(x, y), module=net) / batch


def state_bytes(net) -> int:
    """Memory a search step needs whatever the batch: weights, their gradients and SGD
    momentum (3x), architecture parameters with gradients and Adam's two moments (4x),
    and the buffers (BN running statistics)."""
    w = sum(p.numel() * p.element_size() for p in net.weight_parameters())
    a = sum(p.numel() * p.element_size() for p in net.arch_parameters())
    b = sum(t.numel() * t.element_size() for t in net.buffers())
    return 3 * w + 4 * a + b


# ---------------------------------------------------------------- CUDA workspace (transient)
# The CUDA kernels take a scratch buffer per call from the caching allocator, freed when the
# call returns: it is no saved activation, but it adds to the peak of the step. The formulas
# are those of the *_workspace_bytes functions of csrc/cuda/*_kernel.cu (kept in step by
# tests/test_cuda_compile.py, which links those functions and compares).
_WS_ALIGN = 256


def _round_up(v: int) -> int:
    return (v + _WS_ALIGN - 1) // _WS_ALIGN * _WS_ALIGN


def cuda_workspace_bytes(B: int, C: int, H: int, W: int, stride: int, k: int, P: int,
                         acc_size: int = 4) -> Dict[str, int]:
    """Bytes of workspace each CUDA launcher of one ADARTS edge takes: x ``(B, C, H, W)``,
    ``n = C // k`` selected channels, hidden size ``C // 2``, ``P`` conv candidates
    (``mixed_sum``'s z), ``acc_size`` the accumulation type's size (4; 8 for float64)."""
    n, Ch = C // k, C // 2
    Ho, Wo = H // stride, W // stride
    planes, Q, outs = B * n, P + 2, max(B * n * Ho * Wo, 1)
    nn_, pl = max(n, 1), max(planes, 1)
    return {
        "attention_score_fwd": _round_up(2 * B * C * acc_size) + _round_up(2 * B * Ch * acc_size)
        + _round_up(B * C * acc_size) + _round_up(C * acc_size),
        "attention_score_bwd": _round_up(2 * B * C * acc_size) + _round_up(B * C * 4)
        + 2 * _round_up(2 * B * Ch * acc_size) + _round_up(2 * B * C * acc_size),
        "attention_gather_bwd": max(C, 1) * 4,
        "attention_writeback_fwd": _round_up(max(C, 1) * 4),
        "attention_writeback_bwd": _round_up(max(C, 1) * 4) + _round_up(max(B * C, 1) * acc_size),
        "mixed_sum_fwd": 2 * _round_up(pl * Q * acc_size) + _round_up(nn_ * Q * acc_size),
        "mixed_sum_bwd": _round_up(pl * (Q + 2) * acc_size) + _round_up(nn_ * (Q + 1) * acc_size)
        + _round_up(nn_ * Q * acc_size) + _round_up(outs * acc_size),
    }


def fused_edge_shapes(net, size: int = 32) -> List[dict]:
    """``{"C", "H", "W", "stride", "k", "P"}`` of every fused ADARTS edge of ``net`` (one forward
    of two samples without gradients, in eval mode so that no running statistic moves; []
    for the plain-PyTorch variants)."""
    from ..nn.fused import FusedAttentionMixedOp
    edges = [m for m in net.modules() if isinstance(m, FusedAttentionMixedOp)]
    if not edges:
        return []
    shapes, hooks = [], []

    def record(mod, args):
        _, C, H, W = args[0].shape
        shapes.append({"C": C, "H": H, "W": W, "stride": mod.stride, "k": mod.k, "P": len(mod.roles.z_columns)})

    for m in edges:
        hooks.append(m.register_forward_pre_hook(record))
    was_training = net.training
    try:
        net.eval()
        with torch.no_grad():
            net(torch.randn(2, 3, size, size))
    finally:
        net.train(was_training)
        for h in hooks:
            h.remove()
    return shapes


def cuda_workspace_peak(shapes: List[dict], batch: int, acc_size: int = 4) -> Tuple[int, int]:
    """(forward, backward) peak transient workspace in bytes at ``batch``: the largest single
    call over the edges (each call frees its workspace when it returns)."""
    fwd = bwd = 0
    for sh in shapes:
        ws = cuda_workspace_bytes(batch, sh["C"], sh["H"], sh["W"], sh["stride"], sh["k"], sh["P"], acc_size)
        fwd = max([fwd] + [v for key, v in ws.items() if key.endswith("_fwd")])
        bwd = max([bwd] + [v for key, v in ws.items() if key.endswith("_bwd")])
    return fwd, bwd


def max_batch_estimate(per_sample: float, fixed: int, budget_bytes: float) -> int:
    """Largest batch whose saved activations and fixed state fit in ``budget_bytes``. An
    estimate: backward's transient buffers and allocator slack come on top (measure with
    :func:`~adarts_kernels.profiling.max_batch.find_max_batch` on the device)."""
    return max(int((budget_bytes - fixed) // per_sample), 0)


def memory_report(variants: Iterable[str] = tuple(VARIANTS), C: int = 16, layers: int = 8, k: Optional[int] = None,
                  size: Optional[int] = None, batch: Optional[int] = None, gib: float = 11.0,
                  impl: Optional[str] = None, dataset: str = "cifar") -> List[dict]:
    """One row per variant of the ``dataset`` supernet (``k``, ``size``, ``batch``: ``None``
    for the dataset's defaults, :data:`DATASETS`): ``mb_per_sample`` (1e6 bytes), ``vs_pcdarts``, ``state_mb``,
    ``max_batch`` (estimate for ``gib`` GiB), ``backends`` (what each fused op ran on,
    ``None`` for the plain-PyTorch variants) and ``cuda_workspace_mb`` (the fused variants'
    transient CUDA workspace at ``max_batch``, forward and backward peaks, the largest call;
    ``None`` for the plain-PyTorch variants; not in ``max_batch``). ``impl``: the backend of
    the fused ops."""
    d = _dataset(dataset)
    size = d["size"] if size is None else size
    batch = d["batch"] if batch is None else batch
    rows = []
    for v in variants:
        net = build_supernet(v, C, layers, k, impl=impl, dataset=dataset)
        backends = net.backends("cpu")    # an explicit impl that cannot run fails here, clearly
        per = saved_bytes_per_sample(net, size, batch)
        fixed = state_bytes(net)
        mb = max_batch_estimate(per, fixed, gib * 2 ** 30)
        shapes = fused_edge_shapes(net, size)
        ws = None
        if shapes:
            fwd, bwd = cuda_workspace_peak(shapes, mb)
            ws = {"fwd": fwd / 1e6, "bwd": bwd / 1e6}
        rows.append({"variant": v, "mb_per_sample": per / 1e6, "state_mb": fixed / 1e6,
                     "max_batch": mb, "backends": backends, "cuda_workspace_mb": ws})
    pc = next((r["mb_per_sample"] for r in rows if r["variant"] == "pcdarts"), None)
    for r in rows:
        r["vs_pcdarts"] = r["mb_per_sample"] / pc if pc else None
    return rows


def format_report(rows: List[dict], gib: float, title: str) -> str:
    lines = [title, "", f"| variant | saved for backward, MB/sample | vs PC-DARTS | largest batch in {gib:g} GiB (est.) "
             "| CUDA workspace, transient, MB (fwd / bwd, largest call, at that batch) |",
             "|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['vs_pcdarts']:.3f}x" if r["vs_pcdarts"] is not None else "-"
        ws = r.get("cuda_workspace_mb")
        wcol = f"{ws['fwd']:.2f} / {ws['bwd']:.2f}" if ws else "-"
        lines.append(f"| {r['variant']} | {r['mb_per_sample']:.2f} | {ratio} | {r['max_batch']:,} | {wcol} |")
    return "\n".join(lines)


def plot_memory(rows: List[dict], gib: float, path: str, max_batch: Optional[int] = None) -> str:
    """PNG of estimated memory (saved activations + fixed state, GiB) against batch size."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    top = max_batch or max(max(r["max_batch"] for r in rows) * 1.2, 64)
    bs = [int(top * i / 100) for i in range(101)]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        ax.plot(bs, [(r["state_mb"] * 1e6 + b * r["mb_per_sample"] * 1e6) / 2 ** 30 for b in bs],
                label=f"{r['variant']} ({r['mb_per_sample']:.1f} MB/sample)")
    ax.axhline(gib, color="k", ls="--", lw=1, label=f"{gib:g} GiB")
    ax.set_xlabel("search batch size")
    ax.set_ylabel("saved activations + state (GiB)")
    ax.set_ylim(0, gib * 1.5)
    ax.set_xlim(0, top)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Supernet memory against batch size")
    fig.tight_layout()
    d = os.path.dirname(path)
    if d:
        os.makedirs(d, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def rss_crosscheck(variant: str, batch: int = 64, C: int = 16, layers: int = 8, k: Optional[int] = None,
                   size: Optional[int] = None, impl: Optional[str] = None, dataset: str = "cifar") -> dict:
    """Compare :func:`saved_activation_bytes` with the process's resident memory growth over
    one training forward on CPU (Linux). Run it in a fresh process with
    ``MALLOC_MMAP_THRESHOLD_=65536`` so that large tensors are returned to the system when
    freed and RSS follows the live tensors. Returns both numbers and their ratio."""
    net = build_supernet(variant, C, layers, k, impl=impl, dataset=dataset)
    size = _dataset(dataset)["size"] if size is None else size
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, net.classifier.out_features, (batch,))
    counted = saved_activation_bytes(lambda: net.loss(x, y), module=net)   # also warms up
    before = _rss_bytes()
    loss = net.loss(x, y)
    after = _rss_bytes()
    del loss
    live = after - before
    return {"variant": variant, "batch": batch, "saved_bytes": counted, "rss_growth": live,
            "ratio": live / counted if counted else float("nan")}
