"""What the search loop (:mod:`.search_loop`) and the retrain loop (:mod:`.retrain_loop`) share:
the non-finite guards, evaluation and meters, data loading and the size / batch checks, the
per-rank loss factor, and the launch (process group, device, run-directory lock), resume point,
logging and plotting helpers (docs/method.md sections 1 and 4).

Reproducibility: the batches of epoch ``e`` are a pure function of ``(seed, e)``
(:class:`~adarts_kernels.data.BatchLoader`), and the checkpoint written after every epoch
holds everything a resumed run needs to continue exactly (``nas/checkpoint.py``).

Non-finite values stop a run: every step folds ``isfinite(loss)`` into a flag on the device
(:class:`FiniteGuard`, no host read in the step), read together with the progress bar's
loss every 10 steps and at each epoch's end, where the parameters are checked too. A bad
value raises :class:`NonFiniteError` before that epoch's checkpoint is written, so the
checkpoint keeps the last good epoch, and no genotype is derived from non-finite parameters.

Data parallelism (``torchrun``, :mod:`adarts_kernels.distributed`): every rank runs the
loops on its shard of each global batch (``--batch-size`` is the global batch) with the
model in ``DistributedDataParallel``; the ADARTS channel selection is global
(:class:`~adarts_kernels.distributed.GlobalSelector`), the architecture gradients are
averaged over the ranks by the :class:`~adarts_kernels.nas.architect.Architect`, each rank
keeps its own BatchNorm batch statistics and the running statistics are averaged before
every evaluation and checkpoint; a :class:`~adarts_kernels.distributed.DriftGuard` compares
alpha, beta and the weights bitwise every ``check_every`` steps. Rank 0 alone writes files,
logs and progress bars. What a step computes: on each rank, the mean loss of its shard
(times ``world_size * shard / global batch``, 1 for equal shards) with the channels chosen
from the score summed over every shard; the gradients are the mean over the ranks, i.e. the
gradient of the mean of the shards' losses.

Training batches hold at least :data:`MIN_SHARD` samples per rank (BatchNorm in training
mode cannot normalise a single sample at 1x1 resolution): the global batch must be at
least ``MIN_SHARD * world_size``, a final batch smaller than that is folded into the one
before it (:class:`~adarts_kernels.data.BatchLoader`'s ``min_batch``), and a training split
smaller than that is refused.
"""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Callable, Iterator, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import distributed as D
from ..data import BatchLoader, load_dataset
from ..utils.io import progress, set_postfix
from .checkpoint import CHECKPOINT, lock_run, prepare_out, validate
from .config import resolve_device

EpochHook = Callable[[int, dict], None]

#: the loop reads the device (progress-bar loss, non-finite flag) once every this many steps
READ_EVERY = 10

#: the fewest samples one rank trains on in a step: BatchNorm in training mode normalises with
#: the batch's statistics, and one sample at 1x1 resolution (the auxiliary head after the second
#: reduction of 16x16 digits) has none ("Expected more than 1 value per channel")
MIN_SHARD = 2


class NonFiniteError(RuntimeError):
    """A loss or a parameter became NaN or infinite; the run stopped before checkpointing it.

    ``epoch`` and ``step`` are 1-based (``step`` is ``None`` when found at the epoch's end),
    ``what`` names the value (``"train loss"``, ``"architecture loss"``, ``"valid loss"``,
    ``"parameters"``)."""

    def __init__(self, what: str, epoch: int, step: Optional[int], out: str, detail: str = ""):
        self.what, self.epoch, self.step, self.out = what, epoch, step, out
        where = f"epoch {epoch}" + (f", step {step}" if step is not None else "")
        kept = (f"{os.path.join(out, CHECKPOINT)} keeps the last good epoch ({epoch - 1})" if epoch > 1
                else "no checkpoint was written")
        super().__init__(f"non-finite {what} at {where}{': ' + detail if detail else ''}; the run stopped, "
                         f"{kept}, nothing was derived from it (lower the lr, or check the data)")


