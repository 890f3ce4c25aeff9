#!/usr/bin/env python
"""Supernet side by side: DARTS, PC-DARTS, ADARTS on the plain-PyTorch modules, ADARTS fused,
fused + edge recomputation, and the activation-checkpointing peers (``torch.utils.checkpoint``,
non-reentrant: PC-DARTS per cell and per edge, the ADARTS modules per edge; see
``adarts_kernels.profiling.checkpointed``), one run, one device; the fused ops on the backend ``--impl``.

Per variant: bytes saved for backward per sample (deterministic; not measured for the
checkpointing peers, whose kept inputs escape the saved-tensor hooks); the median time of a
full search step (architecture step + weight step, both optimizers) after 2 warm-up steps at
equal batch, the variants' steps interleaved round-robin so that machine drift hits all of
them alike; the peak of live tensors over one full search step (after a first step, so that
the optimizer states exist), on CPU by default: every storage an op returns counted from
that op until it dies (``adarts_kernels.profiling.PeakMemoryMode``), reported as the peak of
what the step creates (``peak_step_mb``, per sample ``peak_mb_per_sample``) and, separately,
the state the step starts from (``state_mb``: weights, their gradients of the previous step,
buffers, both optimizers' states, the batch) and the peak of both (``peak_total_mb``); on GPU
also ``torch.cuda.max_memory_allocated`` of a search step at batch 64 and 256 and the
largest batch that fits the device (probed with real steps). The PNG shows the bars and the
frontier: peak memory per sample against step time, one point per variant.

    python benchmarks/supernet.py                      # CPU: batch 16, saved bytes, peak, step time
    python benchmarks/supernet.py --device cuda        # GPU: + peak memory, largest batch
    python benchmarks/supernet.py --device cuda --impl triton   # the fused ops on Triton
    python benchmarks/supernet.py --device cuda --dataset imagenet --batch 256 1024   # ImageNet, 224x224
Writes ``supernet_<device>.json`` and ``.png`` into ``--out`` (default benchmarks/results;
``--name`` replaces ``supernet``).
"""
import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from _harness import meta, print_table, write_results  # noqa: E402

from adarts_kernels.backend import IMPLS, resolve  # noqa: E402
from adarts_kernels.nas.architect import Architect  # noqa: E402
from adarts_kernels.nas.search_loop import search_step  # noqa: E402
from adarts_kernels.profiling import PeakMemoryMode, find_max_batch, is_oom, step_state  # noqa: E402
from adarts_kernels.profiling.report import (CHECKPOINT_VARIANTS, VARIANTS, build_supernet,  # noqa: E402
                                             saved_bytes_per_sample)

#: every variant this benchmark knows: the library's, then the checkpointing peers
ALL_VARIANTS = list(VARIANTS) + list(CHECKPOINT_VARIANTS)


def kernels_of(variant):
    """``"fused"`` or ``"modules"``: the kernels the variant's edges run on."""
    return VARIANTS[CHECKPOINT_VARIANTS[variant][0] if variant in CHECKPOINT_VARIANTS else variant][1]


def make_step(variant, batch, device, C, layers, size, amp=False, impl=None, dataset="cifar"):
    net = build_supernet(variant, C, layers, impl=impl, dataset=dataset).to(device)
    if amp:
        net.autocast_dtype = torch.bfloat16
    w = list(net.weight_parameters())
    opt = torch.optim.SGD(w, lr=0.01, momentum=0.9, weight_decay=3e-4)
    arch = Architect(net)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, net.classifier.out_features, (batch,), device=device)

    def step():
        search_step(net, arch, opt, w, x, y, x, y, 0.01, 5.0)
    step.state = lambda: step_state(net, opt, arch.optimizer, x, y)
    return step


