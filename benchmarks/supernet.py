#!/usr/bin/env python
"""Supernet side by side: DARTS, PC-DARTS, ADARTS on the plain-PyTorch modules, ADARTS fused,
fused + edge recomputation, one run, one device; the fused ops on the backend ``--impl``.

Per variant: bytes saved for backward per sample (deterministic); the median time of a full
search step (architecture step + weight step, both optimizers) after 2 warm-up steps at
equal batch, the variants' steps interleaved round-robin so that machine drift hits all of
them alike; on GPU also the peak memory of a search step (``torch.cuda.max_memory_allocated``)
at batch 64 and 256 and the largest batch that fits the device (probed with real steps).

    python benchmarks/supernet.py                      # CPU: batch 16, saved bytes + step time
    python benchmarks/supernet.py --device cuda        # GPU: + peak memory, largest batch
    python benchmarks/supernet.py --device cuda --impl triton   # the fused ops on Triton
    python benchmarks/supernet.py --device cuda --dataset imagenet --batch 256 1024   # ImageNet, 224x224
Writes ``supernet_<device>.json`` and ``.png`` into ``--out`` (default benchmarks/results).
"""
import argparse
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
from adarts_kernels.profiling import find_max_batch, is_oom  # noqa: E402
from adarts_kernels.profiling.report import VARIANTS, build_supernet, saved_bytes_per_sample  # noqa: E402


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
    return step


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


def plot(rows, path, title):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    panels = [("mb_per_sample", "saved for backward, MB/sample")]
    panels += [(k, lab) for k, lab in (("step_ms", "search step, ms (median)"), ("max_batch", "largest batch"))
               if any(r.get(k) for r in rows)]
    fig = Figure(figsize=(4.2 * len(panels), 4))
    FigureCanvasAgg(fig)
    names = [r["variant"] for r in rows]
    for i, (key, label) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        vals = [r.get(key) or 0 for r in rows]
        bars = ax.bar(range(len(rows)), vals, color=["#999", "#4c72b0", "#dd8452", "#55a868", "#8172b3"][:len(rows)])
        for b, v in zip(bars, vals):
            ax.annotate(f"{v:,.0f}" if v >= 100 else f"{v:.3g}", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom",
                        fontsize=7)
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
        ax.set_title(label, fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
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
    p.add_argument("--max-batch-variants", nargs="+", default=None, choices=list(VARIANTS),
                   help="GPU: probe the largest batch for these only (default: all)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    a = p.parse_args(argv)
    a.size = a.size or (224 if a.dataset == "imagenet" else 32)
    device = torch.device(a.device)
    # GPU-only branches below (batches 64 and 256, peak memory, the largest batch, empty_cache):
    # exercised by benchmarks/device_suite.sh
    gpu = device.type == "cuda"
    batches = a.batch or ([64, 256] if gpu else [16])
    if any(VARIANTS[v][1] == "fused" for v in a.variants):
        try:
            fused_impl = resolve(a.impl, device)     # an explicit --impl that cannot run: fail now
        except RuntimeError as e:
            p.error(str(e))
    else:
        fused_impl = None
    rows = []
    for v in a.variants:          # memory: deterministic bytes; on GPU peak memory and largest batch
        net = build_supernet(v, a.C, a.layers, impl=a.impl, dataset=a.dataset)
        row = {"variant": v, "impl": fused_impl if VARIANTS[v][1] == "fused" else None,
               "mb_per_sample": saved_bytes_per_sample(net, a.size, 2) / 1e6}
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
            r["mem_vs_pcdarts"] = r["mb_per_sample"] / base["pcdarts"]["mb_per_sample"]
            if r.get("max_batch") and base["pcdarts"].get("max_batch"):
                r["max_batch_vs_pcdarts"] = r["max_batch"] / base["pcdarts"]["max_batch"]
    name = ("supernet" + ("_imagenet" if a.dataset == "imagenet" else "") + ("_amp" if a.amp else "")
            + (f"_{a.impl}" if a.impl not in (None, "auto") else ""))
    path = write_results(name, rows, device, a.out)
    keys = ["variant", "impl", "mb_per_sample", "mem_vs_pcdarts"] + [f"step_ms_b{b}" for b in batches] + \
        ["step_vs_pcdarts", "step_vs_adarts"] + ([f"peak_mb_b{b}" for b in batches] + ["max_batch"] if gpu else [])
    print_table(rows, keys)
    m = meta(device)
    plot(rows, path.replace(".json", ".png"),
         f"{a.dataset.capitalize()} supernet C={a.C}, {a.layers} cells, {a.size}x{a.size}, batch {batches[0]}: {m['device']}, {m['date']}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