class FiniteGuard:
    """Device-side record of the first non-finite loss of an epoch: :meth:`check` makes no
    host read; :meth:`values` gives the step (-1: none) and the loss's code, for one read."""

    WHAT = {1: "train loss", 2: "architecture loss"}

    def __init__(self, device):
        self.step = torch.full((), -1, dtype=torch.int64, device=device)
        self.code = torch.zeros((), dtype=torch.int64, device=device)

    def check(self, loss: torch.Tensor, step: int, code: int) -> None:
        new = ~torch.isfinite(loss.detach()) & (self.step < 0)
        self.step = torch.where(new, step, self.step)
        self.code = torch.where(new, code, self.code)

    def values(self) -> List[torch.Tensor]:
        return [self.step.double(), self.code.double()]

    def raise_if_bad(self, bad_step: float, code: float, epoch: int, out: str) -> None:
        if bad_step >= 0:
            raise NonFiniteError(self.WHAT.get(int(code), "loss"), epoch + 1, int(bad_step) + 1, out)


#: larger than any step number: encodes "the earliest bad step" for a max-reduction over ranks
_NO_STEP = float(1 << 40)


def _read(loss: Optional[torch.Tensor], guard: FiniteGuard,
          ctx: D.Context = D.SINGLE) -> Tuple[Optional[float], float, float]:
    """One host read: the loss (if given), the guard's step and code. Under data parallelism
    the guard is first combined over the ranks (one all-reduce), so every rank stops at the
    same read: the earliest bad step of any rank."""
    step, code = guard.values()
    if ctx.active:
        flag = torch.stack([torch.where(step >= 0, _NO_STEP - step, torch.zeros_like(step)), code])
        D.all_reduce_(flag, "finite", op=torch.distributed.ReduceOp.MAX)
        step = torch.where(flag[0] > 0, _NO_STEP - flag[0], torch.full_like(flag[0], -1.0))
        code = flag[1]
    vals = ([loss.detach().double().reshape(())] if loss is not None else []) + [step, code]
    got = torch.stack(vals).tolist()     # one device-to-host copy
    return (got[0] if loss is not None else None), got[-2], got[-1]


def _periodic_read(loss: torch.Tensor, guard: FiniteGuard, bar, step: int, epoch: int, cfg,
                   ctx: D.Context = D.SINGLE, extra: Optional[Callable[[], dict]] = None) -> None:
    """Every READ_EVERY steps: the non-finite flag (raises) and, with progress bars, the loss shown
    (and ``extra()``'s entries, e.g. the ImageNet loader's images per second)."""
    shown, bad_step, code = _read(loss if (cfg.progress and ctx.main) else None, guard, ctx)
    guard.raise_if_bad(bad_step, code, epoch, cfg.out)
    if shown is not None:
        set_postfix(bar, last_loss=f"{shown:.3f} (step {step + 1})", **(extra() if extra is not None else {}))


def _finish_epoch(model: nn.Module, guard: FiniteGuard, meter, sched, loader: BatchLoader, desc: str, epoch: int,
                  cfg, ctx: D.Context = D.SINGLE) -> Tuple[float, float, float, float]:
    """The end of a training epoch, search or retrain: the guard's last read, every parameter
    finite, the scheduler step, the train meters, and the validation pass; raises
    :class:`NonFiniteError` on any non-finite value. Returns ``(train_loss, train_acc,
    valid_loss, valid_acc)``. Under data parallelism the BatchNorm running statistics are
    averaged over the ranks first (every rank then evaluates and checkpoints the same
    model), the meters and the validation are summed over the ranks."""
    _, bad_step, code = _read(None, guard, ctx)
    guard.raise_if_bad(bad_step, code, epoch, cfg.out)
    check_finite_parameters(model, epoch, cfg.out)
    sched.step()
    if ctx.active:
        D.average_buffers(model)
    train_loss, train_acc = meter.read(ctx)
    valid_loss, valid_acc = evaluate(model, loader, desc, cfg.progress and ctx.main, ctx)
    if valid_loss != valid_loss or abs(valid_loss) == float("inf"):
        raise NonFiniteError("valid loss", epoch + 1, None, cfg.out)
    return train_loss, train_acc, valid_loss, valid_acc


def check_finite_parameters(model: nn.Module, epoch: int, out: str) -> None:
    """Raise :class:`NonFiniteError` naming the first parameter that holds a NaN or infinity
    (one host read for all of them)."""
    params = [(n, p) for n, p in model.named_parameters()]
    if not params:
        return
    ok = torch.stack([torch.isfinite(p.detach()).all().to(params[0][1].device) for _, p in params]).tolist()
    bad = [n for (n, _), good in zip(params, ok) if not good]
    if bad:
        raise NonFiniteError("parameters", epoch + 1, None, out,
                             f"{', '.join(bad[:4])}{' ...' if len(bad) > 4 else ''}")


