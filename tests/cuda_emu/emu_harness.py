"""Builds csrc/cuda/*_kernel.cu for the CPU emulation (tests/cuda_emu/cuda_emu.h) and calls the
real launchers of csrc/cuda/kernels.h through ctypes.

``build(out_dir, ...)`` rewrites the sources (launch syntax, ``__shared__`` declarations, vector
casts, device asserts; optionally one injected bug), generates an ``extern "C"`` wrapper around
every launcher declared in kernels.h, compiles with g++ (objects cached by content) and returns
the path of the shared library. ``Emulated(path)`` loads it; its methods take and return CPU
tensors, allocate every output and workspace at its exact size and fill them with garbage
(NaN, 0xFF bytes) first; ``Emulated(path, schedule=...)`` runs every launch under one of the
emulator's schedules (``SCHEDULES``: reverse and seeded random thread orders per barrier interval,
shared-memory stores delayed to the next barrier). ``Cuda()`` has the same methods on top of ``torch.ops.adarts_C`` (a CUDA
build on a GPU), so that one case list runs on both.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

ROOT = Path(__file__).resolve().parents[2]
CUDA_DIR = ROOT / "csrc" / "cuda"
EMU_DIR = Path(__file__).resolve().parent
OPS = ("attention_score", "attention_gather", "attention_writeback", "mixed_sum")
DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}

# ----------------------------------------------------------------------------- the rewrite

LAUNCH_RE = re.compile(r"([A-Za-z_]\w*(?:<[^;{}()<>]*>)?)\s*<<<(.*?)>>>\s*\(", re.S)
EXTERN_SHARED_RE = re.compile(r"extern\s+__shared__\s+(?:__align__\(\s*\d+\s*\)\s+)?([^;]*?)\s+(\w+)\s*\[\s*\]\s*;")
SHARED_RE = re.compile(r"__shared__\s+([^;]*?)\s+(\w+)\s*((?:\[[^\]]*\])+)\s*;")
CAST_RE = re.compile(r"\breinterpret_cast<([^;<>]*(?:<[^;<>]*>)?[^;<>]*\*)\s*>")
ASSERT_RE = re.compile(r"(?<![\w.])assert\s*\(")

#: Bugs the harness can inject (in the rewritten copy; the sources stay as they are):
#: name -> (file, text, replacement); the text must occur exactly once. Each keeps the line count.
INJECTIONS: Dict[str, Tuple[str, str, str]] = {
    # (a) the GEMM tile is read before every thread has stored its part of it
    "drop_sync": ("attention_score_kernel.cu",
                  "    __syncthreads();\n#pragma unroll\n    for (int kk = 0; kk < TS; ++kk)",
                  "    /* __syncthreads() removed */\n#pragma unroll\n    for (int kk = 0; kk < TS; ++kk)"),
    # (b) one lane of each group leaves the gather backward before the reduction's shuffles
    "lane_exit": ("attention_gather_kernel.cu",
                  "  sum = warp_mode ? warp_sum(sum) : block_sum(sum, sh);",
                  "  if (s.rank == 5) return; sum = warp_mode ? warp_sum(sum) : block_sum(sum, sh);"),
    # (c) the alignment test accepts 2-byte alignment: 16-byte vector loads of misaligned data
    "misalign": ("common.cuh",
                 "inline bool aligned_to(const void* p, size_t bytes) {",
                 "inline bool aligned_to(const void* p, size_t bytes) { bytes = bytes > 2 ? 2 : bytes;"),
}


#: Schedules of the emulator (tests/cuda_emu/cuda_emu.cpp), the syntax of ADARTS_EMU_SCHED:
#: "serial" (the default: one thread at a time, round robin in thread order), "reverse" and
#: "random:SEED" (greedy: the first ready thread of the reverse order / of a seeded permutation
#: drawn per barrier interval runs), each optionally "+delayed" (a shared-memory store becomes
#: visible to the other threads only at the next __syncthreads).
SCHEDULES = ("serial", "reverse", "random:1", "random:2", "serial+delayed", "random:3+delayed")

SYNC_RE = re.compile(r"__syncthreads\(\)\s*;")


def barriers() -> List[Tuple[str, int]]:
    """Every ``__syncthreads();`` of csrc/cuda: (file name, line), in file and line order."""
    out = []
    for path in sorted(CUDA_DIR.glob("*.cu*")):
        for i, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("//", 1)[0]
            out += [(path.name, i)] * len(SYNC_RE.findall(code))
    return out


def drop_barrier(texts: Dict[str, str], fname: str, line: int) -> None:
    """Removes the ``__syncthreads();`` at ``fname:line`` of the (rewritten) sources in place."""
    lines = texts[fname].split("\n")
    code = lines[line - 1]
    assert len(SYNC_RE.findall(code.split("//", 1)[0])) == 1, f"{fname}:{line}: not one __syncthreads: {code!r}"
    lines[line - 1] = SYNC_RE.sub("/* __syncthreads() removed */", code, count=1)
    texts[fname] = "\n".join(lines)


def rewrite(text: str) -> str:
    """CUDA-only syntax into calls of the emulator (cuda_emu.h); the line count is kept."""
    def launch(m):
        name, cfg = m.group(1), m.group(2)
        rest = m.string[m.end():].lstrip()
        sep = "" if rest.startswith(")") else ", "
        return f'::emu::Launch("{name}", __FILE__, __LINE__, {cfg}).run({name}{sep}'

    text = LAUNCH_RE.sub(launch, text)
    text = EXTERN_SHARED_RE.sub(lambda m: f"{m.group(1)}* {m.group(2)} = static_cast<{m.group(1)}*>"
                                          f"(::emu::dynamic_smem());", text)
    text = SHARED_RE.sub(lambda m: f"auto& {m.group(2)} = ::emu::shared_var<{m.group(1)}{m.group(3)}, "
                                   f"__COUNTER__>();", text)
    text = CAST_RE.sub(lambda m: f"::emu::aligned_cast<{m.group(1)}>", text)
    text = ASSERT_RE.sub("ADARTS_EMU_ASSERT(", text)
    assert "<<<" not in text and "__shared__" not in text, "a CUDA construct the rewrite does not know"
    return text


# ----------------------------------------------------------------------------- the wrapper

DECL_RE = re.compile(r"^(size_t|int)\s+(\w+)\(([^;]*?)\);", re.M | re.S)


class Launcher:
    """One function of kernels.h: its return type and parameters (C type, name)."""

    def __init__(self, ret: str, name: str, params: List[Tuple[str, str]]):
        self.ret, self.name, self.params = ret, name, params

    def c_param(self, ty: str, name: str) -> str:
        return {"DType": f"int {name}", "cudaStream_t": f"void* {name}"}.get(ty, f"{ty} {name}")

    def c_arg(self, ty: str, name: str) -> str:
        return {"DType": f"static_cast<adarts::cuda::DType>({name})",
                "cudaStream_t": f"static_cast<cudaStream_t>({name})"}.get(ty, name)

    def ctypes_sig(self):
        def one(ty):
            if "*" in ty or ty == "cudaStream_t":
                return ctypes.c_void_p
            return {"DType": ctypes.c_int, "int": ctypes.c_int, "int64_t": ctypes.c_int64,
                    "double": ctypes.c_double, "size_t": ctypes.c_size_t}[ty]
        return one(self.ret), [one(ty) for ty, _ in self.params]


def launchers() -> List[Launcher]:
    """Every launcher declared in csrc/cuda/kernels.h."""
    text = (CUDA_DIR / "kernels.h").read_text()
    text = re.sub(r"//[^\n]*", "", text)
    out = []
    for m in DECL_RE.finditer(text):
        params = []
        for p in m.group(3).split(","):
            p = " ".join(p.split())
            pm = re.fullmatch(r"(.*?)\s*(\w+)", p)
            assert pm, p
            params.append((pm.group(1).strip(), pm.group(2)))
        out.append(Launcher(m.group(1), m.group(2), params))
    assert len(out) >= 10, "kernels.h: fewer launchers than expected"
    return out


def wrapper_source(ops: Sequence[str]) -> str:
    lines = ['#include "kernels.h"', 'extern "C" {']
    for f in launchers():
        if not any(f.name.startswith(op) for op in ops):
            continue
        params = ", ".join(f.c_param(t, n) for t, n in f.params)
        args = ", ".join(f.c_arg(t, n) for t, n in f.params)
        lines.append(f"{f.ret} emu_{f.name}({params}) {{ return adarts::cuda::{f.name}({args}); }}")
    lines.append("}")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- compiling

BASE_FLAGS = ["-O1", "-std=c++17", "-pthread", "-fPIC", "-g0", "-Wall", "-Wno-unknown-pragmas", "-Wno-unused-function"]
SANITIZE = {
    None: [],
    "address": ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer"],
    "thread": ["-fsanitize=thread"],
}


def runtime_library(sanitize: Optional[str]) -> Optional[str]:
    """The sanitizer runtime to preload into a Python process that loads such a build."""
    name = {"address": "libasan.so", "thread": "libtsan.so"}.get(sanitize)
    if name is None:
        return None
    path = subprocess.run(["g++", f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
    return path if os.path.isabs(path) else None


def build(out_dir: Path, ops: Sequence[str] = OPS, inject: Optional[str] = None, sanitize: Optional[str] = None,
          extra: Sequence[Path] = (), jobs: int = 2, no_barrier: Optional[Tuple[str, int]] = None) -> Path:
    """The emulated kernels of ``ops`` (and the rewritten ``extra`` sources) as a shared
    library under ``out_dir`` (objects cached there by content and flags). ``no_barrier``:
    (file, line) of one ``__syncthreads();`` of csrc/cuda (see :func:`barriers`) left out."""
    if shutil.which("g++") is None:
        raise RuntimeError("g++ not found")
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = hashlib.sha1(repr((sorted(ops), inject, sanitize, [str(p) for p in extra], no_barrier)).encode()
                       ).hexdigest()[:12]
    src = out_dir / f"src-{tag}"
    src.mkdir(exist_ok=True)
    texts = {"kernels.h": (CUDA_DIR / "kernels.h").read_text(),
             "common.cuh": rewrite((CUDA_DIR / "common.cuh").read_text())}
    for op in ops:
        texts[f"{op}_kernel.cu"] = rewrite((CUDA_DIR / f"{op}_kernel.cu").read_text())
    for p in extra:
        texts[p.name] = rewrite(p.read_text())
    if inject is not None:
        fname, old, new = INJECTIONS[inject]
        assert fname in texts, f"{inject} changes {fname}, which this build leaves out"
        before = texts[fname]
        old, new = rewrite(old), rewrite(new)
        assert before.count(old) == 1, f"{inject}: the text to change is not found once in {fname}"
        texts[fname] = before.replace(old, new)
    if no_barrier is not None:
        assert no_barrier[0] in texts, f"{no_barrier[0]}: not in this build"
        drop_barrier(texts, *no_barrier)
    texts["emu_wrappers.cpp"] = wrapper_source(ops)
    for name, text in texts.items():
        p = src / name
        if not p.exists() or p.read_text() != text:
            p.write_text(text)
    flags = BASE_FLAGS + SANITIZE[sanitize] + [f"-I{src}", f"-I{EMU_DIR / 'include'}", f"-I{EMU_DIR}"]
    if inject is not None:
        flags.append(f"-DADARTS_EMU_INJECT={inject}")
    # each object is keyed by its text, the headers it includes and the flags (not the -D tag)
    emu_h = (EMU_DIR / "cuda_emu.h").read_text()
    kernel_deps = texts["kernels.h"] + texts["common.cuh"] + emu_h
    units = [(src / f"{op}_kernel.cu", texts[f"{op}_kernel.cu"], kernel_deps) for op in ops]
    units += [(src / p.name, texts[p.name], kernel_deps) for p in extra]
    units += [(src / "emu_wrappers.cpp", texts["emu_wrappers.cpp"], texts["kernels.h"]),
              (EMU_DIR / "cuda_emu.cpp", (EMU_DIR / "cuda_emu.cpp").read_text(), emu_h)]
    objs = []
    cmds = []
    for path, text, deps in units:
        key = hashlib.sha1((text + deps + " ".join(BASE_FLAGS + SANITIZE[sanitize])).encode()).hexdigest()[:16]
        obj = out_dir / "obj" / f"{path.stem}-{key}.o"
        objs.append(obj)
        if not obj.exists():
            cmds.append(["g++", *flags, "-x", "c++", "-c", str(path), "-o", str(obj) + ".tmp"])
    (out_dir / "obj").mkdir(exist_ok=True)

    def compile_one(cmd):
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"compile failed: {' '.join(cmd)}\n{r.stderr[-6000:]}")
        os.replace(cmd[-1], cmd[-1][:-4])

    with ThreadPoolExecutor(max(1, jobs)) as ex:
        list(ex.map(compile_one, cmds))
    lib = out_dir / f"libadarts_emu-{tag}.so"
    r = subprocess.run(["g++", "-shared", "-pthread", *SANITIZE[sanitize], "-o", str(lib) + ".tmp",
                        *map(str, objs)], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"link failed:\n{r.stderr[-4000:]}")
    os.replace(str(lib) + ".tmp", lib)
    return lib


# ----------------------------------------------------------------------------- buffers

def poisoned(shape, dtype) -> torch.Tensor:
    """An output buffer of exactly ``shape``, filled with garbage (NaN, or -7 for integers)."""
    t = torch.empty(shape, dtype=dtype)
    t.fill_(float("nan") if dtype.is_floating_point else -7)
    return t


class Workspace:
    """``nbytes`` from posix_memalign (256-byte aligned, exactly that size), 0xFF-filled."""

    _libc = ctypes.CDLL(None)

    def __init__(self, nbytes: int):
        self.ptr = ctypes.c_void_p()
        rc = self._libc.posix_memalign(ctypes.byref(self.ptr), ctypes.c_size_t(256), ctypes.c_size_t(max(nbytes, 1)))
        assert rc == 0
        ctypes.memset(self.ptr, 0xFF, max(nbytes, 1))

    def __enter__(self):
        return self.ptr

    def __exit__(self, *exc):
        self._libc.free(self.ptr)


def ptr(t: Optional[torch.Tensor]):
    return None if t is None else ctypes.c_void_p(t.data_ptr())


def c_contig(t: torch.Tensor, offset: bool) -> torch.Tensor:
    """A contiguous copy of ``t``; with ``offset`` at one element past an aligned start."""
    if not offset:
        return t.contiguous().clone()
    buf = torch.empty(t.numel() + 1, dtype=t.dtype)
    v = buf[1:].view(t.shape)
    v.copy_(t)
    return v


class LaunchError(RuntimeError):
    def __init__(self, what: str, code: int, message: str):
        super().__init__(f"{what}: CUDA error {code}: {message}")
        self.code, self.message = code, message


# ----------------------------------------------------------------------------- devices

class Emulated:
    """The launchers of a library from :func:`build`, on CPU tensors. ``offset``: inputs and
    outputs one element past an aligned address (the scalar paths). ``schedule``: the
    emulator's schedule for every launch (one of ``SCHEDULES``; None: ADARTS_EMU_SCHED)."""

    name = "emulated"

    def __init__(self, lib: Path, offset: bool = False, schedule: Optional[str] = None):
        self.lib = ctypes.CDLL(str(lib))
        self.offset = offset
        self.schedule = schedule
        self.lib.emu_message.restype = ctypes.c_char_p
        self.lib.emu_set_schedule.argtypes = [ctypes.c_char_p]
        for f in launchers():
            fn = getattr(self.lib, f"emu_{f.name}", None)
            if fn is not None:
                fn.restype, fn.argtypes = f.ctypes_sig()

    def with_offset(self, offset: bool) -> "Emulated":
        other = object.__new__(Emulated)
        other.lib, other.offset, other.schedule = self.lib, offset, self.schedule
        return other

    def with_schedule(self, schedule: Optional[str]) -> "Emulated":
        other = self.with_offset(self.offset)
        other.schedule = schedule
        return other

    def _in(self, t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        return None if t is None else c_contig(t, self.offset)

    def _out(self, shape, dtype) -> torch.Tensor:
        t = poisoned(shape, dtype)
        return c_contig(t, True) if self.offset else t

    def _call(self, name: str, *args) -> None:
        self.lib.emu_reset()
        self.lib.emu_set_schedule(None if self.schedule is None else self.schedule.encode())
        err = getattr(self.lib, f"emu_{name}")(*args)
        if err != 0:
            raise LaunchError(name, err, self.lib.emu_message().decode())

    def ws(self, name: str, *args) -> int:
        return getattr(self.lib, f"emu_{name}_workspace_bytes")(*args)

    # 1. scoring
    def attention_score_fwd(self, x, w1, w2, n):
        x, w1, w2 = self._in(x), self._in(w1), self._in(w2)
        B, C, H, W = x.shape
        Ch = w1.shape[0]
        dt = DTYPE_CODE[x.dtype]
        a, idx = self._out((B, C), x.dtype), self._out((n,), torch.int64)
        with Workspace(self.ws("attention_score_fwd", dt, B, C, Ch)) as ws:
            self._call("attention_score_fwd", dt, ptr(x), ptr(w1), ptr(w2), B, C, H * W, Ch, n, ptr(a), ptr(idx),
                       ws, None)
        return a, idx

    def attention_score_bwd(self, grad_a, x, w1, w2, a):
        grad_a, x, w1, w2, a = map(self._in, (grad_a, x, w1, w2, a))
        B, C, H, W = x.shape
        Ch = w1.shape[0]
        dt = DTYPE_CODE[x.dtype]
        dx, dw1, dw2 = self._out(x.shape, x.dtype), self._out(w1.shape, x.dtype), self._out(w2.shape, x.dtype)
        with Workspace(self.ws("attention_score_bwd", dt, B, C, Ch)) as ws:
            self._call("attention_score_bwd", dt, ptr(grad_a), ptr(x), ptr(w1), ptr(w2), ptr(a), B, C, H * W, Ch,
                       ptr(dx), ptr(dw1), ptr(dw2), ws, None)
        return dx, dw1, dw2

    # 2. gather
    def attention_gather_fwd(self, x, a, idx):
        x, a, idx = self._in(x), self._in(a), idx.contiguous().clone()
        B, C, H, W = x.shape
        n = idx.numel()
        out = self._out((B, n, H, W), x.dtype)
        self._call("attention_gather_fwd", DTYPE_CODE[x.dtype], ptr(x), ptr(a), ptr(idx), B, C, H * W, n, ptr(out),
                   None)
        return out

    def attention_gather_bwd(self, grad, x, a, idx):
        grad, x, a, idx = self._in(grad), self._in(x), self._in(a), idx.contiguous().clone()
        B, C, H, W = x.shape
        n = idx.numel()
        dx, da = self._out(x.shape, x.dtype), self._out(a.shape, x.dtype)
        with Workspace(self.ws("attention_gather_bwd", C)) as ws:
            self._call("attention_gather_bwd", DTYPE_CODE[x.dtype], ptr(grad), ptr(x), ptr(a), ptr(idx), B, C, H * W,
                       n, ptr(dx), ptr(da), ws, None)
        return dx, da

    # 3. write-back
    def attention_writeback_fwd(self, x, a, idx, y, beta, stride):
        x, a, y, beta, idx = self._in(x), self._in(a), self._in(y), self._in(beta), idx.contiguous().clone()
        B, C, H, W = x.shape
        n = idx.numel()
        out = self._out((B, C, H // stride, W // stride), x.dtype)
        with Workspace(self.ws("attention_writeback_fwd", C)) as ws:
            self._call("attention_writeback_fwd", DTYPE_CODE[x.dtype], ptr(x), ptr(a), ptr(idx), ptr(y), ptr(beta),
                       B, C, H, W, n, stride, ptr(out), ws, None)
        return out

    def attention_writeback_bwd(self, grad, x, a, idx, y, beta, stride):
        grad, x, a, y, beta = map(self._in, (grad, x, a, y, beta))
        idx = idx.contiguous().clone()
        B, C, H, W = x.shape
        n = idx.numel()
        dt = DTYPE_CODE[x.dtype]
        dx, da, dy = self._out(x.shape, x.dtype), self._out(a.shape, x.dtype), self._out(y.shape, x.dtype)
        dbeta = self._out((), x.dtype) if beta is not None else None
        with Workspace(self.ws("attention_writeback_bwd", dt, B, C)) as ws:
            self._call("attention_writeback_bwd", dt, ptr(grad), ptr(x), ptr(a), ptr(idx), ptr(y), ptr(beta), B, C,
                       H, W, n, stride, ptr(dx), ptr(da), ptr(dy), ptr(dbeta), ws, None)
        return dx, da, dy, dbeta

    # 4. mixed sum
    def mixed_sum_fwd(self, z, x, z_weights, pool_weights, identity_weight, stride, eps, run_mean, run_var):
        z = [self._in(t) for t in z]
        x, zw, pw, iw = self._in(x), self._in(z_weights), self._in(pool_weights), self._in(identity_weight)
        B, n, H, W = x.shape
        P = len(z)
        dt = DTYPE_CODE[x.dtype]
        sd = torch.float64 if x.dtype == torch.float64 else torch.float32
        y = self._out((B, n, H // stride, W // stride), x.dtype)
        training = run_mean is None
        if training:
            mean, var = self._out((P + 2, n), sd), self._out((P + 2, n), sd)
        else:
            mean, var = self._in(run_mean.to(sd)), self._in(run_var.to(sd))
        zp = (ctypes.c_void_p * max(P, 1))(*[t.data_ptr() for t in z])
        with Workspace(self.ws("mixed_sum_fwd", dt, B, n, P)) as ws:
            self._call("mixed_sum_fwd", dt, zp, P, ptr(x), ptr(zw), ptr(pw), ptr(iw), B, n, H, W, stride, eps,
                       1 if training else 0, ptr(mean), ptr(var), ptr(y), ws, None)
        return y, mean, var

    def mixed_sum_bwd(self, grad, z, x, z_weights, pool_weights, identity_weight, mean, var, stride, eps, training):
        z = [self._in(t) for t in z]
        grad, x, zw, pw, iw = map(self._in, (grad, x, z_weights, pool_weights, identity_weight))
        mean, var = self._in(mean), self._in(var)
        B, n, H, W = x.shape
        P = len(z)
        dt = DTYPE_CODE[x.dtype]
        dz = [self._out(t.shape, t.dtype) for t in z]
        dx, dzw, dpw = self._out(x.shape, x.dtype), self._out((P,), x.dtype), self._out((2,), x.dtype)
        diw = self._out((), x.dtype)
        zp = (ctypes.c_void_p * max(P, 1))(*[t.data_ptr() for t in z])
        dzp = (ctypes.c_void_p * max(P, 1))(*[t.data_ptr() for t in dz])
        with Workspace(self.ws("mixed_sum_bwd", dt, B, n, H, W, stride, P)) as ws:
            self._call("mixed_sum_bwd", dt, ptr(grad), zp, P, ptr(x), ptr(zw), ptr(pw), ptr(iw), ptr(mean), ptr(var),
                       B, n, H, W, stride, eps, 1 if training else 0, dzp, ptr(dx), ptr(dzw), ptr(dpw), ptr(diw), ws,
                       None)
        return dz, dx, dzw, dpw, diw


class Cuda:
    """The same methods on the real CUDA kernels (``torch.ops.adarts_C`` on CUDA tensors).
    ``device="cpu"`` runs them on the C++ CPU kernels instead (a check of this class itself
    where no GPU is)."""

    name = "cuda"

    def __init__(self, offset: bool = False, device: str = "cuda"):
        self.offset, self.device = offset, device

    def with_offset(self, offset: bool) -> "Cuda":
        return Cuda(offset, self.device)

    def _in(self, t):
        if t is None:
            return None
        if not self.offset or t.dim() == 0:
            return t.to(self.device).contiguous()
        buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=self.device)
        v = buf[1:].view(t.shape)
        v.copy_(t)
        return v

    @staticmethod
    def _cpu(r):
        if isinstance(r, (list, tuple)):
            return type(r)(Cuda._cpu(u) for u in r)
        return r.cpu() if isinstance(r, torch.Tensor) else r

    def _op(self, name, *args):
        out = getattr(torch.ops.adarts_C, name)(*args)
        if self.device == "cuda":
            torch.cuda.synchronize()
        return self._cpu(out)

    def attention_score_fwd(self, x, w1, w2, n):
        return self._op("attention_score_fwd", self._in(x), self._in(w1), self._in(w2), n)

    def attention_score_bwd(self, grad_a, x, w1, w2, a):
        return self._op("attention_score_bwd", *map(self._in, (grad_a, x, w1, w2, a)))

    def attention_gather_fwd(self, x, a, idx):
        return self._op("attention_gather_fwd", self._in(x), self._in(a), idx.to(self.device))

    def attention_gather_bwd(self, grad, x, a, idx):
        return self._op("attention_gather_bwd", self._in(grad), self._in(x), self._in(a), idx.to(self.device))

    def attention_writeback_fwd(self, x, a, idx, y, beta, stride):
        return self._op("attention_writeback_fwd", self._in(x), self._in(a), idx.to(self.device), self._in(y),
                        self._in(beta), stride)

    def attention_writeback_bwd(self, grad, x, a, idx, y, beta, stride):
        dx, da, dy, dbeta = self._op("attention_writeback_bwd", self._in(grad), self._in(x), self._in(a), idx.to(self.device),
                                     self._in(y), self._in(beta), stride)
        return dx, da, dy, (dbeta if beta is not None else None)

    def mixed_sum_fwd(self, z, x, z_weights, pool_weights, identity_weight, stride, eps, run_mean, run_var):
        return self._op("mixed_sum_fwd", [self._in(t) for t in z], self._in(x), self._in(z_weights),
                        self._in(pool_weights), self._in(identity_weight), stride, eps, self._in(run_mean),
                        self._in(run_var))

    def mixed_sum_bwd(self, grad, z, x, z_weights, pool_weights, identity_weight, mean, var, stride, eps, training):
        return self._op("mixed_sum_bwd", self._in(grad), [self._in(t) for t in z], self._in(x), self._in(z_weights),
                        self._in(pool_weights), self._in(identity_weight), self._in(mean), self._in(var), stride, eps,
                        training)
