"""Search and retrain loops (docs/method.md sections 1 and 4), with atomic checkpoints and resume.

The drivers in ``python/`` only parse arguments into a
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
"""
from __future__ import annotations

import copy
import json
import os
import sys
import time
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data import BatchLoader, load_dataset, search_split
from ..profiling.max_batch import find_max_batch, safe_batch
from ..utils.io import atomic_torch_save, atomic_write_text, progress, set_postfix
from . import genotypes as G
from .architect import Architect
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


def _read(loss: Optional[torch.Tensor], guard: FiniteGuard) -> Tuple[Optional[float], float, float]:
    """One host read: the loss (if given), the guard's step and code."""
    vals = ([loss.detach().double().reshape(())] if loss is not None else []) + guard.values()
    got = torch.stack(vals).tolist()     # one device-to-host copy
    return (got[0] if loss is not None else None), got[-2], got[-1]


def _periodic_read(loss: torch.Tensor, guard: FiniteGuard, bar, step: int, epoch: int, cfg) -> None:
    """Every READ_EVERY steps: the non-finite flag (raises) and, with progress bars, the loss shown."""
    shown, bad_step, code = _read(loss if cfg.progress else None, guard)
    guard.raise_if_bad(bad_step, code, epoch, cfg.out)
    if shown is not None:
        set_postfix(bar, last_loss=f"{shown:.3f} (step {step + 1})")


def _finish_epoch(model: nn.Module, guard: FiniteGuard, meter, sched, loader: BatchLoader, desc: str, epoch: int,
                  cfg) -> Tuple[float, float, float, float]:
    """The end of a training epoch, search or retrain: the guard's last read, every parameter
    finite, the scheduler step, the train meters, and the validation pass; raises
    :class:`NonFiniteError` on any non-finite value. Returns ``(train_loss, train_acc,
    valid_loss, valid_acc)``."""
    _, bad_step, code = _read(None, guard)
    guard.raise_if_bad(bad_step, code, epoch, cfg.out)
    check_finite_parameters(model, epoch, cfg.out)
    sched.step()
    train_loss, train_acc = meter.read()
    valid_loss, valid_acc = evaluate(model, loader, desc, cfg.progress)
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


def _check_sizes(cfg, parts: dict, need: str) -> None:
    """Refuse empty splits with a message saying what is too small, before any work."""
    empty = [name for name, part in parts.items() if part is None or len(part) == 0]
    if empty:
        limit = f" (--limit {cfg.limit})" if cfg.limit is not None else ""
        which = f"the {empty[0]} split is" if len(empty) == 1 else f"the {' and '.join(empty)} splits are"
        raise ValueError(f"too few images in {cfg.dataset}{limit}: {which} empty; {need}")


