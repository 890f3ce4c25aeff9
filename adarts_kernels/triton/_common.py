"""Helpers shared by the Triton launchers (``adarts_kernels.triton.<op>``): the lazy triton
import, output allocation (poisoned on request), accumulation dtypes, block sizes and the
shape checks and inverse map of the gather and write-back launchers.

Importing this module imports neither triton nor torch; :func:`import_triton` probes triton
once, on first use.
"""
from __future__ import annotations

_TRITON = None   # (triton, triton.language, error) once probed


class _StubTriton:
    """Stands in for ``triton`` where it is missing: ``@triton.jit`` leaves the function as is
    (it is never launched: every launcher calls :func:`require` first)."""

    @staticmethod
    def jit(fn=None, **kwargs):
        return fn if fn is not None else (lambda f: f)


class _StubLanguage:
    """Stands in for ``triton.language``: only what module-level code evaluates
    (the ``tl.constexpr`` annotations)."""

    constexpr = object


def import_triton():
    """``(triton, triton.language, error)``; stubs and the import error where it fails."""
    global _TRITON
    if _TRITON is None:
        try:
            import triton
            import triton.language as tl
            _TRITON = (triton, tl, None)
        except Exception as exc:  # ImportError, or a broken install failing at import
            _TRITON = (_StubTriton(), _StubLanguage(), exc)
    return _TRITON


def require(op: str) -> None:
    """Raise ``RuntimeError`` naming ``op`` when triton does not import."""
    err = import_triton()[2]
    if err is not None:
        raise RuntimeError(f"adarts {op}: triton is not available ({err!r})")


def empty(shape, dtype, device):
    """``torch.empty``; poisoned (NaN / integer sentinel) when the package flag
    ``adarts_kernels.triton.POISON_OUTPUTS`` is set (read at every call, so that setting it
    on the package takes effect at once)."""
    import torch

    from . import POISON_OUTPUTS
    t = torch.empty(shape, dtype=dtype, device=device)
    if POISON_OUTPUTS:
        t.fill_(float("nan") if t.is_floating_point() else 2 ** 30)
    return t


def acc_dtype(dtype):
    """The kernels' accumulation dtype (a ``triton.language`` dtype) for a torch input dtype:
    float64 for float64, float32 otherwise (matches ``reference._acc``)."""
    import torch
    tl = import_triton()[1]
    return tl.float64 if dtype == torch.float64 else tl.float32


def block_hw(n: int, lo: int = 16, hi: int = 1024) -> int:
    """Power-of-two block covering ``n`` elements, clamped to ``[lo, hi]``."""
    b = lo
    while b < n and b < hi:
        b *= 2
    return b


