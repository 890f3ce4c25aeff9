"""Data parallelism for the search and retrain loops: ``torch.distributed`` launched by ``torchrun``.

One process per GPU (or per CPU worker with gloo), started by ``torchrun``; a process started
without ``torchrun`` runs alone exactly as before (:data:`SINGLE`). The pieces the loops use:

- :func:`setup` / :func:`teardown`: the process group (NCCL on GPUs, gloo on CPUs) from
  torchrun's environment, with a collective timeout, and this rank's device;
- :class:`GlobalSelector`: the ADARTS channel selection over all ranks: each edge's
  batch-summed attention score is summed over the ranks (one all-reduce of ``C`` values
  per edge per forward, no host synchronisation) before the top-k, so every rank picks
  the channels one process would pick from the whole global batch;
- :func:`average_`: an in-place average over ranks of a list of tensors, as ONE all-reduce
  (used for the architecture gradients, the BatchNorm buffers and the metrics);
- :class:`DriftGuard`: every N steps, a bitwise checksum of named tensors (alpha, beta,
  weights) compared over ranks; a mismatch raises :class:`DriftError` naming the tensor;
- :func:`broadcast_object`: rank 0's object (a checkpoint, an error) to every rank.

Every collective made here runs inside a ``torch.profiler.record_function`` range named
``adarts:<purpose>`` (``adarts:select``, ``adarts:arch_grads``, ...), which the
benchmark ``benchmarks/distributed_step.py`` reads to count collectives per step.
"""
from __future__ import annotations

import datetime
import inspect
import os
from dataclasses import dataclass
from typing import Any, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.profiler import record_function

from .nn.selection import select_channels

Tensor = torch.Tensor

#: seconds a collective may wait for the other ranks before the job stops with an error
DEFAULT_TIMEOUT_S = 300.0
#: steps between two drift checks (:class:`DriftGuard`)
DEFAULT_CHECK_EVERY = 50
#: what torchrun exports for every worker
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class DriftError(RuntimeError):
    """Tensors that must be bitwise identical on every rank differ."""


@dataclass(frozen=True)
class Context:
    """Where this process stands: ``rank`` of ``world_size`` (``local_rank`` on its machine),
    ``backend`` ``"nccl"``/``"gloo"``, or ``None`` for a process not launched by torchrun."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: Optional[str] = None
    timeout_s: float = DEFAULT_TIMEOUT_S
    owns_group: bool = False     # setup() made the process group (teardown() destroys it)

    @property
    def active(self) -> bool:
        """Launched by torchrun (even with one process): DDP, global selection, collectives."""
        return self.backend is not None

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes files, logs and progress bars."""
        return self.rank == 0


SINGLE = Context()