def _load(cfg) -> dict:
    data = load_dataset(cfg.dataset, root=cfg.data, download=cfg.download,
                        size=cfg.image_size if cfg.dataset == "digits" else None)
    if cfg.limit is not None:
        data = {k: (v.subset(range(min(cfg.limit, len(v)))) if v is not None else None) for k, v in data.items()}
    return data


def _load_agreed(cfg, ctx: D.Context, device: torch.device) -> dict:
    """:func:`_load` on every rank; if it fails on any, every rank stops (none waits for it)."""
    err, data = None, None
    try:
        data = _load(cfg)
    except Exception as e:      # noqa: BLE001 -- every rank learns that one failed, then re-raised
        err = e
    D.agree_or_raise(err, ctx, "data loading", device)
    return data


def _check_sizes(cfg, parts: dict, need: str) -> None:
    """Refuse empty splits with a message saying what is too small, before any work."""
    empty = [name for name, part in parts.items() if part is None or len(part) == 0]
    if empty:
        limit = f" (--limit {cfg.limit})" if cfg.limit is not None else ""
        which = f"the {empty[0]} split is" if len(empty) == 1 else f"the {' and '.join(empty)} splits are"
        raise ValueError(f"too few images in {cfg.dataset}{limit}: {which} empty; {need}")


def _min_batch(ctx: D.Context) -> int:
    """The smallest global training batch: :data:`MIN_SHARD` samples for every rank."""
    return MIN_SHARD * ctx.world_size


def _check_trainable(cfg, parts: dict, ctx: D.Context) -> None:
    """Refuse a training split smaller than :func:`_min_batch`: its one batch would leave a
    rank training BatchNorm on a single sample (a larger split folds such a remainder into
    its last batch instead)."""
    need = _min_batch(ctx)
    for name, part in parts.items():
        if len(part) < need:
            limit = f" (--limit {cfg.limit})" if cfg.limit is not None else ""
            ranks = f" ({MIN_SHARD} for each of the {ctx.world_size} ranks)" if ctx.active else ""
            raise ValueError(f"too few images in {cfg.dataset}{limit}: the {name} split has {len(part)}; a "
                             f"training batch needs at least {need}{ranks}, since BatchNorm cannot train on a "
                             f"single sample")


def _check_batch(batch_size, ctx: D.Context) -> None:
    """Under torchrun: the global batch divides by the ranks and gives each at least
    :data:`MIN_SHARD` samples (one process: the config already asks for 2)."""
    if not ctx.active or not isinstance(batch_size, int):
        return
    D.check_global_batch(batch_size, ctx.world_size)
    if batch_size < _min_batch(ctx):
        raise ValueError(f"--batch-size {batch_size} is the global batch: {batch_size // ctx.world_size} per rank "
                         f"over {ctx.world_size} ranks, and BatchNorm needs at least {MIN_SHARD} per rank to "
                         f"train; use {_min_batch(ctx)} or more")


def _local_selection(model: nn.Module):
    """A scope where ``model`` (a supernet) selects channels from this process's batch alone."""
    scope = getattr(model, "selector_scope", None)
    return scope(None) if scope is not None else contextlib.nullcontext()