def live_peak(step):
    """Peak of live tensors over one search step, after a first one (optimizer states exist):
    ``(created by the step, state it starts from, both)`` in bytes."""
    step()
    with PeakMemoryMode(baseline=step.state()) as pm:
        step()
    return pm.peak_new_bytes, pm.baseline_bytes, pm.peak_bytes


def sync(device):
    if device.type == "cuda":  # GPU-only: timing and peak memory, exercised by benchmarks/device_suite.sh
        torch.cuda.synchronize(device)


def peak_mb(step, device):
    # GPU-only (called for CUDA devices alone): peak memory, exercised by benchmarks/device_suite.sh
    step()                              # optimizer states exist from here on
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    sync(device)
    return torch.cuda.max_memory_allocated(device) / 1e6


COLORS = {"darts": "#999999", "pcdarts": "#4c72b0", "pcdarts-ckpt-cell": "#7f9fd0", "pcdarts-ckpt-edge": "#a9c1e8",
          "adarts": "#dd8452", "adarts-ckpt-edge": "#f0b48a", "adarts-fused": "#55a868",
          "adarts-fused-recompute": "#8172b3"}


def plot(rows, path, title):
    """Top: one bar panel per measured quantity; bottom, where peak and time were both measured:
    the frontier, peak memory per sample against step time, one labelled point per variant."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    panels = [(k, lab) for k, lab in (("mb_per_sample", "saved for backward, MB/sample"),
                                      ("peak_mb_per_sample", "peak of live tensors in a step, MB/sample"),
                                      ("step_ms", "search step, ms (median)"), ("max_batch", "largest batch"))
              if any(r.get(k) for r in rows)]
    front = [r for r in rows if r.get("peak_mb_per_sample") and r.get("step_ms")]
    fig = Figure(figsize=(max(4.2 * len(panels), 9), 4 + (5 if front else 0)))
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(2 if front else 1, len(panels), height_ratios=[4, 5] if front else [1])
    names = [r["variant"] for r in rows]
    colors = [COLORS.get(n, "#555555") for n in names]
    for i, (key, label) in enumerate(panels):
        ax = fig.add_subplot(grid[0, i])
        vals = [r.get(key) or 0 for r in rows]
        bars = ax.bar(range(len(rows)), vals, color=colors)
        for b, v, r in zip(bars, vals, rows):
            text = "n/a" if r.get(key) is None else (f"{v:,.0f}" if v >= 100 else f"{v:.3g}")
            ax.annotate(text, (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
        ax.set_title(label, fontsize=9)
    if front:
        ax = fig.add_subplot(grid[1, :])
        for i, r in enumerate(sorted(front, key=lambda r: r["step_ms"])):
            ax.scatter(r["step_ms"], r["peak_mb_per_sample"], s=60, color=COLORS.get(r["variant"], "#555555"),
                       edgecolor="k", zorder=3)
            left = i % 2 == 1           # labels alternate sides along x, so that neighbours do not overlap
            ax.annotate(f"{r['variant']}\n{r['peak_mb_per_sample']:.2f} MB, {r['step_ms']:,.0f} ms",
                        (r["step_ms"], r["peak_mb_per_sample"]), xytext=(-7 if left else 7, 4),
                        textcoords="offset points", fontsize=8, ha="right" if left else "left")
        ax.set_xlabel("search step, ms (median; lower is better)")
        ax.set_ylabel("peak of live tensors, MB/sample (lower is better)")
        ax.set_ylim(0, max(r["peak_mb_per_sample"] for r in front) * 1.15)
        xs = [r["step_ms"] for r in front]
        ax.set_xlim(min(xs) * 0.8, max(xs) * 1.25)
        ax.grid(alpha=0.3)
        ax.set_title("frontier: peak memory against step time (down and left is better)", fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--variants", nargs="+", default=ALL_VARIANTS, choices=ALL_VARIANTS)
    p.add_argument("--C", type=int, default=16)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--size", type=int, default=None, help="input size (default: 32 for cifar, 224 for imagenet)")
    p.add_argument("--dataset", default="cifar", choices=["cifar", "imagenet"],
                   help="the supernet: CIFAR's, or PC-DARTS's ImageNet supernet (two stride-2 stems, k=2, "
                        "1000 classes)")
    p.add_argument("--batch", type=int, nargs="+", default=None,
                   help="step-time batches (default: 16 on CPU, 64 and 256 on GPU)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--impl", default=None, choices=list(IMPLS),
                   help="backend of the fused ops (default: $ADARTS_KERNELS_IMPL, else auto)")
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast for the timed steps")
    p.add_argument("--no-max-batch", action="store_true", help="GPU: skip the largest-batch probe")
    p.add_argument("--max-batch-limit", type=int, default=8192)
    p.add_argument("--max-batch-variants", nargs="+", default=None, choices=ALL_VARIANTS,
                   help="GPU: probe the largest batch for these only (default: all)")
    p.add_argument("--peak", choices=["auto", "on", "off"], default="auto",
                   help="peak of live tensors over a search step at the first batch (dispatch-mode count; "
                        "auto: on CPU only, GPU has max_memory_allocated)")
    p.add_argument("--name", default=None, help="results file name before _<device> (default: supernet[...])")
    p.add_argument("--note", default=None, help="a note stored in the results' metadata (e.g. machine load)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    a = p.parse_args(argv)
    a.size = a.size or (224 if a.dataset == "imagenet" else 32)
    device = torch.device(a.device)
    # GPU-only branches below (batches 64 and 256, peak memory, the largest batch, empty_cache):
    # exercised by benchmarks/device_suite.sh
    gpu = device.type == "cuda"
    batches = a.batch or ([64, 256] if gpu else [16])
    if any(kernels_of(v) == "fused" for v in a.variants):
        try:
            fused_impl = resolve(a.impl, device)     # an explicit --impl that cannot run: fail now
        except RuntimeError as e:
            p.error(str(e))
    else:
        fused_impl = None
    rows = []
    for v in a.variants:          # memory: deterministic bytes; on GPU peak memory and largest batch
        net = build_supernet(v, a.C, a.layers, impl=a.impl, dataset=a.dataset)
        row = {"variant": v, "impl": fused_impl if kernels_of(v) == "fused" else None,
               # the checkpointing peers keep their inputs outside the saved-tensor hooks: no count
               "mb_per_sample": None if v in CHECKPOINT_VARIANTS else saved_bytes_per_sample(net, a.size, 2) / 1e6}
        if a.peak == "on" or (a.peak == "auto" and not gpu):
            b = batches[0]
            try:
                new, state, total = live_peak(make_step(v, b, device, a.C, a.layers, a.size, a.amp, a.impl,
                                                        a.dataset))
                row.update(peak_batch=b, peak_step_mb=new / 1e6, peak_mb_per_sample=new / 1e6 / b,
                           state_mb=state / 1e6, peak_total_mb=total / 1e6)
            except Exception as e:      # noqa: BLE001 - an out-of-memory row is a result
                if not is_oom(e):
                    raise
                row["peak_step_mb"] = "OOM"
        for b in batches if gpu else []:
            try:
                row[f"peak_mb_b{b}"] = peak_mb(make_step(v, b, device, a.C, a.layers, a.size, a.amp, a.impl,
                                                         a.dataset), device)
            except Exception as e:      # noqa: BLE001 - an out-of-memory row is a result
                if not is_oom(e):
                    raise
                row[f"peak_mb_b{b}"] = "OOM"
            torch.cuda.empty_cache()
        if gpu and not a.no_max_batch and (a.max_batch_variants is None or v in a.max_batch_variants):
            def try_batch(b, v=v):
                s = make_step(v, b, device, a.C, a.layers, a.size, a.amp, a.impl, a.dataset)
                s()
                s()
                sync(device)
            t0 = time.time()
            row["max_batch"], _ = find_max_batch(try_batch, start=64, limit=a.max_batch_limit, granularity=32)
            row["max_batch_probe_s"] = time.time() - t0
        rows.append(row)
        print({k: (round(x, 3) if isinstance(x, float) else x) for k, x in row.items()}, flush=True)
    for b in batches:             # time: the variants' steps interleaved, so drift hits all alike
        steps = {}
        for row in rows:
            try:
                steps[row["variant"]] = make_step(row["variant"], b, device, a.C, a.layers, a.size, a.amp,
                                                  a.impl, a.dataset)
                for _ in range(2):
                    steps[row["variant"]]()
            except Exception as e:      # noqa: BLE001
                if not is_oom(e):
                    raise
                steps.pop(row["variant"], None)
                if gpu:
                    torch.cuda.empty_cache()
        times = {v: [] for v in steps}
        for _ in range(a.reps):
            for v, step in steps.items():
                sync(device)
                t0 = time.perf_counter()
                step()
                sync(device)
                times[v].append((time.perf_counter() - t0) * 1e3)
        for row in rows:
            ts = times.get(row["variant"])
            row[f"step_ms_b{b}"] = statistics.median(ts) if ts else None
        del steps
    for row in rows:
        row["step_ms"] = row.get(f"step_ms_b{batches[0]}")
    base = {r["variant"]: r for r in rows}
    for r in rows:
        for ref in ("pcdarts", "adarts"):
            if ref in base and r.get("step_ms") and base[ref].get("step_ms"):
                r[f"step_vs_{ref}"] = r["step_ms"] / base[ref]["step_ms"]
        if "pcdarts" in base:
            if r["mb_per_sample"] is not None and base["pcdarts"]["mb_per_sample"]:
                r["mem_vs_pcdarts"] = r["mb_per_sample"] / base["pcdarts"]["mb_per_sample"]
            if isinstance(r.get("peak_mb_per_sample"), float) and base["pcdarts"].get("peak_mb_per_sample"):
                r["peak_vs_pcdarts"] = r["peak_mb_per_sample"] / base["pcdarts"]["peak_mb_per_sample"]
            if r.get("max_batch") and base["pcdarts"].get("max_batch"):
                r["max_batch_vs_pcdarts"] = r["max_batch"] / base["pcdarts"]["max_batch"]
    name = a.name or ("supernet" + ("_imagenet" if a.dataset == "imagenet" else "") + ("_amp" if a.amp else "")
            + (f"_{a.impl}" if a.impl not in (None, "auto") else ""))
    extra = {"config": {"C": a.C, "layers": a.layers, "size": a.size, "dataset": a.dataset, "batches": batches,
                        "reps": a.reps, "impl": a.impl, "amp": a.amp, "threads": torch.get_num_threads()},
             "peak_method": "PeakMemoryMode: live storages returned by ops during the second search step "
                            "(architecture + weight step), each from its op until it dies; peak_step_mb excludes "
                            "the state the step starts from (state_mb), peak_total_mb includes it",
             "note": a.note}
    path = write_results(name, rows, device, a.out)
    with open(path) as f:
        doc = json.load(f)
    doc["meta"].update(extra)
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
    keys = ["variant", "impl", "mb_per_sample", "mem_vs_pcdarts", "peak_mb_per_sample", "peak_vs_pcdarts", "state_mb"] + \
        [f"step_ms_b{b}" for b in batches] + ["step_vs_pcdarts", "step_vs_adarts"] + \
        ([f"peak_mb_b{b}" for b in batches] + ["max_batch"] if gpu else [])
    print_table(rows, keys)
    m = meta(device)
    plot(rows, path.replace(".json", ".png"),
         f"{a.dataset.capitalize()} supernet C={a.C}, {a.layers} cells, {a.size}x{a.size}, batch {batches[0]}: {m['device']}, {m['date']}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