def launched() -> bool:
    """``True`` when torchrun's environment (``RANK``, ``WORLD_SIZE``...) is set."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def is_main_process() -> bool:
    """Rank 0 under torchrun, or a process started alone."""
    return int(os.environ.get("RANK", "0")) == 0 if launched() else True


def _device_for(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {name!r} asked for, but this torch sees no CUDA device")
        if dev.index is None:           # one GPU per local rank
            dev = torch.device(f"cuda:{local_rank}")
        elif int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > 1:
            raise ValueError(f"--device {name} under torchrun with {os.environ['LOCAL_WORLD_SIZE']} processes per "
                             "machine would put them all on one GPU: pass --device cuda (each process takes "
                             "cuda:<LOCAL_RANK>), or choose the GPUs with CUDA_VISIBLE_DEVICES")
        if dev.index >= torch.cuda.device_count():
            raise RuntimeError(f"local rank {local_rank} would use {dev}, but this machine has "
                               f"{torch.cuda.device_count()} GPUs: start at most that many processes per "
                               "machine (--nproc_per_node)")
    return dev


def setup(device: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> Tuple[Context, Optional[torch.device]]:
    """The process group and this rank's device.

    Without torchrun's environment: ``(SINGLE, None)`` (the caller picks the device as it
    always did). Under torchrun: joins (or creates) the default process group (NCCL when the
    device is a GPU, gloo otherwise) with a collective timeout of ``timeout_s`` seconds, and
    returns the context and the device (``cuda:<LOCAL_RANK>`` for ``"auto"``/``"cuda"``)."""
    if not launched():
        return SINGLE, None
    if not timeout_s or timeout_s <= 0:
        raise ValueError(f"the collective timeout must be positive, got {timeout_s}")
    rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    dev = _device_for(device, local)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    owns = False
    if not dist.is_initialized():
        kw = {"device_id": dev} if dev.type == "cuda" else {}
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=float(timeout_s)), **kw)
        owns = True
    else:
        backend = dist.get_backend()
    if dist.get_world_size() != world or dist.get_rank() != rank:
        raise RuntimeError(f"the process group ({dist.get_rank()} of {dist.get_world_size()}) does not match "
                           f"torchrun's environment (RANK={rank}, WORLD_SIZE={world})")
    return Context(rank, world, local, backend, float(timeout_s), owns), dev


def teardown(ctx: Context) -> None:
    """Destroy the process group :func:`setup` created (none otherwise)."""
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def check_global_batch(batch_size: int, world_size: int, what: str = "--batch-size") -> int:
    """The per-rank batch of a global batch; ``ValueError`` when it does not divide."""
    if batch_size % world_size:
        lo, hi = (batch_size // world_size) * world_size, -(-batch_size // world_size) * world_size
        raise ValueError(f"{what} {batch_size} is the global batch and must divide by the {world_size} ranks "
                         f"(each reads an equal shard): use {lo or world_size} or {hi}")
    return batch_size // world_size


def shard_bounds(batch: int, rank: int, world_size: int) -> Tuple[int, int]:
    """``(start, stop)`` of rank ``rank``'s slice of a batch of ``batch`` samples: contiguous
    slices in rank order whose sizes differ by at most one, the first ranks taking the extra
    samples (``torch.tensor_split``'s split)."""
    base, extra = divmod(batch, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


# ----------------------------------------------------------------------------- collectives

def all_reduce_(t: Tensor, purpose: str, op=dist.ReduceOp.SUM, group=None) -> Tensor:
    """``t`` reduced in place over the ranks of ``group``, inside ``adarts:<purpose>``."""
    with record_function(f"adarts:{purpose}"):
        dist.all_reduce(t, op=op, group=group)
    return t


def _flat(tensors: Sequence[Tensor]) -> Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def _unflat_(flat: Tensor, tensors: Sequence[Tensor]) -> None:
    at = 0
    with torch.no_grad():
        for t in tensors:
            n = t.numel()
            t.copy_(flat[at:at + n].view_as(t))
            at += n


def average_(tensors: Sequence[Tensor], purpose: str, group=None) -> None:
    """Replace every tensor by its mean over the ranks, in place: one all-reduce per dtype
    (of the tensors concatenated), so the result is bitwise identical on every rank."""
    world = dist.get_world_size(group)
    by_dtype: dict = {}
    for t in tensors:
        by_dtype.setdefault((t.dtype, t.device), []).append(t)
    for ts in by_dtype.values():
        flat = _flat(ts)
        all_reduce_(flat, purpose, group=group)
        if flat.is_floating_point():
            flat.div_(world)
        else:
            flat.div_(world, rounding_mode="floor")
        _unflat_(flat, ts)


def sum_values(values: Sequence[float], purpose: str, device, group=None) -> List[float]:
    """Python numbers summed over the ranks (one all-reduce, one host read)."""
    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    all_reduce_(t, purpose, group=group)
    return t.tolist()


def broadcast_object(obj: Any, ctx: Context, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (``obj`` is ignored elsewhere)."""
    box = [obj if ctx.rank == src else None]
    with record_function("adarts:broadcast"):
        dist.broadcast_object_list(box, src=src)
    return box[0]


def agree_or_raise(error: Optional[BaseException], ctx: Context, what: str, device: torch.device) -> None:
    """A collective check after a phase every rank runs (setup, data loading): if any rank
    failed, every rank raises (the failing one its own error), instead of the others waiting
    for it until the timeout. ``device``: this rank's (a GPU under NCCL)."""
    if not ctx.active:
        if error is not None:
            raise error
        return
    failed = torch.tensor([1.0 if error is not None else 0.0], dtype=torch.float64, device=device)
    all_reduce_(failed, "agree", op=dist.ReduceOp.MAX)
    if error is not None:
        raise error
    if failed.item() > 0:
        raise RuntimeError(f"another rank failed during {what} (its error is above); rank {ctx.rank} stops too")


# ----------------------------------------------------------------------------- selection

class GlobalSelector:
    """The ADARTS channel selection over the ranks of ``group``: ``selector(score, n) -> idx``.

    ``score: (C,)`` is this rank's batch-summed attention score; it is summed over the ranks
    (one all-reduce of ``C`` numbers, on the device: no host synchronisation), then the ``n``
    highest are taken with the tie rule of every backend (descending, equal scores by the
    lower channel). Every rank gets the same ``idx: (n,)`` int64, the one a single process
    would choose from the whole global batch (up to the order of the floating-point sum).
    Set it on a supernet with ``SearchNetwork.set_selector(GlobalSelector())``."""

    #: its idx is a prefix of a sort's permutation: distinct and in range, so the fused edge
    #: does not check the values again (no extra kernels per edge)
    trusted = True

    def __init__(self, group=None):
        self.group = group

    def __call__(self, score: Tensor, n: int) -> Tensor:
        s = score.detach().clone()     # the caller's score is left as it was
        all_reduce_(s, "select", group=self.group)
        return select_channels(s, n)

    def __repr__(self) -> str:
        return f"GlobalSelector(group={self.group!r})"


# ----------------------------------------------------------------------------- DDP

def wrap_ddp(model: nn.Module, device: torch.device, ignore: Iterable[str] = ()) -> nn.Module:
    """``model`` in :class:`~torch.nn.parallel.DistributedDataParallel`: gradients of every
    parameter but ``ignore`` (names) averaged over the ranks during backward; buffers NOT
    synchronised at each forward (each rank keeps its own BatchNorm statistics; the loops
    average them with :func:`average_buffers` before checkpoints and evaluations)."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    ignore = list(ignore)
    if ignore:
        DDP._set_params_and_buffers_to_ignore_for_model(model, ignore)
    params = inspect.signature(DDP.__init__).parameters
    kw = {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}
    return DDP(model, device_ids=[device] if device.type == "cuda" else None, gradient_as_bucket_view=True, **kw)


def average_buffers(model: nn.Module, group=None) -> None:
    """Average every floating-point buffer (BatchNorm running mean and variance) over the
    ranks, in place: after it, every rank holds the same buffers (one all-reduce per dtype)."""
    bufs = [b for b in model.buffers() if b.is_floating_point()]
    if bufs:
        average_(bufs, "buffers", group=group)


# ----------------------------------------------------------------------------- drift

def _bits(t: Tensor) -> Tensor:
    t = t.detach().contiguous().reshape(-1)
    if t.is_floating_point():
        t = t.view({8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()])
    return t.to(torch.int64)


def checksum(t: Tensor) -> Tensor:
    """``(2,)`` int64 on ``t``'s device: the sum of ``t``'s bit patterns and their sum
    weighted by position (so a swap of two entries shows too). Equal tensors, equal sums."""
    b = _bits(t)
    w = torch.arange(b.numel(), device=b.device, dtype=torch.int64) % 65521 + 1
    return torch.stack([b.sum(), (b * w).sum()])


class DriftGuard:
    """Compare ``named`` tensors over the ranks every ``every`` steps (0: never).

    :meth:`maybe_check` is called after each step; every ``every``-th call it computes a
    :func:`checksum` of each tensor, takes the maximum and the minimum over the ranks in
    one all-reduce and reads back which differ: a difference raises :class:`DriftError`
    naming the tensors (the run stops; its last checkpoint is intact)."""

    def __init__(self, named: Sequence[Tuple[str, Tensor]], every: int, ctx: Context, group=None):
        if every < 0:
            raise ValueError(f"the drift check interval must be >= 0, got {every}")
        self.named, self.every, self.ctx, self.group = list(named), int(every), ctx, group
        self.calls = 0

    def maybe_check(self, where: str) -> None:
        self.calls += 1
        if self.every and self.calls % self.every == 0:
            self.check(where)

    def check(self, where: str) -> None:
        """Compare now (a collective: every rank must call it)."""
        if not self.named or not self.ctx.active or self.ctx.world_size < 2:
            return
        sums = torch.stack([checksum(t).to(self.named[0][1].device) for _, t in self.named])   # (T, 2)
        both = torch.cat([sums, -sums]).contiguous()
        all_reduce_(both, "drift", op=dist.ReduceOp.MAX, group=self.group)
        n = sums.shape[0]
        differ = (both[:n] != -both[n:]).any(dim=1).nonzero().flatten().tolist()    # one host read
        if differ:
            names = [self.named[i][0] for i in differ]
            shown = ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")
            raise DriftError(f"ranks diverged at {where}: {shown} differ between ranks (they must be bitwise "
                             "identical: same data shards, same collectives); the run stopped, its last "
                             "checkpoint is intact")


def is_peer_failure(e: BaseException) -> bool:
    """Whether ``e`` looks like a failed collective (a peer died or hung, timeout, network):
    torch's distributed errors, or gloo's plain ``RuntimeError`` by its message."""
    if isinstance(e, (dist.DistBackendError, dist.DistError)):
        return True
    text = str(e).lower()
    return any(s in text for s in ("connection closed", "connection reset", "timed out", "timeout", "gloo",
                                   "nccl", "broken pipe", "socket", "watchdog"))


def explain_failure(e: BaseException, out: Optional[str] = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> str:
    """The message a driver prints for an error ``e``: as is for a process started alone;
    under torchrun prefixed with the rank (from torchrun's environment), and for a failed
    collective with what probably happened and that the checkpoint in ``out`` is intact."""
    if not launched():
        return str(e)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    msg = f"rank {rank} of {world}: {type(e).__name__}: {e}"
    if is_peer_failure(e):
        kept = f"; the last checkpoint in {out} is intact (resume with --resume)" if out else ""
        msg += (f"\nrank {rank} lost contact with the other ranks: one of them died, hung for more than the "
                f"{timeout_s:g} s collective timeout (--dist-timeout), or the network failed; the job "
                f"stopped{kept}")
    return msg
