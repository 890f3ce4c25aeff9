#!/usr/bin/env python
"""Data-parallel search steps: collectives per step, and the step time of N ranks against
one process at the same global batch.

    python benchmarks/distributed_step.py                       # CPU, gloo: 1 process vs 2 ranks
    python benchmarks/distributed_step.py --device cuda --ranks 1 --only-ranks   # GPU smoke: NCCL

For each configuration the script starts the workers itself (one plain process; N ranks
through ``torchrun``), runs warm-up search steps (architecture + weight step, first order),
times ``--steps`` steps, and profiles one more step with ``torch.profiler``: every
collective event (``gloo:*`` / ``nccl:*``) is counted with its bytes (shape x dtype, as
recorded) and its purpose, read from the ``adarts:<purpose>`` range it ran in
(:mod:`adarts_kernels.distributed`); collectives outside any such range are
DistributedDataParallel's gradient buckets. Measured, not estimated.

Writes ``<out>.json`` and ``<out>.md`` (default ``benchmarks/results/distributed_<device>``).
On CPU the ranks share the machine's cores: one process gets ``N`` threads, each rank one,
so both use the same cores; compare the ratio, not the seconds.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

DTYPE_BYTES = {"float": 4, "double": 8, "c10::Half": 2, "c10::BFloat16": 2, "long int": 8, "long": 8, "int": 4,
               "signed char": 1, "unsigned char": 1, "bool": 1, "short": 2}


def _parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--ranks", type=int, default=2, help="ranks of the data-parallel run (default: 2)")
    p.add_argument("--batch", type=int, default=32, help="global batch (default: 32)")
    p.add_argument("--C", type=int, default=8)
    p.add_argument("--layers", type=int, default=5)
    p.add_argument("--image", type=int, default=16, help="image side (default: 16)")
    p.add_argument("--edge", default="adarts", choices=["adarts", "pcdarts", "darts"])
    p.add_argument("--impl", default=None, help="backend of the fused ops (default: auto)")
    p.add_argument("--unrolled", action="store_true", help="second-order architecture step")
    p.add_argument("--steps", type=int, default=5, help="timed steps (default: 5)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--only-ranks", action="store_true", help="skip the one-process run")
    p.add_argument("--out", default=None, help="output path without extension")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- worker

def _collectives(prof, ranges):
    """``{purpose: [count, bytes]}`` from the profiler's collective events."""
    out = defaultdict(lambda: [0, 0])
    for e in prof.events():
        if not (e.name.startswith("gloo:") or e.name.startswith("nccl:")):
            continue
        purpose = None
        p = e.cpu_parent
        while p is not None and purpose is None:
            if p.name.startswith("adarts:"):
                purpose = p.name[len("adarts:"):]
            p = p.cpu_parent
        if purpose is None:                  # gloo runs its work on its own threads: by time
            t = e.time_range.start
            for name, start, end in ranges:
                if start <= t <= end:
                    purpose = name
                    break
        purpose = purpose or "ddp_grads"
        nbytes = 0
        for shape, dt in zip(e.input_shapes or [], getattr(e, "input_dtypes", None) or []):
            n = 1
            for s in shape:
                n *= s
            if dt not in DTYPE_BYTES:
                raise SystemExit(f"collective {e.name} on a {dt!r} tensor: add its size to DTYPE_BYTES")
            nbytes += n * DTYPE_BYTES[dt]
        out[f"{purpose} ({e.name})"][0] += 1
        out[f"{purpose} ({e.name})"][1] += nbytes
    return dict(out)


