"""Search and retrain loops (docs/method.md sections 1 and 4), with atomic checkpoints and resume.

The drivers (:mod:`adarts_kernels.commands`: ``adarts-search`` / ``adarts-retrain``, or
``python/search.py`` / ``python/retrain.py`` in a checkout) only parse arguments into a
:class:`~adarts_kernels.nas.config.SearchConfig` or
:class:`~adarts_kernels.nas.config.RetrainConfig` and call :func:`run_search` /
:func:`run_retrain`.

Reproducibility: the batches of epoch ``e`` are a pure function of ``(seed, e)``
(:class:`~adarts_kernels.data.BatchLoader`), and the checkpoint written after every epoch
holds everything a resumed run needs to continue exactly (``nas/checkpoint.py``).

Non-finite values stop a run: every step folds ``isfinite(loss)`` into a flag on the device
(:class:`FiniteGuard`, no host read in the step), read together with the progress bar's
loss every 10 steps and at each epoch's end, where the parameters are checked too. A bad
value raises :class:`NonFiniteError` before that epoch's checkpoint is written, so the
checkpoint keeps the last good epoch, and no genotype is derived from non-finite parameters.

Data parallelism (``torchrun``, :mod:`adarts_kernels.distributed`): every rank runs these
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
import copy
import json
import os
import sys
import time
from typing import Callable, Iterator, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import distributed as D
from ..data import BatchLoader, load_dataset, search_split
from ..profiling.max_batch import find_max_batch, safe_batch
from ..utils.io import atomic_torch_save, atomic_write_text, progress, set_postfix
from . import genotypes as G
from .architect import Architect, scaled_loss
from .checkpoint import CHECKPOINT, lock_run, payload, prepare_out, restore, resume_keys, validate
from .config import (SEARCH_PRESETS, RetrainConfig, SearchConfig, check_impl, resolve_device,
                     scaled_lr)
from .eval_model import EvalNetwork, count_parameters
from .search_model import SearchNetwork, normalized_betas

AUTO_BATCH = "auto_batch.json"
#: the share of the largest fitting batch that ``--batch-size auto`` uses
AUTO_BATCH_MARGIN = 0.9

#: ``trial(batch)`` runs what a search step does at ``batch`` and returns normally, or
#: raises an out-of-memory error (:func:`~adarts_kernels.profiling.max_batch.is_oom`).
BatchTrial = Callable[[int], None]
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
                   ctx: D.Context = D.SINGLE) -> None:
    """Every READ_EVERY steps: the non-finite flag (raises) and, with progress bars, the loss shown."""
    shown, bad_step, code = _read(loss if (cfg.progress and ctx.main) else None, guard, ctx)
    guard.raise_if_bad(bad_step, code, epoch, cfg.out)
    if shown is not None:
        set_postfix(bar, last_loss=f"{shown:.3f} (step {step + 1})")


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


def arch_summary(model: SearchNetwork) -> dict:
    """Softmaxed alpha (rows of 8, PRIMITIVES order) and node-normalised beta, as lists."""
    out = {
        "alpha_normal": F.softmax(model.alphas_normal.detach(), -1).cpu().tolist(),
        "alpha_reduce": F.softmax(model.alphas_reduce.detach(), -1).cpu().tolist(),
    }
    if model.betas_normal is not None:
        out["beta_normal"] = normalized_betas(model.betas_normal.detach(), model._steps).cpu().tolist()
        out["beta_reduce"] = normalized_betas(model.betas_reduce.detach(), model._steps).cpu().tolist()
    return out


# ----------------------------------------------------------------------------- search

def _search_model(cfg: SearchConfig, num_classes: int, device: torch.device) -> SearchNetwork:
    model = SearchNetwork(cfg.C, num_classes, cfg.layers, edge=cfg.edge, k=cfg.k, kernels=cfg.kernels,
                          recompute=cfg.recompute, impl=cfg.impl).to(device)
    if cfg.amp:
        model.autocast_dtype = torch.bfloat16
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def search_step(model: nn.Module, architect: Architect, w_opt: torch.optim.Optimizer, weights: List[torch.Tensor],
                x: torch.Tensor, y: torch.Tensor, xv: Optional[torch.Tensor], yv: Optional[torch.Tensor],
                lr: float, grad_clip: float, channels_last: bool = False, scale: float = 1.0,
                arch_scale: float = 1.0):
    """One search step (docs/method.md section 4): an architecture step on ``(xv, yv)`` when given,
    then a weight step on ``(x, y)`` with gradient-norm clipping.

    ``model``: the :class:`SearchNetwork`, or it in ``DistributedDataParallel`` (the weight
    step then averages the weight gradients over the ranks; ``architect`` holds the bare
    network). ``scale``/``arch_scale``: the weight/architecture losses' factor under data
    parallelism (``world_size * shard / global batch``; 1 otherwise).

    Returns ``(loss, logits, arch_loss)`` as device tensors (``arch_loss`` is ``None``
    without an architecture step; the losses are this process's, unscaled). Nothing here
    reads device values on the host: with the fused kernels the step makes no host
    synchronisation.
    """
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        xv = None if xv is None else xv.contiguous(memory_format=torch.channels_last)
    vloss = None
    if xv is not None:
        vloss = architect.step(x, y, xv, yv, eta=lr, weight_optimizer=w_opt, scale=arch_scale)
    w_opt.zero_grad(set_to_none=True)
    logits = model(x)
    loss = F.cross_entropy(logits, y)
    scaled_loss(loss, scale).backward()
    nn.utils.clip_grad_norm_(weights, grad_clip, foreach=True)
    w_opt.step()
    return loss.detach(), logits.detach(), vloss


def _is_cuda(device: torch.device) -> bool:
    """The one device check in front of the CUDA-only lines of the probe (tests replace it)."""
    return device.type == "cuda"


def step_pair_trial(cfg: SearchConfig, model: SearchNetwork, device: torch.device, num_classes: int,
                    size: int) -> BatchTrial:
    """The real probe: ``trial(b)`` runs two search steps at batch ``b`` (both optimizers,
    the architecture step included; the second step has the optimizer states allocated) on
    a copy of ``model``, random ``(b, 3, size, size)`` images, then waits for the device.
    ``model`` itself is never touched."""
    def trial(b: int) -> None:
        probe = copy.deepcopy(model)
        probe.set_selector(None)    # this process alone: no collective in a probe
        w = list(probe.weight_parameters())
        opt = torch.optim.SGD(w, lr=0.0, momentum=cfg.momentum)
        arch = Architect(probe, 0.0, cfg.arch_betas, 0.0, unrolled=cfg.unrolled)
        x = torch.randn(b, 3, size, size, device=device)
        t = torch.randint(0, num_classes, (b,), device=device)
        try:
            for _ in range(2):
                search_step(probe, arch, opt, w, x, t, x, t, 0.0, cfg.grad_clip, cfg.channels_last)
            if _is_cuda(device):
                torch.cuda.synchronize(device)
        finally:
            del probe, opt, arch, x, t, w
    return trial


def auto_batch(cfg: SearchConfig, model: SearchNetwork, device: torch.device, num_classes: int, size: int,
               trial: Optional[BatchTrial] = None, ctx: D.Context = D.SINGLE) -> dict:
    """Find the largest search batch that fits ``device``, keep a 10% margin
    (:data:`AUTO_BATCH_MARGIN`), and scale the weight lr linearly from the preset unless
    ``cfg.lr`` was given. Sets ``cfg.batch_size`` and ``cfg.lr``; returns what was found
    (written to ``auto_batch.json`` by :func:`run_search`).

    ``trial``: ``trial(b)`` raises an out-of-memory error when batch ``b`` does not fit
    (default: :func:`step_pair_trial`, real steps on a model copy, which needs a CUDA
    device: a CPU does not raise when it runs out of memory). Tests inject their own.
    ``cfg`` must be resolved (``cfg.preset`` set).

    Under data parallelism every rank probes its own device at the same time; the smallest
    of the largest fitting per-rank batches is kept (one all-reduce), and the global batch
    is ``world_size`` times the per-rank batch chosen from it."""
    cuda = _is_cuda(device)
    if trial is None:
        if not cuda:
            raise ValueError(f"--batch-size auto probes GPU memory; it needs a CUDA device, got {device}")
        trial = step_pair_trial(cfg, model, device, num_classes, size)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    best, tried = find_max_batch(trial, start=16, limit=1 << 14)
    world = ctx.world_size if ctx.active else 1
    if ctx.active:
        mine = torch.tensor([float(best)], dtype=torch.float64, device=device)
        D.all_reduce_(mine, "auto_batch", op=torch.distributed.ReduceOp.MIN)
        best = int(mine.item())
    chosen = safe_batch(best, AUTO_BATCH_MARGIN) * world
    preset = SEARCH_PRESETS[cfg.preset]
    user_lr = cfg.lr is not None
    if not user_lr:
        cfg.lr = scaled_lr(preset, chosen)
    cfg.batch_size = chosen
    ranks = {"per_rank": chosen // world, "world_size": world} if ctx.active else {}
    return {"max_fit": best, **ranks, "batch_size": chosen, "margin": AUTO_BATCH_MARGIN, "lr": cfg.lr,
            "lr_rule": "given" if user_lr else f"{preset['lr']} x {chosen}/{preset['batch_size']}",
            "tried": [[b, ok] for b, ok in tried],
            "device": torch.cuda.get_device_name(device) if cuda else str(device)}


def search_header(cfg: SearchConfig, model: SearchNetwork, device: torch.device,
                  auto: Optional[dict] = None, ctx: D.Context = D.SINGLE) -> dict:
    """The first record of a search's ``log.jsonl``: what ran where. ``backends`` maps each
    fused op to the backend it runs on (``None`` for the plain-PyTorch modules);
    ``world_size`` is the number of data-parallel ranks (1 without torchrun)."""
    return {"kind": "header", "run": "search", "edge": cfg.edge, "kernels": cfg.kernels, "impl": cfg.impl,
            "backends": model.backends(device), "recompute": cfg.recompute, "amp": cfg.amp,
            "channels_last": cfg.channels_last, "batch_size": cfg.batch_size, "lr": cfg.lr,
            "auto_batch": auto, "device": str(device), "torch": torch.__version__,
            "world_size": ctx.world_size, "backend": ctx.backend}


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


def run_search(cfg: SearchConfig, on_epoch_end: Optional[EpochHook] = None,
               batch_trial: Optional[BatchTrial] = None) -> dict:
    """Run (or resume) an architecture search; returns the final record.

    Writes into ``cfg.out``: ``checkpoint.pt`` (every epoch, atomically), ``log.jsonl``
    (a header record, :func:`search_header`, then one record per epoch), ``genotype.json``
    and ``cells.png`` (the derived cells), and with ``batch_size="auto"``
    ``auto_batch.json`` (what :func:`auto_batch` found).
    ``on_epoch_end(epoch, record)`` is called after each epoch's checkpoint is written.
    ``batch_trial`` replaces the probe of ``batch_size="auto"`` (see :func:`auto_batch`);
    a resumed run never probes: it keeps the batch and lr its checkpoint was made with.

    Under ``torchrun`` every rank calls this (see the module docstring); rank 0 writes the
    files, every rank returns the same record.
    """
    cfg = cfg.resolved()

    def check(device: torch.device) -> None:
        check_impl(cfg, device)
        if cfg.channels_last and device.type != "cuda":
            raise ValueError("channels_last is a GPU option: on CPU the fused kernels already run their "
                             "convolutions in channels_last where it pays, and torch's CPU channels_last "
                             "convolution backward can corrupt memory on the strided views the plain-PyTorch "
                             "FactorizedReduce makes (seen with torch 2.13)")
    with _launch(cfg, check) as (ctx, device):
        return _run_search(cfg, device, on_epoch_end, batch_trial, ctx)


def _run_search(cfg: SearchConfig, device: torch.device, on_epoch_end: Optional[EpochHook],
                batch_trial: Optional[BatchTrial], ctx: D.Context = D.SINGLE) -> dict:
    if cfg.warmup_epochs >= cfg.epochs:     # legal (a smoke run), but the search then searches nothing
        _say(ctx, f"warning: --warmup-epochs {cfg.warmup_epochs} >= --epochs {cfg.epochs}: the architecture is "
                  f"never updated (alpha and beta stay at their initial values)")
    ckpt = _resume_point(cfg, "search", ("model", "w_opt", "a_opt", "sched"), ctx)
    data = _load_agreed(cfg, ctx, device)
    if data["val"] is not None:      # digits: fixed train / val split
        w_set, a_set = data["train"], data["val"]
    else:                            # CIFAR: first half weights, last half architecture
        w_set, a_set = search_split(data["train"])
    _check_sizes(cfg, {"weights": w_set, "architecture": a_set},
                 "a search needs at least 2 training images: the first half trains the weights, the last "
                 "half the architecture")
    _check_trainable(cfg, {"weights": w_set, "architecture": a_set}, ctx)
    pad = 4 if w_set.images.shape[-1] >= 32 else 2

    torch.manual_seed(cfg.seed)
    model = _search_model(cfg, w_set.num_classes, device)
    auto = None
    if cfg.batch_size == "auto":
        if ckpt is not None:         # resume: the batch (and lr, unless given) the run was started with
            cfg.batch_size = ckpt["config"].get("batch_size")
            if cfg.lr is None:
                cfg.lr = ckpt["config"].get("lr")
        else:
            auto = auto_batch(cfg, model, device, w_set.num_classes, w_set.images.shape[-1], trial=batch_trial,
                              ctx=ctx)
            if ctx.main:
                atomic_write_text(json.dumps(auto, indent=1), os.path.join(cfg.out, AUTO_BATCH))
        _check_batch(cfg.batch_size, ctx)
    shard, min_batch = (ctx.rank, ctx.world_size), _min_batch(ctx)
    train_loader = BatchLoader(w_set, cfg.batch_size, shuffle=True, augment=True, pad=pad,
                               seed=cfg.seed, device=device, shard=shard, min_batch=min_batch)
    arch_loader = BatchLoader(a_set, cfg.batch_size, shuffle=True, augment=True, pad=pad,
                              seed=cfg.seed + 1, device=device, shard=shard, min_batch=min_batch)
    eval_loader = BatchLoader(a_set, cfg.batch_size, shuffle=False, augment=False, device=device)

    w_opt = torch.optim.SGD(model.weight_parameters(), lr=cfg.lr, momentum=cfg.momentum,
                            weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(w_opt, cfg.epochs, eta_min=cfg.lr_min)
    architect = Architect(model, cfg.arch_lr, cfg.arch_betas, cfg.arch_weight_decay, unrolled=cfg.unrolled,
                          reduce=(lambda ts: D.average_(ts, "arch_grads")) if ctx.active else None)

    run_keys = resume_keys(cfg)
    history, start_epoch, logger, header = restore(ckpt, cfg, run_keys, {
        "model": model, "w_opt": w_opt, "a_opt": architect, "sched": sched},
        header=search_header(cfg, model, device, auto, ctx), write=ctx.main)

    net: nn.Module = model
    if ctx.active:
        model.set_selector(D.GlobalSelector())
        net = D.wrap_ddp(model, device, ignore=model.arch_parameter_names())
    drift = D.DriftGuard(list(model.named_parameters()), cfg.check_every, ctx)
    at_epoch_end = D.DriftGuard(list(model.named_parameters()) + list(model.named_buffers()), 0, ctx)

    n_weights = sum(p.numel() for p in model.weight_parameters())
    backends = header["backends"]
    ranks = f", {ctx.world_size} ranks ({ctx.backend}, {cfg.batch_size // ctx.world_size} per rank)" if ctx.active else ""
    _say(ctx, f"search: {cfg.edge} supernet C={cfg.C} layers={cfg.layers} k={cfg.k}, {n_weights:,} weights; "
              f"{cfg.dataset} {len(w_set)}+{len(a_set)} images, batch {cfg.batch_size}"
              f"{' (auto: largest fit ' + str(auto['max_fit']) + ')' if auto else ''}{ranks}, lr {cfg.lr:g}, "
              f"{cfg.epochs} epochs ({cfg.warmup_epochs} warm-up), "
              f"{'second' if cfg.unrolled else 'first'} order, kernels {cfg.kernels}"
              f"{' (' + ', '.join(sorted(set(backends.values()))) + ' backend)' if backends else ''}, "
              f"recompute {cfg.recompute}"
              f"{', bf16 autocast' if cfg.amp else ''}{', channels_last' if cfg.channels_last else ''}, {device}")

    weights = list(model.weight_parameters())
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.time()
        lr = w_opt.param_groups[0]["lr"]
        train_loader.set_epoch(epoch)
        arch_loader.set_epoch(epoch)
        model.train()
        meter, arch_meter = Meter(device), Meter(device)
        guard = FiniteGuard(device)
        arch_iter, arch_step, arch_pass = iter(arch_loader), 0, 0
        bar = progress(train_loader, total=len(train_loader), desc=f"search {epoch + 1}/{cfg.epochs}",
                       enable=cfg.progress and ctx.main)
        for step, (x, y) in enumerate(bar):
            xv = yv = None
            arch_scale = 1.0
            if epoch >= cfg.warmup_epochs:
                try:
                    xv, yv = next(arch_iter)
                except StopIteration:  # the architecture half is smaller: a fresh pass, fresh order
                    arch_pass += 1
                    arch_loader.set_epoch(epoch * 1009 + arch_pass)
                    arch_iter, arch_step = iter(arch_loader), 0
                    xv, yv = next(arch_iter)
                arch_scale = _loss_scale(arch_loader, arch_step, ctx)
                arch_step += 1
            scale = _loss_scale(train_loader, step, ctx)
            loss, logits, vloss = search_step(net, architect, w_opt, weights, x, y, xv, yv, lr, cfg.grad_clip,
                                              channels_last=cfg.channels_last, scale=scale,
                                              arch_scale=arch_scale)
            if vloss is not None:
                arch_meter.loss += vloss.double() * yv.shape[0]
                arch_meter.n += yv.shape[0]
                guard.check(vloss, step, 2)
            guard.check(loss, step, 1)
            meter.update(loss, logits, y)
            if step % READ_EVERY == READ_EVERY - 1:    # the loop's only host read, outside the step
                _periodic_read(loss, guard, bar, step, epoch, cfg, ctx)
            drift.maybe_check(f"epoch {epoch + 1}, step {step + 1}")
        train_loss, train_acc, valid_loss, valid_acc = _finish_epoch(
            model, guard, meter, sched, eval_loader, f"search {epoch + 1}/{cfg.epochs} valid", epoch, cfg, ctx)
        arch_loss = arch_meter.read(ctx)[0] if epoch >= cfg.warmup_epochs else None
        at_epoch_end.check(f"the end of epoch {epoch + 1}")
        geno = model.genotype()
        rec = {
            "epoch": epoch + 1, "lr": lr, "train_loss": train_loss, "train_acc": train_acc,
            "arch_loss": arch_loss,
            "valid_loss": valid_loss, "valid_acc": valid_acc, "batch_size": cfg.batch_size,
            "genotype": G.to_dict(geno), "normal_skip_connect": G.count_skips(geno.normal),
            **arch_summary(model), "seconds": time.time() - t0,
        }
        if ctx.active:
            rec["world_size"] = ctx.world_size
        history.append(rec)
        if ctx.main:
            atomic_torch_save(payload("search", epoch, cfg, history, G.to_dict(geno), model=model.state_dict(),
                                      w_opt=w_opt.state_dict(), a_opt=architect.state_dict(),
                                      sched=sched.state_dict(), header=header),
                              os.path.join(cfg.out, CHECKPOINT))
            logger.log(rec)
        _say(ctx, f"search epoch {epoch + 1}/{cfg.epochs}: train loss {train_loss:.3f} acc {train_acc:.1f}%, "
                  f"valid acc {valid_acc:.1f}%, skip_connect in normal cell: {rec['normal_skip_connect']}, "
                  f"{rec['seconds']:.1f}s")
        if on_epoch_end is not None:
            on_epoch_end(epoch, rec)

    check_finite_parameters(model, cfg.epochs - 1, cfg.out)
    geno = model.genotype()
    if ctx.main:
        G.save(geno, os.path.join(cfg.out, "genotype.json"))
        _plot(geno, os.path.join(cfg.out, "cells.png"), f"{cfg.edge} search on {cfg.dataset}")
    final = history[-1] if history else {}
    result = {"genotype": G.to_dict(geno), "valid_acc": final.get("valid_acc"), "epochs": cfg.epochs,
              "out": cfg.out}
    if ctx.main:
        print(f"genotype: {geno}")
    return result


def _plot(geno, path, title) -> None:
    try:
        from .plot import plot_genotype
    except ImportError as e:  # matplotlib missing: the genotype.json is the result that matters
        print(f"[plot] skipped {path}: {e}", file=sys.stderr)
        return
    plot_genotype(geno, path, title=title)


# ----------------------------------------------------------------------------- retrain

def run_retrain(cfg: RetrainConfig, on_epoch_end: Optional[EpochHook] = None) -> dict:
    """Train the network of a genotype from scratch (or resume); returns the final record
    with ``test_acc``. Writes ``checkpoint.pt``, ``log.jsonl`` (one record per epoch),
    ``result.json``, ``cells.png``. Under ``torchrun`` every rank calls this (data parallel,
    ``cfg.batch_size`` the global batch); rank 0 writes the files."""
    cfg = cfg.resolved()
    with _launch(cfg) as (ctx, device):
        return _run_retrain(cfg, device, on_epoch_end, ctx)


def _seed_epoch(cfg, epoch: int, ctx: D.Context) -> None:
    """Data parallelism: each epoch's global RNG (drop-path masks) seeded from
    ``(seed, epoch, rank)``, so ranks draw independent masks and a resumed run, with any
    number of ranks, draws what an uninterrupted one with that number would. One process
    keeps the RNG state its checkpoint restored."""
    if ctx.active:
        torch.manual_seed((cfg.seed * 1_000_003 + epoch) * 4099 + ctx.rank)


def _run_retrain(cfg: RetrainConfig, device: torch.device, on_epoch_end: Optional[EpochHook],
                 ctx: D.Context = D.SINGLE) -> dict:
    ckpt = _resume_point(cfg, "retrain", ("model", "opt", "sched"), ctx)
    genotype = G.load(cfg.genotype)
    data = _load_agreed(cfg, ctx, device)
    train_set, test_set = data["train"], data["test"]
    monitor_set = data["val"] if data["val"] is not None else test_set
    _check_sizes(cfg, {"training": train_set, "test": test_set, "monitoring": monitor_set},
                 "a retrain needs at least one training and one test image")
    _check_trainable(cfg, {"training": train_set}, ctx)
    size = train_set.images.shape[-1]
    pad = 4 if size >= 32 else 2
    train_loader = BatchLoader(train_set, cfg.batch_size, shuffle=True, augment=True, pad=pad,
                               cutout=cfg.cutout, seed=cfg.seed, device=device, shard=(ctx.rank, ctx.world_size),
                               min_batch=_min_batch(ctx))
    monitor_loader = BatchLoader(monitor_set, 256, shuffle=False, augment=False, device=device)
    test_loader = BatchLoader(test_set, 256, shuffle=False, augment=False, device=device)

    torch.manual_seed(cfg.seed)
    model = EvalNetwork(cfg.C, train_set.num_classes, cfg.layers, cfg.auxiliary, genotype,
                        image_size=size).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.epochs)

    run_keys = resume_keys(cfg, ignore=("genotype",))   # the genotype itself is compared below
    if ckpt is not None and ckpt.get("genotype") != G.to_dict(genotype):
        raise ValueError(f"cannot resume {cfg.out}: the checkpoint was trained with another genotype")
    history, start_epoch, logger, _ = restore(ckpt, cfg, run_keys, {"model": model, "opt": opt, "sched": sched},
                                              write=ctx.main)
    net: nn.Module = D.wrap_ddp(model, device) if ctx.active else model
    drift = D.DriftGuard(list(model.named_parameters()), cfg.check_every, ctx)
    at_epoch_end = D.DriftGuard(list(model.named_parameters()) + list(model.named_buffers()), 0, ctx)

    n_params = count_parameters(model)
    ranks = f", {ctx.world_size} ranks ({ctx.backend}, {cfg.batch_size // ctx.world_size} per rank)" if ctx.active else ""
    _say(ctx, f"retrain: C={cfg.C} layers={cfg.layers} aux={cfg.auxiliary}, {n_params / 1e6:.3f}M weights "
              f"(auxiliary excluded); {cfg.dataset} {len(train_set)} images, batch {cfg.batch_size}{ranks}, "
              f"lr {cfg.lr:g}, {cfg.epochs} epochs, {device}")
    if ctx.main:
        _plot(genotype, os.path.join(cfg.out, "cells.png"), f"retrained cell ({cfg.genotype})")

    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.time()
        lr = opt.param_groups[0]["lr"]
        model.drop_path_prob = cfg.drop_path * epoch / cfg.epochs
        train_loader.set_epoch(epoch)
        _seed_epoch(cfg, epoch, ctx)
        model.train()
        meter = Meter(device)
        guard = FiniteGuard(device)
        bar = progress(train_loader, total=len(train_loader), desc=f"retrain {epoch + 1}/{cfg.epochs}",
                       enable=cfg.progress and ctx.main)
        for step, (x, y) in enumerate(bar):
            scale = _loss_scale(train_loader, step, ctx)
            opt.zero_grad(set_to_none=True)
            logits, logits_aux = net(x)
            loss = F.cross_entropy(logits, y)
            if logits_aux is not None:
                loss = loss + cfg.auxiliary_weight * F.cross_entropy(logits_aux, y)
            scaled_loss(loss, scale).backward()
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            guard.check(loss, step, 1)
            meter.update(loss, logits, y)
            if step % READ_EVERY == READ_EVERY - 1:    # the loop's only host read, outside the step
                _periodic_read(loss, guard, bar, step, epoch, cfg, ctx)
            drift.maybe_check(f"epoch {epoch + 1}, step {step + 1}")
        train_loss, train_acc, valid_loss, valid_acc = _finish_epoch(
            model, guard, meter, sched, monitor_loader, f"retrain {epoch + 1}/{cfg.epochs} valid", epoch, cfg, ctx)
        at_epoch_end.check(f"the end of epoch {epoch + 1}")
        rec = {"epoch": epoch + 1, "lr": lr, "drop_path": model.drop_path_prob, "train_loss": train_loss,
               "train_acc": train_acc, "valid_loss": valid_loss, "valid_acc": valid_acc,
               "seconds": time.time() - t0}
        if ctx.active:
            rec["world_size"] = ctx.world_size
        history.append(rec)
        if ctx.main:
            atomic_torch_save(payload("retrain", epoch, cfg, history, G.to_dict(genotype),
                                      model=model.state_dict(), opt=opt.state_dict(), sched=sched.state_dict()),
                              os.path.join(cfg.out, CHECKPOINT))
            logger.log(rec)
        _say(ctx, f"retrain epoch {epoch + 1}/{cfg.epochs}: train loss {train_loss:.3f} acc {train_acc:.1f}%, "
                  f"valid acc {valid_acc:.1f}%, {rec['seconds']:.1f}s")
        if on_epoch_end is not None:
            on_epoch_end(epoch, rec)

    check_finite_parameters(model, cfg.epochs - 1, cfg.out)
    test_loss, test_acc = evaluate(model, test_loader, "test", cfg.progress and ctx.main, ctx)
    result = {"genotype": G.to_dict(genotype), "params": n_params, "test_loss": test_loss,
              "test_acc": test_acc, "epochs": cfg.epochs, "out": cfg.out}
    if ctx.main:
        atomic_write_text(json.dumps(result, indent=1), os.path.join(cfg.out, "result.json"))
        print(f"test accuracy: {test_acc:.2f}% ({len(test_set)} {cfg.dataset} test images)")
    return result