@torch.no_grad()
def evaluate(model: nn.Module, loader: BatchLoader, desc: str = "", bar: bool = False) -> Tuple[float, float]:
    """Mean loss and accuracy (%) of ``model`` over ``loader`` (eval mode, no augmentation);
    ``bar``: a progress bar labelled ``desc``."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64)
    correct = torch.zeros((), dtype=torch.int64)
    n = 0
    for x, y in progress(loader, total=len(loader), desc=desc, enable=bar):
        out = model(x)
        logits = out[0] if isinstance(out, tuple) else out
        loss_sum = loss_sum + F.cross_entropy(logits, y, reduction="sum").double().cpu()
        correct = correct + (logits.argmax(1) == y).sum().cpu()
        n += y.shape[0]
    model.train(was_training)
    return float(loss_sum) / max(n, 1), 100.0 * float(correct) / max(n, 1)


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

    def read(self) -> Tuple[float, float]:
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


def search_step(model: SearchNetwork, architect: Architect, w_opt: torch.optim.Optimizer, weights: List[torch.Tensor],
                x: torch.Tensor, y: torch.Tensor, xv: Optional[torch.Tensor], yv: Optional[torch.Tensor],
                lr: float, grad_clip: float, channels_last: bool = False):
    """One search step (docs/method.md section 4): an architecture step on ``(xv, yv)`` when given,
    then a weight step on ``(x, y)`` with gradient-norm clipping.

    Returns ``(loss, logits, arch_loss)`` as device tensors (``arch_loss`` is ``None``
    without an architecture step). Nothing here reads device values on the host: with the
    fused kernels the step makes no host synchronisation.
    """
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        xv = None if xv is None else xv.contiguous(memory_format=torch.channels_last)
    vloss = None
    if xv is not None:
        vloss = architect.step(x, y, xv, yv, eta=lr, weight_optimizer=w_opt)
    w_opt.zero_grad(set_to_none=True)
    logits = model(x)
    loss = F.cross_entropy(logits, y)
    loss.backward()
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
               trial: Optional[BatchTrial] = None) -> dict:
    """Find the largest search batch that fits ``device``, keep a 10% margin
    (:data:`AUTO_BATCH_MARGIN`), and scale the weight lr linearly from the preset unless
    ``cfg.lr`` was given. Sets ``cfg.batch_size`` and ``cfg.lr``; returns what was found
    (written to ``auto_batch.json`` by :func:`run_search`).

    ``trial``: ``trial(b)`` raises an out-of-memory error when batch ``b`` does not fit
    (default: :func:`step_pair_trial`, real steps on a model copy, which needs a CUDA
    device: a CPU does not raise when it runs out of memory). Tests inject their own.
    ``cfg`` must be resolved (``cfg.preset`` set)."""
    cuda = _is_cuda(device)
    if trial is None:
        if not cuda:
            raise ValueError(f"--batch-size auto probes GPU memory; it needs a CUDA device, got {device}")
        trial = step_pair_trial(cfg, model, device, num_classes, size)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    best, tried = find_max_batch(trial, start=16, limit=1 << 14)
    chosen = safe_batch(best, AUTO_BATCH_MARGIN)
    preset = SEARCH_PRESETS[cfg.preset]
    user_lr = cfg.lr is not None
    if not user_lr:
        cfg.lr = scaled_lr(preset, chosen)
    cfg.batch_size = chosen
    return {"max_fit": best, "batch_size": chosen, "margin": AUTO_BATCH_MARGIN, "lr": cfg.lr,
            "lr_rule": "given" if user_lr else f"{preset['lr']} x {chosen}/{preset['batch_size']}",
            "tried": [[b, ok] for b, ok in tried],
            "device": torch.cuda.get_device_name(device) if cuda else str(device)}


def search_header(cfg: SearchConfig, model: SearchNetwork, device: torch.device,
                  auto: Optional[dict] = None) -> dict:
    """The first record of a search's ``log.jsonl``: what ran where. ``backends`` maps each
    fused op to the backend it runs on (``None`` for the plain-PyTorch modules)."""
    return {"kind": "header", "run": "search", "edge": cfg.edge, "kernels": cfg.kernels, "impl": cfg.impl,
            "backends": model.backends(device), "recompute": cfg.recompute, "amp": cfg.amp,
            "channels_last": cfg.channels_last, "batch_size": cfg.batch_size, "lr": cfg.lr,
            "auto_batch": auto, "device": str(device), "torch": torch.__version__}


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
    """
    cfg = cfg.resolved()
    device = resolve_device(cfg.device)
    check_impl(cfg, device)
    if cfg.channels_last and device.type != "cuda":
        raise ValueError("channels_last is a GPU option: on CPU the fused kernels already run their "
                         "convolutions in channels_last where it pays, and torch's CPU channels_last "
                         "convolution backward can corrupt memory on the strided views the plain-PyTorch "
                         "FactorizedReduce makes (seen with torch 2.13)")
    with lock_run(cfg.out):
        return _run_search(cfg, device, on_epoch_end, batch_trial)