def worker(args) -> None:
    from torch.profiler import ProfilerActivity, profile

    from adarts_kernels import distributed as D
    from adarts_kernels.nas.architect import Architect
    from adarts_kernels.nas.search_loop import search_step
    from adarts_kernels.nas.search_model import SearchNetwork

    ctx, dev = D.setup(args.device)
    device = dev or torch.device(args.device)
    world = ctx.world_size
    if not ctx.active:
        torch.set_num_threads(max(1, args.ranks))
    torch.manual_seed(0)
    model = SearchNetwork(args.C, 10, args.layers, edge=args.edge, impl=args.impl).to(device)
    arch = Architect(model, 6e-4, (0.5, 0.999), 1e-3, unrolled=args.unrolled,
                     reduce=(lambda ts: D.average_(ts, "arch_grads")) if ctx.active else None)
    w = list(model.weight_parameters())
    opt = torch.optim.SGD(w, lr=0.01, momentum=0.9, weight_decay=3e-4)
    net = model
    if ctx.active:
        model.set_selector(D.GlobalSelector())
        net = D.wrap_ddp(model, device, ignore=model.arch_parameter_names())
    D.check_global_batch(args.batch, world)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, 3, args.image, args.image, generator=g)
    y = torch.randint(0, 10, (args.batch,), generator=g)
    lo, hi = D.shard_bounds(args.batch, ctx.rank, world)
    x, y = x[lo:hi].to(device), y[lo:hi].to(device)

    def sync():
        if device.type == "cuda":      # GPU runs: benchmarks/device_suite.sh
            torch.cuda.synchronize(device)
        if ctx.active:
            torch.distributed.barrier()

    def one():
        search_step(net, arch, opt, w, x, y, x, y, 0.01, 5.0)

    for _ in range(args.warmup):
        one()
    sync()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        one()
    sync()
    seconds = (time.perf_counter() - t0) / args.steps

    ranges = []
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        one()
        sync()
    for e in prof.events():
        if e.name.startswith("adarts:"):
            ranges.append((e.name[len("adarts:"):], e.time_range.start, e.time_range.end))
    coll = _collectives(prof, ranges)
    # the barrier of sync() is the benchmark's own, not the step's
    coll = {k: v for k, v in coll.items() if "barrier" not in k}
    if ctx.main:
        with open(args.child, "w") as f:
            json.dump({"world_size": world, "active": ctx.active, "backend": ctx.backend, "device": str(device),
                       "step_seconds": seconds, "collectives": coll,
                       "selecting_edges": len(list(model.selecting_edges())),
                       "weights": sum(p.numel() for p in w), "threads": torch.get_num_threads()}, f)
    D.teardown(ctx)


# ----------------------------------------------------------------------------- driver

def _run(args, nproc: int, distributed: bool) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        res = os.path.join(tmp, "r.json")
        me = os.path.abspath(__file__)
        flags = [f"--device={args.device}", f"--ranks={args.ranks}", f"--batch={args.batch}", f"--C={args.C}",
                 f"--layers={args.layers}", f"--image={args.image}", f"--edge={args.edge}", f"--steps={args.steps}",
                 f"--warmup={args.warmup}", f"--child={res}"] + ([f"--impl={args.impl}"] if args.impl else []) \
            + (["--unrolled"] if args.unrolled else [])
        env = dict(os.environ)
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
            env.pop(k, None)
        if distributed:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", me,
                   *flags]
            env["OMP_NUM_THREADS"] = "1"
        else:
            cmd = [sys.executable, me, *flags]
        p = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if p.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
        with open(res) as f:
            return json.load(f)


def _table(runs: list, args) -> str:
    lines = [f"# Data-parallel search step ({args.edge} supernet C={args.C}, {args.layers} cells, "
             f"{args.image}x{args.image}, global batch {args.batch}, {'second' if args.unrolled else 'first'} order)", "",
             f"Measured {time.strftime('%Y-%m-%d')} with torch {torch.__version__} on {runs[-1]['device']} "
             f"({os.cpu_count()} CPUs seen); {args.steps} timed steps after {args.warmup} warm-up.", "",
             "| run | ranks | threads/rank | step (s) | vs 1 process |", "|---|---:|---:|---:|---:|"]
    base = next((r["step_seconds"] for r in runs if not r["active"]), None)
    for r in runs:
        name = f"{r['backend']} DDP" if r["active"] else "one process"
        ratio = f"{r['step_seconds'] / base:.2f}x" if base else "-"
        lines.append(f"| {name} | {r['world_size']} | {r['threads']} | {r['step_seconds']:.3f} | {ratio} |")
    for r in runs:
        if not r["active"]:
            continue
        lines += ["", f"Collectives in one search step, rank 0 of {r['world_size']} ({r['backend']}; "
                      f"{r['selecting_edges']} channel-selecting edges, {r['weights']:,} weights):", "",
                  "| purpose (event) | count | bytes |", "|---|---:|---:|"]
        tot_n = tot_b = 0
        for k, (n, b) in sorted(r["collectives"].items()):
            lines.append(f"| {k} | {n} | {b:,} |")
            tot_n, tot_b = tot_n + n, tot_b + b
        lines.append(f"| total | {tot_n} | {tot_b:,} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = _parse(argv)
    if args.child:
        worker(args)
        return 0
    runs = []
    if not args.only_ranks:
        runs.append(_run(args, 1, distributed=False))
    runs.append(_run(args, args.ranks, distributed=True))
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"distributed_{args.device}")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out + ".json", "w") as f:
        json.dump({"args": vars(args), "runs": runs, "torch": torch.__version__,
                   "date": time.strftime("%Y-%m-%d")}, f, indent=1)
    text = _table(runs, args)
    with open(out + ".md", "w") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
