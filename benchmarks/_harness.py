"""Shared setup of the op benchmarks: shapes, providers, timing, bytes moved, output rows.

Timing: on GPU ``triton.testing.do_bench`` (median, ms); on CPU the median of
``torch.utils.benchmark.Timer.blocked_autorange``. Results are reported, never asserted.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
from typing import Callable, List

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from adarts_kernels.backend import why_unavailable  # noqa: E402

#: (C, H) pairs of the search supernet's three stages, at batch 64 and 256; k = 4.
SHAPES = [(B, C, S) for B in (64, 256) for C, S in ((16, 32), (32, 16), (64, 8))]
SMALL_SHAPES = [(8, C, S) for C, S in ((16, 32), (32, 16), (64, 8))]


def element_size(dtype: torch.dtype) -> int:
    return torch.tensor([], dtype=dtype).element_size()


def providers(device: torch.device) -> List[str]:
    return [p for p in ("reference", "cpp", "cuda", "triton") if why_unavailable(p, device.type) is None]


def commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True, stderr=subprocess.DEVNULL,
                                       cwd=os.path.dirname(os.path.abspath(__file__))).strip()
    except Exception:
        return "unknown"


def meta(device: torch.device) -> dict:
    try:
        import triton
        tv = triton.__version__
    except Exception:
        tv = None
    # GPU-only (the device name): a benchmark's metadata, exercised by benchmarks/device_suite.sh
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    return {"date": datetime.date.today().isoformat(), "device": name, "torch": torch.__version__, "triton": tv,
            "commit": commit()}


def time_ms(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":  # GPU-only: CUDA event timing, exercised by benchmarks/device_suite.sh
        import triton.testing
        return float(triton.testing.do_bench(fn, return_mode="median"))
    from torch.utils.benchmark import Timer
    for _ in range(3):  # warm-up: first calls pay for allocation and lazy initialisation
        fn()
    m = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()).blocked_autorange(min_run_time=0.3)
    return m.median * 1e3


def copy_bandwidth(device: torch.device) -> float:
    """Measured device copy bandwidth in GB/s (read + write of a 256 MiB buffer)."""
    # GPU-only (the 256 MiB buffer): a timing line, exercised by benchmarks/device_suite.sh
    n = (256 << 20) // 4 if device.type == "cuda" else (64 << 20) // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device)
    return 2 * src.numel() * 4 / ms / 1e6


def write_results(name: str, rows: List[dict], device: torch.device, out_dir: str) -> str:
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}_{device.type}.json")
    with open(path, "w") as f:
        json.dump({"meta": meta(device), "rows": rows}, f, indent=1)
    return path


def print_table(rows: List[dict], keys: List[str]) -> None:
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for r in rows:
        cells = []
        for k in keys:
            v = r.get(k)
            cells.append(f"{v:.3f}" if isinstance(v, float) else str(v))
        print("| " + " | ".join(cells) + " |")


def plot(rows: List[dict], path: str, title: str) -> None:
    """Bar chart of forward+backward time per shape and provider."""
    from matplotlib.figure import Figure
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    shapes = sorted({r["shape"] for r in rows}, key=lambda s: [int(v) for v in s.replace("x", " ").split()])
    provs = sorted({r["provider"] for r in rows})
    fig = Figure(figsize=(max(6, 1.2 * len(shapes)), 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(111)
    width = 0.8 / max(len(provs), 1)
    for i, p in enumerate(provs):
        ys = [next((r["fwd_bwd_ms"] for r in rows if r["shape"] == s and r["provider"] == p), 0.0) for s in shapes]
        ax.bar([j + i * width for j in range(len(shapes))], ys, width, label=p)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(shapes))])
    ax.set_xticklabels(shapes, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("forward + backward, ms (median)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def run_op_benchmark(name: str, make: Callable, fwd: Callable, bytes_fwd: Callable, bytes_bwd: Callable,
                     argv=None) -> List[dict]:
    """``make(B, C, S, device, dtype) -> inputs``; ``fwd(inputs, impl) -> output tensor``."""
    import argparse
    p = argparse.ArgumentParser(description=f"benchmark adarts {name}: every backend side by side")
    # GPU-only default (cuda where torch sees one), exercised by benchmarks/device_suite.sh
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--small", action="store_true", help="batch 8 only (quick CPU runs)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    a = p.parse_args(argv)
    device, dtype = torch.device(a.device), getattr(torch, a.dtype)
    bw = copy_bandwidth(device)
    rows = []
    for B, C, S in (SMALL_SHAPES if a.small else SHAPES):
        inputs = make(B, C, S, device, dtype)
        ref_ms = None
        for prov in providers(device):
            out = fwd(inputs, prov)
            grad = torch.randn_like(out)

            def fb(inputs=inputs, prov=prov, grad=grad):
                o = fwd(inputs, prov)
                o.backward(grad)
            f_ms = time_ms(lambda inputs=inputs, prov=prov: fwd(inputs, prov), device)
            fb_ms = time_ms(fb, device)
            nbytes = bytes_fwd(B, C, S, dtype) + bytes_bwd(B, C, S, dtype)
            row = {"op": name, "shape": f"{B}x{C}x{S}x{S}", "provider": prov, "dtype": a.dtype,
                   "fwd_ms": f_ms, "fwd_bwd_ms": fb_ms, "GBps": nbytes / fb_ms / 1e6,
                   "frac_copy_bw": nbytes / fb_ms / 1e6 / bw}
            if prov == "reference":
                ref_ms = fb_ms
            row["speedup_vs_reference"] = (ref_ms / fb_ms) if ref_ms else None
            rows.append(row)
            print(f"{name} {row['shape']} {prov}: fwd {f_ms:.3f} ms, fwd+bwd {fb_ms:.3f} ms, "
                  f"{row['GBps']:.1f} GB/s ({100 * row['frac_copy_bw']:.0f}% of copy)", flush=True)
    path = write_results(f"bench_{name}", rows, device, a.out)
    plot(rows, path.replace(".json", ".png"), f"adarts {name} on {meta(device)['device']}")
    print(f"copy bandwidth {bw:.1f} GB/s; wrote {path}")
    print_table(rows, ["shape", "provider", "fwd_ms", "fwd_bwd_ms", "GBps", "frac_copy_bw", "speedup_vs_reference"])
    return rows
