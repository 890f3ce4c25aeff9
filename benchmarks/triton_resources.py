"""Registers, spills and shared memory of the Triton kernels, compiled ahead of time for
sm_80 and sm_90 (no GPU needed: ``triton.compile`` with a ``GPUTarget`` gives PTX and a cubin).

What is compiled comes from the launchers: each ``adarts_kernels.triton.<op>`` module's
``compile_configs()`` gives every distinct ``(kernel, signature, constexprs, num_warps,
options)`` its launchers can launch (2784 of them; ``options``: further compile options such
as ``maxnreg``). Compiling them all takes hours on two cores (the
``mixed_sum`` dx kernel alone needs 6-20 s a compile), so the default is a *cover*: per
kernel, its heaviest configuration (widest dtype, largest block, every flag on) plus the
fewest further ones that give every value of every choice (dtype, BLOCK, num_warps and each
other constexpr: STRIDE, NZ, HAS_IDENTITY, TRAINING, HAS_BETA, H_TAIL, W_TAIL) at least
once; ``--full`` compiles everything.

Registers and local memory are read from the cubin with the ``cuobjdump`` shipped in the
Triton wheel (a compiled kernel's ``n_regs`` / ``n_spills`` exist only once it is loaded on
a device); ``spills`` is local memory per thread in 4-byte words, Triton's ``n_spills``.
Shared memory is the compiled kernel's ``metadata.shared``.

Usage::

    python benchmarks/triton_resources.py [--full] [--jobs N] [--triton36 DIR]
        the venv's Triton and (when DIR holds it, default .venv/triton36) Triton 3.6, each
        in a subprocess -> benchmarks/results/triton_resources.{md,json}
    python benchmarks/triton_resources.py measure --json OUT [--full] [--jobs N]
        the importable Triton only, rows as JSON (what the first form runs per version)

Install Triton 3.6 beside the venv's (not replacing it)::

    .venv/bin/python -m pip install --no-deps --target .venv/triton36 triton==3.6.0
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = ROOT / "benchmarks" / "results"
MODULES = ("attention_gather", "attention_score", "attention_writeback", "mixed_sum")
ARCHS = (80, 90)
#: the per-block shared-memory limit (opt-in maximum) of each architecture, bytes
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
DEFAULT_TRITON36 = ROOT / ".venv" / "triton36"
_DTYPE_RANK = {"*fp16": 0, "*bf16": 1, "*fp32": 2, "*fp64": 3}

_CONFIGS = []     # (module, kernel, signature, constexprs, num_warps, options), set before the workers fork


# ----------------------------------------------------------------------------- configurations

def all_configs():
    """Every launchable configuration of every kernel, from the modules' ``compile_configs()``."""
    import importlib
    out = []
    for name in MODULES:
        module = importlib.import_module(f"adarts_kernels.triton.{name}")
        out += [(name, *cfg) for cfg in module.compile_configs()]
    return out


def dtype_of(signature) -> str:
    """The op's dtype: the type of the kernel's first floating pointer argument."""
    return next(t for t in signature.values() if t in _DTYPE_RANK)


def choices(cfg):
    """The ``(name, value)`` choices a configuration makes (ACC_DTYPE follows the dtype)."""
    _, _, signature, constexprs, num_warps, _ = cfg
    out = {("dtype", dtype_of(signature)), ("num_warps", num_warps)}
    out |= {(k, int(v)) for k, v in constexprs.items() if k != "ACC_DTYPE"}
    return out


def weight(cfg):
    """Heavier first: dtype width, then BLOCK, then the other constexprs' values."""
    _, _, signature, constexprs, num_warps, _ = cfg
    rest = sorted((k, int(v)) for k, v in constexprs.items() if k not in ("ACC_DTYPE", "BLOCK", "BLOCK_HW"))
    block = constexprs.get("BLOCK", constexprs.get("BLOCK_HW", 0))
    return (_DTYPE_RANK[dtype_of(signature)], block, num_warps, sum(v for _, v in rest), tuple(v for _, v in rest))


def by_kernel(configs) -> dict:
    """``{kernel name: [configuration, ...]}``."""
    out = {}
    for cfg in configs:
        out.setdefault(cfg[1].__name__, []).append(cfg)
    return out


def cover(configs):
    """Per kernel: the heaviest configuration, then greedily the one giving the most choices
    not yet seen (the lighter, quicker to compile, on ties), until every choice of the
    kernel is seen once."""
    picked = []
    for cands in by_kernel(configs).values():
        cands = sorted(cands, key=weight)                 # lightest first
        todo = set().union(*(choices(c) for c in cands))
        chosen = [cands[-1]]
        todo -= choices(cands[-1])
        while todo:
            best = max(range(len(cands)), key=lambda i: (len(choices(cands[i]) & todo), -i))
            chosen.append(cands[best])
            todo -= choices(cands[best])
        picked += chosen
    return picked


