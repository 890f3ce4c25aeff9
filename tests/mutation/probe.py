"""Mutation probe: plants each bug of ``tests/mutation/mutants.py`` in a scratch copy of the
repository, one at a time, runs the pytest selection meant to catch it and reports which
were killed (the selection failed), which survived (it passed) and which gave an error
(collection error, build failure, timeout: reported apart).

    python tests/mutation/probe.py                    # every mutant; writes results.{md,json}
    python tests/mutation/probe.py --list             # the list only
    python tests/mutation/probe.py --only NAME ...    # some mutants (write elsewhere: --out)
    python tests/mutation/probe.py --baseline         # first: every selection passes unmutated

How a mutant takes effect in the copy (the working tree is never touched):

- Python (reference, modules, Triton): the tests import the copy (cwd = the copy,
  ``PYTHONPATH=<copy>``; the editable install's finder comes after sys.path). A first step
  checks that ``adarts_kernels`` and its compiled library are the copy's.
- C++ (``csrc/cpu``): ``setup.py build_ext --inplace --force`` in the copy (ninja rebuilds
  the changed sources only), then the tests; afterwards the unmutated library, saved at the
  start, is put back.
- CUDA (``csrc/cuda``): the emulated tests compile the copy's sources themselves (the
  harness finds csrc relative to its own file) into pytest's temporary folder, a fresh one
  per mutant (``--basetemp``), so no build of another mutant is reused.

Tests run with ``OMP_NUM_THREADS=1 ADARTS_REQUIRE_EXT=1 ADARTS_JIT=0``, ``-x -q``, one
timeout per mutant. Slow (tens of minutes on 2 cores): not part of CI.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
from mutants import MUTANTS, Mutant  # noqa: E402

#: Left out of the scratch copy (anywhere in the tree / at its top only).
SKIP_ANYWHERE = {".git", "__pycache__", ".pytest_cache", ".ruff_cache", ".mypy_cache", ".benchmarks"}
SKIP_TOP = {".venv", "venv", "build", "dist", "runs", "data", ".whl", ".gl"}


def copy_tree(dst: Path) -> None:
    def ignore(d, names):
        top = Path(d).resolve() == ROOT
        return [n for n in names
                if n in SKIP_ANYWHERE or (top and (n in SKIP_TOP or n.endswith(".egg-info")))]
    shutil.copytree(ROOT, dst, ignore=ignore, symlinks=True)


def library_files(copy: Path) -> List[Path]:
    """The copy's compiled library and its build record."""
    pkg = copy / "adarts_kernels"
    return sorted(pkg.glob("_C*.so")) + sorted(pkg.glob("_C*.pyd")) + [p for p in [pkg / "_C_build.json"] if p.exists()]


def base_env(copy: Path, scratch: Path) -> Dict[str, str]:
    env = dict(os.environ)
    env.update({
        "PYTHONPATH": str(copy) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""),
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "ADARTS_REQUIRE_EXT": "1",
        "ADARTS_JIT": "0",
        "ADARTS_CACHE_DIR": str(scratch / "adarts_cache"),
        "TRITON_CACHE_DIR": str(scratch / "triton_cache"),
        "PYTHONDONTWRITEBYTECODE": "1",
        "MAX_JOBS": env.get("MAX_JOBS", "2"),
    })
    return env


PREFLIGHT = r"""
import json, sys
import adarts_kernels
from adarts_kernels import _ext
_ext.ensure()
sys.path.insert(0, "tests/cuda_emu")
import emu_harness
print(json.dumps({"package": adarts_kernels.__file__, "has_ext": _ext.HAS_EXT, "ext_path": _ext.EXT_PATH,
                  "ext_error": _ext.EXT_ERROR, "emu_csrc": str(emu_harness.CUDA_DIR)}))
"""


def preflight(copy: Path, env: Dict[str, str]) -> dict:
    """Checks that the tests will import the copy: its package, its library, its csrc/cuda."""
    r = subprocess.run([sys.executable, "-c", PREFLIGHT], cwd=copy, env=env, capture_output=True, text=True,
                       timeout=600)
    if r.returncode != 0:
        raise SystemExit(f"preflight failed:\n{r.stdout}\n{r.stderr}")
    info = json.loads(r.stdout.strip().splitlines()[-1])
    inside = lambda p: p is not None and Path(p).resolve().is_relative_to(copy.resolve())  # noqa: E731
    problems = [k for k in ("package", "ext_path", "emu_csrc") if not inside(info[k])]
    if not info["has_ext"]:
        problems.append(f"no compiled library ({info['ext_error']})")
    if problems:
        raise SystemExit(f"preflight: not the scratch copy's {problems}: {info}")
    return info


