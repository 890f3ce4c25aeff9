#!/usr/bin/env python
"""Markdown summary of the op benchmark results in benchmarks/results (or --dir):
one row per op and shape, forward + backward time of every provider and the speed-up
over the reference.

    python benchmarks/summarize.py [--device cpu|cuda]
"""
import argparse
import glob
import json
import os


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)
    files = sorted(glob.glob(os.path.join(a.dir, f"bench_*_{a.device}.json")))
    if not files:
        raise SystemExit(f"no bench_*_{a.device}.json in {a.dir}: run benchmarks/bench_<op>.py first")
    for path in files:
        with open(path) as f:
            data = json.load(f)
        meta, rows = data["meta"], data["rows"]
        provs = [p for p in ("reference", "cpp", "cuda", "triton") if any(r["provider"] == p for r in rows)]
        print(f"\n**{rows[0]['op']}** ({meta['device']}, torch {meta['torch']}, {meta['date']}, commit {meta['commit']}), "
              f"forward + backward, median ms ({rows[0]['dtype']}):\n")
        print("| shape B x C x H x W | " + " | ".join(provs) + " | " +
              " | ".join(f"{p} speed-up" for p in provs if p != "reference") + " |")
        print("|---|" + "---|" * (2 * len(provs) - 1))
        for shape in dict.fromkeys(r["shape"] for r in rows):
            by = {r["provider"]: r for r in rows if r["shape"] == shape}
            times = " | ".join(f"{by[p]['fwd_bwd_ms']:.3f}" if p in by else "-" for p in provs)
            ups = " | ".join(f"{by['reference']['fwd_bwd_ms'] / by[p]['fwd_bwd_ms']:.2f}x"
                             if p in by and "reference" in by else "-" for p in provs if p != "reference")
            print(f"| {shape} | {times} | {ups} |")


if __name__ == "__main__":
    main()