def num_warps(block: int) -> int:
    """Warps for a block of ``block`` elements: one per 256, between 1 and 8."""
    return max(1, min(8, block // 256))


def check_x_a_idx(op: str, x, a, idx) -> None:
    """Shape-only checks shared by the gather and write-back launchers (no device data read)."""
    import torch
    if x.dim() != 4:
        raise ValueError(f"adarts {op}: x must be (B, C, H, W), got {tuple(x.shape)}")
    B, C = x.shape[:2]
    if tuple(a.shape) != (B, C):
        raise ValueError(f"adarts {op}: a must be (B, C)=({B}, {C}), got {tuple(a.shape)}")
    if idx.dim() != 1 or idx.shape[0] > C:
        raise ValueError(f"adarts {op}: idx must be (n,) with n <= C={C}, got {tuple(idx.shape)}")
    if idx.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"adarts {op}: idx must be int64 (or int32), got {idx.dtype}")


def inverse_map(idx, C: int):
    """``inv: (C,)`` int32, ``inv[c] = j`` if ``idx[j] == c`` else ``-1``, built with device
    ops only (no host synchronisation)."""
    import torch
    inv = torch.full((C,), -1, dtype=torch.int32, device=idx.device)
    inv.scatter_(0, idx.to(torch.int64), torch.arange(idx.shape[0], dtype=torch.int32, device=idx.device))
    return inv


# ----------------------------------------------------------------------------- compile configurations
#
# Each launcher module has ``compile_configs()``: every distinct ``(kernel, signature,
# constexprs, num_warps, options)`` its launchers can launch (``options``: the other compile
# options a launch passes, those in LAUNCH_OPTIONS), for ahead-of-time compilation without a
# GPU (tests/test_triton_compile.py, benchmarks/triton_resources.py). The launchers themselves
# choose: they run on "meta" tensors (shapes and dtypes, no data) while their kernels record
# each launch instead of running.

#: torch dtype -> Triton signature type of a tensor argument (a pointer)
_POINTER_TYPES = {"float16": "*fp16", "bfloat16": "*bf16", "float32": "*fp32", "float64": "*fp64",
                  "int32": "*i32", "int64": "*i64"}
#: compile options besides ``num_warps`` that a launch may pass (recorded, not kernel arguments)
LAUNCH_OPTIONS = ("maxnreg",)


def float_dtypes():
    """The floating dtypes the ``adarts::`` ops accept (every tensor of a call has the same one)."""
    import torch
    return (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def plane_sizes(stride: int, odd: bool = False):
    """``(H, W)`` pairs whose output planes (``H // stride * W // stride``) have every power of
    two from 1 to 2048 elements: past the largest block any launcher picks, so every block
    size (and, with ``odd``, every odd H / W tail at stride 2) is reached."""
    tails = (0, 1) if odd and stride == 2 else (0,)
    sizes = []
    for k in range(12):
        ho, wo = 2 ** (k // 2), 2 ** (k - k // 2)
        sizes += [(stride * ho + th, stride * wo + tw) for th in tails for tw in tails]
    return sizes


def meta_tensor(shape, dtype):
    """A tensor of ``shape`` and ``dtype`` on the "meta" device (no storage)."""
    import torch
    return torch.empty(shape, dtype=dtype, device="meta")


def _arg_type(value) -> str:
    """The Triton signature type a launch gives ``value`` (tensor -> pointer, int -> i32/i64)."""
    import torch
    if isinstance(value, torch.Tensor):
        return _POINTER_TYPES[str(value.dtype).replace("torch.", "")]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2 ** 31 <= value < 2 ** 31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton signature type for {type(value).__name__}")


class _LaunchRecorder:
    """Stands in for one ``@triton.jit`` kernel: ``kernel[grid](*args, **meta)`` records the
    launch's ``(kernel, signature, constexprs, num_warps, options)`` into ``seen`` instead of
    running (``options``: the launch's LAUNCH_OPTIONS, a dict)."""

    def __init__(self, kernel, seen: dict):
        self.kernel, self.seen = kernel, seen

    def __getitem__(self, grid):
        return self._launch

    def _launch(self, *args, **meta):
        meta = dict(meta)
        num_warps = meta.pop("num_warps", 4)           # Triton's default
        options = {k: meta.pop(k) for k in LAUNCH_OPTIONS if k in meta}
        names = list(self.kernel.arg_names)
        if len(args) + len(meta) != len(names) or set(meta) != set(names[len(args):]):
            raise TypeError(f"{self.kernel.__name__}: launch does not bind every argument once")
        signature = {name: _arg_type(v) for name, v in zip(names, args)}
        signature.update({name: "constexpr" for name in meta})
        signature = {name: signature[name] for name in names}
        key = (self.kernel.__name__, tuple(signature.items()),
               tuple(sorted((k, str(v)) for k, v in meta.items())), num_warps, tuple(sorted(options.items())))
        self.seen.setdefault(key, (self.kernel, signature, meta, num_warps, options))


class recording_launches:
    """``with recording_launches(module_globals) as configs:`` -- inside the block, every
    ``*_kernel`` of the module records its launches (see :class:`_LaunchRecorder`); on exit
    the kernels are restored and ``configs`` (a list) holds each distinct launch once, in
    the order first seen."""

    def __init__(self, namespace: dict):
        self.namespace = namespace
        self.saved = {k: v for k, v in namespace.items() if k.endswith("_kernel") and hasattr(v, "arg_names")}
        self.seen, self.configs = {}, []

    def __enter__(self):
        for name, kernel in self.saved.items():
            self.namespace[name] = _LaunchRecorder(kernel, self.seen)
        return self.configs

    def __exit__(self, *exc):
        self.namespace.update(self.saved)
        self.configs.extend(self.seen.values())
        return False