def build_cpp(copy: Path, env: Dict[str, str], timeout: int) -> Optional[str]:
    """Rebuilds the copy's C++ library; None when it worked, else the end of the log."""
    try:
        r = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace", "--force"], cwd=copy, env=env,
                           capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"build timed out after {timeout} s"
    if r.returncode != 0:
        return (r.stdout + r.stderr)[-3000:]
    return None


FAIL_RE = re.compile(r"^(FAILED|ERROR) (.+?)(?: - .*)?$", re.M)


def run_tests(m: Mutant, copy: Path, scratch: Path, env: Dict[str, str], timeout: int, tag: str) -> dict:
    base = scratch / "pytest" / tag
    cmd = [sys.executable, "-m", "pytest", *m.tests, "-x", "-q", "-p", "no:cacheprovider", f"--basetemp={base}"]
    if m.k:
        cmd += ["-k", m.k]
    t0 = time.monotonic()
    try:
        r = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout)
        out, code = r.stdout + r.stderr, r.returncode
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        code = None
    secs = time.monotonic() - t0
    shutil.rmtree(base, ignore_errors=True)
    first = FAIL_RE.search(out)
    tail = [ln for ln in out.strip().splitlines() if ln.strip()][-1:] if out.strip() else [""]
    if code == 0:
        status = "survived"
    elif code == 1:
        status = "killed"
    else:
        status = "error"
    return {"status": status, "exit_code": code, "seconds": round(secs, 1),
            "first_failure": first.group(2) if first else None,
            "summary": "timeout" if code is None else tail[0][:300],
            "log_tail": out[-2500:] if status != "killed" else ""}


def git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30).stdout.strip()
    except Exception:
        return ""


def machine() -> dict:
    import importlib.metadata as md
    info = {"host": platform.node(), "platform": platform.platform(), "processor": platform.processor(),
            "cpus": os.cpu_count(), "python": platform.python_version()}
    for pkg in ("torch", "triton"):
        try:
            info[pkg] = md.version(pkg)
        except Exception:
            info[pkg] = None
    return info