def coverage(configs, picked) -> dict:
    """Per kernel: every choice of its configurations, those of the picked ones, and whether
    its heaviest configuration is picked (what the test checks of :func:`cover`)."""
    out = {}
    mine = by_kernel(picked)
    for name, cands in by_kernel(configs).items():
        out[name] = {"choices": sorted(set().union(*map(choices, cands))),
                     "picked_choices": sorted(set().union(*map(choices, mine.get(name, [])))),
                     "heaviest_picked": max(cands, key=weight) in mine.get(name, [])}
    return out


def describe(cfg) -> str:
    """``fp32 BLOCK=256 NZ=5 ... w4``: dtype, constexprs (without ACC_DTYPE), num_warps and
    the further compile options (``maxnreg=255``)."""
    _, _, signature, constexprs, num_warps, options = cfg
    parts = [dtype_of(signature)[1:]]
    parts += [f"{k}={int(v)}" for k, v in sorted(constexprs.items()) if k != "ACC_DTYPE"]
    return " ".join(parts + [f"w{num_warps}"] + [f"{k}={v}" for k, v in sorted(options.items())])


# ----------------------------------------------------------------------------- compiling

def _resource_usage(cubin: bytes):
    """``(registers, local bytes per thread)`` of the one kernel in ``cubin``, by cuobjdump."""
    import triton
    tool = triton.knobs.nvidia.cuobjdump.path
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True,
                              check=True, timeout=120).stdout
    m = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:\d+\s+LOCAL:(\d+)", text)
    if m is None:
        raise RuntimeError(f"cuobjdump gave no resource line:\n{text}")
    return int(m.group(1)), int(m.group(2)) + int(m.group(3))


def _shared_bytes(kernel) -> int:
    """Shared memory of a compiled kernel (``metadata.shared``; older Triton: ``kernel.shared``)."""
    meta = getattr(kernel, "metadata", None)
    shared = getattr(meta, "shared", None)
    if shared is None and isinstance(meta, dict):
        shared = meta.get("shared")
    if shared is None:
        shared = kernel.shared
    return int(shared)


def _compile_one(job):
    index, arch = job
    import triton
    from triton.backends.compiler import GPUTarget
    warnings.simplefilter("ignore")
    module, kernel, signature, constexprs, num_warps, options = _CONFIGS[index]
    t0 = time.perf_counter()
    compiled = triton.compile(triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                              target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps, **options})
    seconds = time.perf_counter() - t0
    regs, local_bytes = _resource_usage(compiled.asm["cubin"])
    return {"module": module, "kernel": kernel.__name__, "config": describe(_CONFIGS[index]),
            "arch": f"sm_{arch}", "triton": triton.__version__, "registers": regs,
            "spills": local_bytes // 4, "local_bytes": local_bytes, "shared": _shared_bytes(compiled),
            "shared_limit": SHARED_LIMIT[arch], "num_warps": num_warps, "compile_s": round(seconds, 3)}


def measure(full: bool = False, archs=ARCHS, jobs: int = 0) -> dict:
    """Compile (a cover of, or ``full``: all) the configurations with the importable Triton,
    concurrently in ``jobs`` processes (0: one per CPU); the rows and timings."""
    import multiprocessing

    import triton
    warnings.simplefilter("ignore")
    t0 = time.perf_counter()
    configs = all_configs()
    selected = configs if full else cover(configs)
    t_enum = time.perf_counter() - t0
    _CONFIGS[:] = selected
    # the slowest first, so the pool ends together: mixed_sum before the rest, wide blocks first
    order = sorted(range(len(selected)), key=lambda i: (selected[i][0] != "mixed_sum", [-x for x in weight(selected[i])[:2]]))
    work = [(i, arch) for i in order for arch in archs]
    jobs = jobs or os.cpu_count() or 1
    with multiprocessing.get_context("fork").Pool(jobs) as pool:
        rows = pool.map(_compile_one, work, chunksize=1)
    rows.sort(key=lambda r: (MODULES.index(r["module"]), r["kernel"], r["config"], r["arch"]))
    return {"triton": triton.__version__, "full": full, "configs_total": len(configs), "configs_compiled": len(selected),
            "archs": [f"sm_{a}" for a in archs], "jobs": jobs, "enumerate_s": round(t_enum, 2),
            "seconds": round(time.perf_counter() - t0, 2), "coverage": coverage(configs, selected), "rows": rows}