def _run_search(cfg: SearchConfig, device: torch.device, on_epoch_end: Optional[EpochHook],
                batch_trial: Optional[BatchTrial]) -> dict:
    ckpt = prepare_out(cfg.out, cfg.resume)
    if ckpt is not None:
        validate(ckpt, "search", cfg, ("model", "w_opt", "a_opt", "sched"), os.path.join(cfg.out, CHECKPOINT))

    data = _load(cfg)
    if data["val"] is not None:      # digits: fixed train / val split
        w_set, a_set = data["train"], data["val"]
    else:                            # CIFAR: first half weights, last half architecture
        w_set, a_set = search_split(data["train"])
    _check_sizes(cfg, {"weights": w_set, "architecture": a_set},
                 "a search needs at least 2 training images: the first half trains the weights, the last "
                 "half the architecture")
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
            auto = auto_batch(cfg, model, device, w_set.num_classes, w_set.images.shape[-1], trial=batch_trial)
            atomic_write_text(json.dumps(auto, indent=1), os.path.join(cfg.out, AUTO_BATCH))
    train_loader = BatchLoader(w_set, cfg.batch_size, shuffle=True, augment=True, pad=pad,
                               seed=cfg.seed, device=device)
    arch_loader = BatchLoader(a_set, cfg.batch_size, shuffle=True, augment=True, pad=pad,
                              seed=cfg.seed + 1, device=device)
    eval_loader = BatchLoader(a_set, cfg.batch_size, shuffle=False, augment=False, device=device)

    w_opt = torch.optim.SGD(model.weight_parameters(), lr=cfg.lr, momentum=cfg.momentum,
                            weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(w_opt, cfg.epochs, eta_min=cfg.lr_min)
    architect = Architect(model, cfg.arch_lr, cfg.arch_betas, cfg.arch_weight_decay, unrolled=cfg.unrolled)

    run_keys = resume_keys(cfg)
    history, start_epoch, logger, header = restore(ckpt, cfg, run_keys, {
        "model": model, "w_opt": w_opt, "a_opt": architect, "sched": sched},
        header=search_header(cfg, model, device, auto))

    n_weights = sum(p.numel() for p in model.weight_parameters())
    backends = header["backends"]
    print(f"search: {cfg.edge} supernet C={cfg.C} layers={cfg.layers} k={cfg.k}, {n_weights:,} weights; "
          f"{cfg.dataset} {len(w_set)}+{len(a_set)} images, batch {cfg.batch_size}"
          f"{' (auto: largest fit ' + str(auto['max_fit']) + ')' if auto else ''}, lr {cfg.lr:g}, "
          f"{cfg.epochs} epochs ({cfg.warmup_epochs} warm-up), "
          f"{'second' if cfg.unrolled else 'first'} order, kernels {cfg.kernels}"
          f"{' (' + ', '.join(sorted(set(backends.values()))) + ' backend)' if backends else ''}, "
          f"recompute {cfg.recompute}"
          f"{', bf16 autocast' if cfg.amp else ''}{', channels_last' if cfg.channels_last else ''}, {device}",
          file=sys.stderr)

    weights = list(model.weight_parameters())
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.time()
        lr = w_opt.param_groups[0]["lr"]
        train_loader.set_epoch(epoch)
        arch_loader.set_epoch(epoch)
        model.train()
        meter, arch_meter = Meter(device), Meter(device)
        guard = FiniteGuard(device)
        arch_iter, arch_pass = iter(arch_loader), 0
        bar = progress(train_loader, total=len(train_loader), desc=f"search {epoch + 1}/{cfg.epochs}",
                       enable=cfg.progress)
        for step, (x, y) in enumerate(bar):
            xv = yv = None
            if epoch >= cfg.warmup_epochs:
                try:
                    xv, yv = next(arch_iter)
                except StopIteration:  # the architecture half is smaller: a fresh pass, fresh order
                    arch_pass += 1
                    arch_loader.set_epoch(epoch * 1009 + arch_pass)
                    arch_iter = iter(arch_loader)
                    xv, yv = next(arch_iter)
            loss, logits, vloss = search_step(model, architect, w_opt, weights, x, y, xv, yv, lr, cfg.grad_clip,
                                              channels_last=cfg.channels_last)
            if vloss is not None:
                arch_meter.loss += vloss.double() * yv.shape[0]
                arch_meter.n += yv.shape[0]
                guard.check(vloss, step, 2)
            guard.check(loss, step, 1)
            meter.update(loss, logits, y)
            if step % READ_EVERY == READ_EVERY - 1:    # the loop's only host read, outside the step
                _periodic_read(loss, guard, bar, step, epoch, cfg)
        train_loss, train_acc, valid_loss, valid_acc = _finish_epoch(
            model, guard, meter, sched, eval_loader, f"search {epoch + 1}/{cfg.epochs} valid", epoch, cfg)
        geno = model.genotype()
        rec = {
            "epoch": epoch + 1, "lr": lr, "train_loss": train_loss, "train_acc": train_acc,
            "arch_loss": (float(arch_meter.loss) / arch_meter.n) if arch_meter.n else None,
            "valid_loss": valid_loss, "valid_acc": valid_acc, "batch_size": cfg.batch_size,
            "genotype": G.to_dict(geno), "normal_skip_connect": G.count_skips(geno.normal),
            **arch_summary(model), "seconds": time.time() - t0,
        }
        history.append(rec)
        atomic_torch_save(payload("search", epoch, cfg, history, G.to_dict(geno), model=model.state_dict(),
                                  w_opt=w_opt.state_dict(), a_opt=architect.state_dict(),
                                  sched=sched.state_dict(), header=header),
                          os.path.join(cfg.out, CHECKPOINT))
        logger.log(rec)
        print(f"search epoch {epoch + 1}/{cfg.epochs}: train loss {train_loss:.3f} acc {train_acc:.1f}%, "
              f"valid acc {valid_acc:.1f}%, skip_connect in normal cell: {rec['normal_skip_connect']}, "
              f"{rec['seconds']:.1f}s", file=sys.stderr)
        if on_epoch_end is not None:
            on_epoch_end(epoch, rec)

    check_finite_parameters(model, cfg.epochs - 1, cfg.out)
    geno = model.genotype()
    G.save(geno, os.path.join(cfg.out, "genotype.json"))
    _plot(geno, os.path.join(cfg.out, "cells.png"), f"{cfg.edge} search on {cfg.dataset}")
    final = history[-1] if history else {}
    result = {"genotype": G.to_dict(geno), "valid_acc": final.get("valid_acc"), "epochs": cfg.epochs,
              "out": cfg.out}
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
    ``result.json``, ``cells.png``."""
    cfg = cfg.resolved()
    device = resolve_device(cfg.device)
    with lock_run(cfg.out):
        return _run_retrain(cfg, device, on_epoch_end)


def _run_retrain(cfg: RetrainConfig, device: torch.device, on_epoch_end: Optional[EpochHook]) -> dict:
    ckpt = prepare_out(cfg.out, cfg.resume)
    if ckpt is not None:
        validate(ckpt, "retrain", cfg, ("model", "opt", "sched"), os.path.join(cfg.out, CHECKPOINT))
    genotype = G.load(cfg.genotype)

    data = _load(cfg)
    train_set, test_set = data["train"], data["test"]
    monitor_set = data["val"] if data["val"] is not None else test_set
    _check_sizes(cfg, {"training": train_set, "test": test_set, "monitoring": monitor_set},
                 "a retrain needs at least one training and one test image")
    size = train_set.images.shape[-1]
    pad = 4 if size >= 32 else 2
    train_loader = BatchLoader(train_set, cfg.batch_size, shuffle=True, augment=True, pad=pad,
                               cutout=cfg.cutout, seed=cfg.seed, device=device)
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
    history, start_epoch, logger, _ = restore(ckpt, cfg, run_keys, {"model": model, "opt": opt, "sched": sched})

    n_params = count_parameters(model)
    print(f"retrain: C={cfg.C} layers={cfg.layers} aux={cfg.auxiliary}, {n_params / 1e6:.3f}M weights "
          f"(auxiliary excluded); {cfg.dataset} {len(train_set)} images, batch {cfg.batch_size}, "
          f"lr {cfg.lr:g}, {cfg.epochs} epochs, {device}", file=sys.stderr)
    _plot(genotype, os.path.join(cfg.out, "cells.png"), f"retrained cell ({cfg.genotype})")

    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.time()
        lr = opt.param_groups[0]["lr"]
        model.drop_path_prob = cfg.drop_path * epoch / cfg.epochs
        train_loader.set_epoch(epoch)
        model.train()
        meter = Meter(device)
        guard = FiniteGuard(device)
        bar = progress(train_loader, total=len(train_loader), desc=f"retrain {epoch + 1}/{cfg.epochs}",
                       enable=cfg.progress)
        for step, (x, y) in enumerate(bar):
            opt.zero_grad(set_to_none=True)
            logits, logits_aux = model(x)
            loss = F.cross_entropy(logits, y)
            if logits_aux is not None:
                loss = loss + cfg.auxiliary_weight * F.cross_entropy(logits_aux, y)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            guard.check(loss, step, 1)
            meter.update(loss, logits, y)
            if step % READ_EVERY == READ_EVERY - 1:    # the loop's only host read, outside the step
                _periodic_read(loss, guard, bar, step, epoch, cfg)
        train_loss, train_acc, valid_loss, valid_acc = _finish_epoch(
            model, guard, meter, sched, monitor_loader, f"retrain {epoch + 1}/{cfg.epochs} valid", epoch, cfg)
        rec = {"epoch": epoch + 1, "lr": lr, "drop_path": model.drop_path_prob, "train_loss": train_loss,
               "train_acc": train_acc, "valid_loss": valid_loss, "valid_acc": valid_acc,
               "seconds": time.time() - t0}
        history.append(rec)
        atomic_torch_save(payload("retrain", epoch, cfg, history, G.to_dict(genotype), model=model.state_dict(),
                                  opt=opt.state_dict(), sched=sched.state_dict()),
                          os.path.join(cfg.out, CHECKPOINT))
        logger.log(rec)
        print(f"retrain epoch {epoch + 1}/{cfg.epochs}: train loss {train_loss:.3f} acc {train_acc:.1f}%, "
              f"valid acc {valid_acc:.1f}%, {rec['seconds']:.1f}s", file=sys.stderr)
        if on_epoch_end is not None:
            on_epoch_end(epoch, rec)

    check_finite_parameters(model, cfg.epochs - 1, cfg.out)
    test_loss, test_acc = evaluate(model, test_loader, "test", cfg.progress)
    result = {"genotype": G.to_dict(genotype), "params": n_params, "test_loss": test_loss,
              "test_acc": test_acc, "epochs": cfg.epochs, "out": cfg.out}
    atomic_write_text(json.dumps(result, indent=1), os.path.join(cfg.out, "result.json"))
    print(f"test accuracy: {test_acc:.2f}% ({len(test_set)} {cfg.dataset} test images)")
    return result