def write_results(out: Path, meta: dict, rows: List[dict]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    md_path, json_path = out.with_suffix(".md"), out.with_suffix(".json")
    json_path.write_text(json.dumps({**meta, "results": rows}, indent=1) + "\n")
    counts = {s: sum(r["status"] == s for r in rows) for s in ("killed", "survived", "error")}
    lines = ["# Mutation probe", "",
             f"- date: {meta['date']}", f"- commit: {meta['commit']}{' (uncommitted changes)' if meta['dirty'] else ''}",
             f"- machine: {meta['machine']['host']}, {meta['machine']['cpus']} CPUs, {meta['machine']['platform']}, "
             f"Python {meta['machine']['python']}, torch {meta['machine']['torch']}, triton {meta['machine']['triton']}",
             f"- command: `{meta['command']}`",
             f"- total: {len(rows)} mutants, {counts['killed']} killed, {counts['survived']} survived, "
             f"{counts['error']} errors; {meta['seconds']:.0f} s", ""]
    if meta.get("baseline"):
        bad = [b for b in meta["baseline"] if b["status"] != "survived"]
        lines += [f"- baseline (selections unmutated): {len(meta['baseline']) - len(bad)} of "
                  f"{len(meta['baseline'])} pass", ""]
    lines += ["| mutant | kind | file | result | seconds | first failing test |",
              "|---|---|---|---|---:|---|"]
    for r in rows:
        first = r["first_failure"] or (r["summary"] if r["status"] != "killed" else "")
        lines.append(f"| {r['name']} | {r['kind']} | {r['file']} | {r['status']} | {r['seconds']:.1f} | "
                     f"{first.replace('|', '/')} |")
    md_path.write_text("\n".join(lines) + "\n")


def print_row(r: dict) -> None:
    print(f"{r['name']:<36} {r['kind']:<34} {r['status']:<9} {r['seconds']:>7.1f}s  "
          f"{r['first_failure'] or r['summary']}", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="+", metavar="NAME", help="these mutants only")
    ap.add_argument("--list", action="store_true", help="print the mutants and exit")
    ap.add_argument("--out", default=str(HERE / "results.md"),
                    help="results: PATH.md and PATH.json (default tests/mutation/results.md)")
    ap.add_argument("--timeout", type=int, default=1500, help="seconds per test run (default 1500)")
    ap.add_argument("--build-timeout", type=int, default=1800, help="seconds per C++ build (default 1800)")
    ap.add_argument("--baseline", action="store_true", help="first run every selection unmutated (must pass)")
    ap.add_argument("--scratch", help="folder for the copy (default: a new temporary folder)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch folder")
    args = ap.parse_args(argv)

    chosen = list(MUTANTS)
    if args.only:
        names = {m.name for m in MUTANTS}
        unknown = [n for n in args.only if n not in names]
        if unknown:
            ap.error(f"unknown mutants {unknown}; --list shows them")
        chosen = [m for m in MUTANTS if m.name in args.only]
    if args.list:
        for m in chosen:
            sel = " ".join(m.tests) + (f" -k {m.k!r}" if m.k else "")
            print(f"{m.name:<36} {m.kind:<34} {m.file:<44} {sel}")
        return 0

    scratch = Path(args.scratch or tempfile.mkdtemp(prefix="adarts-mutation-")).resolve()
    scratch.mkdir(parents=True, exist_ok=True)
    copy = scratch / "repo"
    if copy.exists():
        shutil.rmtree(copy)
    t_start = time.monotonic()
    meta = {"date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
            "machine": machine(),
            "command": "python tests/mutation/probe.py" + ("".join(f" {a}" for a in (argv or sys.argv[1:]))),
            "settings": {"OMP_NUM_THREADS": "1", "ADARTS_REQUIRE_EXT": "1", "ADARTS_JIT": "0",
                         "pytest": "-x -q", "timeout_s": args.timeout}}
    rows: List[dict] = []
    out = Path(args.out)
    try:
        print(f"copying {ROOT} to {copy}", flush=True)
        copy_tree(copy)
        env = base_env(copy, scratch)
        info = preflight(copy, env)
        print(f"tests import {info['package']}\n  library {info['ext_path']}\n  emulator sources {info['emu_csrc']}",
              flush=True)
        pristine = scratch / "pristine_lib"
        pristine.mkdir(exist_ok=True)
        libs = library_files(copy)
        for p in libs:
            shutil.copy2(p, pristine / p.name)

        if args.baseline:
            meta["baseline"] = []
            seen = set()
            for m in chosen:
                key = (m.tests, m.k)
                if key in seen:
                    continue
                seen.add(key)
                r = run_tests(m, copy, scratch, env, args.timeout, "baseline")
                r.update({"tests": list(m.tests), "k": m.k})
                meta["baseline"].append(r)
                sel = " ".join(m.tests) + (f" -k {m.k!r}" if m.k else "")
                print(f"baseline {r['status'] == 'survived' and 'passes' or 'FAILS':<6} {r['seconds']:>7.1f}s  {sel}"
                      f"  {'' if r['status'] == 'survived' else r['summary']}", flush=True)

        print(f"\n{'mutant':<36} {'kind':<34} {'result':<9} {'time':>8}  first failing test", flush=True)
        lib_dirty = False
        for m in chosen:
            path = copy / m.file
            original = path.read_text()
            n = original.count(m.find)
            assert n == 1, f"{m.name}: the text to replace occurs {n} times in {m.file}"
            row = {"name": m.name, "kind": m.kind, "file": m.file, "backend": m.backend,
                   "tests": list(m.tests), "k": m.k}
            t0 = time.monotonic()
            path.write_text(original.replace(m.find, m.replace))
            try:
                err = None
                if m.backend == "cpp":
                    lib_dirty = True
                    err = build_cpp(copy, env, args.build_timeout)
                if err is not None:
                    row.update({"status": "error", "exit_code": None, "seconds": round(time.monotonic() - t0, 1),
                                "first_failure": None, "summary": "C++ build failed", "log_tail": err})
                else:
                    row.update(run_tests(m, copy, scratch, env, args.timeout, m.name))
                    row["seconds"] = round(time.monotonic() - t0, 1)   # the build included
            finally:
                path.write_text(original)
                if lib_dirty:   # the unmutated library back (its objects are rebuilt at the next C++ mutant)
                    for p in library_files(copy):
                        p.unlink()
                    for p in pristine.iterdir():
                        shutil.copy2(p, copy / "adarts_kernels" / p.name)
                    lib_dirty = False
            rows.append(row)
            print_row(row)
            meta["seconds"] = time.monotonic() - t_start
            write_results(out, meta, rows)
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    meta["seconds"] = time.monotonic() - t_start
    write_results(out, meta, rows)
    counts = {s: sum(r["status"] == s for r in rows) for s in ("killed", "survived", "error")}
    print(f"\n{len(rows)} mutants: {counts['killed']} killed, {counts['survived']} survived, {counts['error']} errors "
          f"({meta['seconds']:.0f} s); results in {out.with_suffix('.md')} and {out.with_suffix('.json')}")
    for r in rows:
        if r["status"] == "error":
            print(f"\n--- {r['name']} ({r['summary']}):\n{r['log_tail']}")
    return 0 if counts["survived"] == 0 and counts["error"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