def run_version(pythonpath=None, full: bool = False, jobs: int = 0, timeout: float = 3600) -> dict:
    """:func:`measure` in a fresh interpreter (the venv's Python), without the Triton
    interpreter mode, with ``pythonpath`` (a Triton installed with ``--target``) ahead of the
    venv's packages; the parsed result."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([*([str(pythonpath)] if pythonpath else []), str(ROOT)])
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "measure", "--json", str(out), "--jobs", str(jobs)]
        if full:
            cmd.append("--full")
        proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
        return json.loads(out.read_text())


def problems(rows, allow_spills=()) -> list:
    """What fails: a spill (local memory; not of the kernels named in ``allow_spills``),
    shared memory over the architecture's limit."""
    out = []
    for r in rows:
        where = f"{r['kernel']} [{r['config']}] {r['arch']} triton {r['triton']}"
        if r["spills"] > 0 and r["kernel"] not in allow_spills:
            out.append(f"{where}: {r['local_bytes']} bytes of local memory per thread ({r['spills']} spills)")
        if r["shared"] > r["shared_limit"]:
            out.append(f"{where}: {r['shared']} bytes of shared memory > {r['shared_limit']}")
        if r["registers"] > 255:
            out.append(f"{where}: {r['registers']} registers")
    return out


# ----------------------------------------------------------------------------- tables

def markdown(results) -> str:
    """One row per (kernel, configuration), one column per (Triton, arch): registers / spills / shared bytes."""
    cols = [(res["triton"], arch) for res in results for arch in res["archs"]]
    cells = {}
    for res in results:
        for r in res["rows"]:
            cells.setdefault((r["kernel"], r["config"]), {})[(r["triton"], r["arch"])] = \
                f"{r['registers']} / {r['spills']} / {r['shared']}"
    lines = ["# Triton kernels compiled for sm_80 and sm_90: registers / spills / shared memory (bytes)", ""]
    for res in results:
        kind = "every configuration" if res["full"] else "a cover of the configurations"
        lines.append(f"- Triton {res['triton']}: {res['configs_compiled']} of {res['configs_total']} launchable "
                     f"configurations ({kind}) x {len(res['archs'])} archs, {res['seconds']} s with {res['jobs']} processes")
    spills = [p for res in results for p in problems(res["rows"]) if "local memory" in p]
    lines += ["", f"Spills ({len(spills)}):", ""] + [f"- {p}" for p in spills]
    lines += ["", "| kernel | config | " + " | ".join(f"{t} {a}" for t, a in cols) + " |",
              "|---|---|" + "---|" * len(cols)]
    def natural(item):       # BLOCK=64 before BLOCK=256
        return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", " ".join(item[0]))]
    for (kernel, config), row in sorted(cells.items(), key=natural):
        lines.append(f"| {kernel} | {config} | " + " | ".join(row.get(c, "-") for c in cols) + " |")
    return "\n".join(lines) + "\n"


def write_tables(results, out_dir: Path = OUT_DIR) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "triton_resources.json").write_text(json.dumps(results, indent=1) + "\n")
    (out_dir / "triton_resources.md").write_text(markdown(results))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("mode", nargs="?", default="all", choices=("all", "measure"))
    ap.add_argument("--full", action="store_true", help="every configuration, not a cover")
    ap.add_argument("--jobs", type=int, default=0, help="compile processes (0: one per CPU)")
    ap.add_argument("--json", type=Path, help="measure: where to write the rows")
    ap.add_argument("--triton36", type=Path, default=DEFAULT_TRITON36, help="a --target install of triton 3.6")
    ap.add_argument("--out", type=Path, default=OUT_DIR)
    args = ap.parse_args(argv)
    if args.mode == "measure":
        res = measure(args.full, jobs=args.jobs)
        text = json.dumps(res)
        args.json.write_text(text) if args.json else print(text)
        return 0
    results = [run_version(None, args.full, args.jobs)]
    if (args.triton36 / "triton").is_dir():
        results.append(run_version(args.triton36, args.full, args.jobs))
    else:
        print(f"no Triton 3.6 under {args.triton36}: venv Triton only", file=sys.stderr)
    write_tables(results, args.out)
    bad = [p for res in results for p in problems(res["rows"])]
    for res in results:
        print(f"triton {res['triton']}: {res['configs_compiled']}/{res['configs_total']} configs x "
              f"{len(res['archs'])} archs in {res['seconds']} s")
    print("\n".join(bad) if bad else "no spills, shared memory within the limits")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