@torch.no_grad()
def evaluate(model: nn.Module, loader: BatchLoader, desc: str = "", bar: bool = False,
             ctx: D.Context = D.SINGLE) -> Tuple[float, float]:
    """Mean loss and accuracy (%) of ``model`` over ``loader`` (eval mode, no augmentation);
    ``bar``: a progress bar labelled ``desc``.

    Under data parallelism (``ctx``) every rank takes its shard of each batch of ``loader``
    (the same batches on every rank) and the sums are combined over the ranks: with the
    global channel selection this is the one-process evaluation of the whole batch. A batch
    with fewer samples than ranks is evaluated whole by every rank (its own selection) and
    counted once."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64)
    correct = torch.zeros((), dtype=torch.int64)
    n = 0
    split = ctx.active and ctx.world_size > 1
    for x, y in progress(loader, total=len(loader), desc=desc, enable=bar):
        count = True
        if split and y.shape[0] >= ctx.world_size:
            lo, hi = D.shard_bounds(y.shape[0], ctx.rank, ctx.world_size)
            x, y = x[lo:hi], y[lo:hi]
            out = model(x)
        elif split:
            with _local_selection(model):
                out = model(x)
            count = ctx.main
        else:
            out = model(x)
        if not count:
            continue
        logits = out[0] if isinstance(out, tuple) else out
        loss_sum = loss_sum + F.cross_entropy(logits, y, reduction="sum").double().cpu()
        correct = correct + (logits.argmax(1) == y).sum().cpu()
        n += y.shape[0]
    model.train(was_training)
    loss_total, correct_total = float(loss_sum), float(correct)
    if ctx.active:
        dev = next(model.parameters()).device
        loss_total, correct_total, n = D.sum_values([loss_total, correct_total, n], "metrics", dev)
    return loss_total / max(n, 1), 100.0 * correct_total / max(n, 1)


class Meter:
    """Running loss / accuracy kept on the device; read back once per epoch."""

    def __init__(self, device):
        self.loss = torch.zeros((), device=device, dtype=torch.float64)
        self.correct = torch.zeros((), device=device, dtype=torch.int64)
        self.n = 0

    def update(self, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
        b = y.shape[0]
        self.loss += loss.detach().double() * b
        self.correct += (logits.detach().argmax(1) == y).sum()
        self.n += b

    def read(self, ctx: D.Context = D.SINGLE) -> Tuple[float, float]:
        """Mean loss and accuracy (%); under data parallelism over every rank's samples."""
        if ctx.active:
            loss, correct, n = D.sum_values([float(self.loss), float(self.correct), float(self.n)], "metrics",
                                            self.loss.device)
            return loss / max(n, 1), 100.0 * correct / max(n, 1)
        return float(self.loss) / max(self.n, 1), 100.0 * float(self.correct) / max(self.n, 1)


def _say(ctx: D.Context, *args, **kw) -> None:
    """``print`` to stderr on rank 0 only."""
    if ctx.main:
        print(*args, file=sys.stderr, **kw)


@contextlib.contextmanager
def _launch(cfg, check: Optional[Callable[[torch.device], None]] = None) -> Iterator[Tuple[D.Context, torch.device]]:
    """The process group (under torchrun) and the device for a run; ``check(device)`` (the
    run's own refusals, before anything is written), then rank 0 takes the run directory's
    lock. A failure on any rank before the run starts stops every rank (no rank waits for a
    dead one); the process group made here is destroyed on exit."""
    ctx, device = D.setup(cfg.device, cfg.dist_timeout)
    try:
        if device is None:
            device = resolve_device(cfg.device)
        with contextlib.ExitStack() as stack:
            err = None
            try:
                if check is not None:
                    check(device)
                _check_batch(cfg.batch_size, ctx)
                if ctx.main:
                    stack.enter_context(lock_run(cfg.out))
            except Exception as e:      # noqa: BLE001 -- passed on to every rank, then re-raised
                err = e
            D.agree_or_raise(err, ctx, "the start", device)
            yield ctx, device
    finally:
        D.teardown(ctx)


def _resume_point(cfg, kind: str, objects: Tuple[str, ...], ctx: D.Context) -> Optional[dict]:
    """Rank 0 reads and checks the checkpoint to resume from (if any) and hands it to every
    rank, so ranks on other machines need no shared file system."""
    ckpt, err = None, None
    if ctx.main:
        try:
            ckpt = prepare_out(cfg.out, cfg.resume)
            if ckpt is not None:
                validate(ckpt, kind, cfg, objects, os.path.join(cfg.out, CHECKPOINT))
        except Exception as e:      # noqa: BLE001 -- passed on to every rank, then re-raised
            err = e
    if not ctx.active:
        if err is not None:
            raise err
        return ckpt
    status = D.broadcast_object(("error", f"{type(err).__name__}: {err}") if err is not None else ("ok", ckpt), ctx)
    if err is not None:
        raise err
    if status[0] == "error":
        raise RuntimeError(f"rank 0 could not start the run: {status[1]}")
    return status[1]


def _loss_scale(loader: BatchLoader, step: int, ctx: D.Context) -> float:
    """This rank's loss factor for global batch ``step``: ``world_size * shard / batch``
    (1 for equal shards). A training loader's batches give every rank at least
    :data:`MIN_SHARD` samples (:func:`_check_trainable`, ``min_batch``), so no shard is empty."""
    if not ctx.active:
        return 1.0
    b = loader.global_batch_size(step)
    lo, hi = loader.shard_bounds(step)
    return ctx.world_size * (hi - lo) / b


def _plot(geno, path, title) -> None:
    try:
        from .plot import plot_genotype
    except ImportError as e:  # matplotlib missing: the genotype.json is the result that matters
        print(f"[plot] skipped {path}: {e}", file=sys.stderr)
        return
    plot_genotype(geno, path, title=title)
