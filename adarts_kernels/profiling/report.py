"""Supernet memory report: bytes saved for backward per sample for every variant, the
largest batch each could fit in a memory budget, and a plot of memory against batch.

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


def build_supernet(variant: str, C: int = 16, layers: int = 8, k: int = 4, num_classes: int = 10,
                   seed: int = 0, impl: Optional[str] = None):
    """The search supernet of ``variant`` (a key of :data:`VARIANTS`), in training mode;
    ``impl``: the backend of the fused ops (``None``: ``ADARTS_KERNELS_IMPL`` / auto)."""
    from ..nas import SearchNetwork
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {list(VARIANTS)}")
    edge, kernels, recompute = VARIANTS[variant]
    torch.manual_seed(seed)
    return SearchNetwork(C=C, num_classes=num_classes, layers=layers, edge=edge, k=k, kernels=kernels,
                         recompute=recompute, impl=impl).train()


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


def max_batch_estimate(per_sample: float, fixed: int, budget_bytes: float) -> int:
    """Largest batch whose saved activations and fixed state fit in ``budget_bytes``. An
    estimate: backward's transient buffers and allocator slack come on top (measure with
    :func:`~adarts_kernels.profiling.max_batch.find_max_batch` on the device)."""
    return max(int((budget_bytes - fixed) // per_sample), 0)


def memory_report(variants: Iterable[str] = tuple(VARIANTS), C: int = 16, layers: int = 8, k: int = 4,
                  size: int = 32, batch: int = 4, gib: float = 11.0, impl: Optional[str] = None) -> List[dict]:
    """One row per variant: ``mb_per_sample`` (1e6 bytes), ``vs_pcdarts``, ``state_mb``,
    ``max_batch`` (estimate for ``gib`` GiB) and ``backends`` (what each fused op ran on,
    ``None`` for the plain-PyTorch variants). ``impl``: the backend of the fused ops."""
    rows = []
    for v in variants:
        net = build_supernet(v, C, layers, k, impl=impl)
        backends = net.backends("cpu")    # an explicit impl that cannot run fails here, clearly
        per = saved_bytes_per_sample(net, size, batch)
        fixed = state_bytes(net)
        rows.append({"variant": v, "mb_per_sample": per / 1e6, "state_mb": fixed / 1e6,
                     "max_batch": max_batch_estimate(per, fixed, gib * 2 ** 30), "backends": backends})
    pc = next((r["mb_per_sample"] for r in rows if r["variant"] == "pcdarts"), None)
    for r in rows:
        r["vs_pcdarts"] = r["mb_per_sample"] / pc if pc else None
    return rows


def format_report(rows: List[dict], gib: float, title: str) -> str:
    lines = [title, "", f"| variant | saved for backward, MB/sample | vs PC-DARTS | largest batch in {gib:g} GiB (est.) |",
             "|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['vs_pcdarts']:.3f}x" if r["vs_pcdarts"] is not None else "-"
        lines.append(f"| {r['variant']} | {r['mb_per_sample']:.2f} | {ratio} | {r['max_batch']:,} |")
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


def rss_crosscheck(variant: str, batch: int = 64, C: int = 16, layers: int = 8, k: int = 4, size: int = 32,
                   impl: Optional[str] = None) -> dict:
    """Compare :func:`saved_activation_bytes` with the process's resident memory growth over
    one training forward on CPU (Linux). Run it in a fresh process with
    ``MALLOC_MMAP_THRESHOLD_=65536`` so that large tensors are returned to the system when
    freed and RSS follows the live tensors. Returns both numbers and their ratio."""
    net = build_supernet(variant, C, layers, k, impl=impl)
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, 10, (batch,))
    counted = saved_activation_bytes(lambda: net.loss(x, y), module=net)   # also warms up
    before = _rss_bytes()
    loss = net.loss(x, y)
    after = _rss_bytes()
    del loss
    live = after - before
    return {"variant": variant, "batch": batch, "saved_bytes": counted, "rss_growth": live,
            "ratio": live / counted if counted else float("nan")}
