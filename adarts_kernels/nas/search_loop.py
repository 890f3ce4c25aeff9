"""The architecture search loop (docs/method.md section 4): :func:`run_search`, one
:func:`search_step`, the search's epoch, validation and log records (:func:`search_header`,
:func:`arch_summary`), and ``--batch-size auto`` (:func:`auto_batch`, :func:`step_pair_trial`),
which probes with real search steps and is search-only.

The driver (:mod:`adarts_kernels.commands.search`: ``adarts-search``, or ``python/search.py``
in a checkout) only parses arguments into a :class:`~adarts_kernels.nas.config.SearchConfig`
and calls :func:`run_search`. What the search shares with the retrain loop (non-finite
guards, evaluation, data and batch checks, data parallelism, launch and resume) is in
:mod:`.loop_common`, whose docstring describes it. With ``cuda_graphs`` the steps are
replayed from CUDA graphs (:class:`~adarts_kernels.nas.graphs.GraphedSearchStep`).
"""
from __future__ import annotations

import copy
import json
import os
import time
from typing import Callable, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import distributed as D
from ..data import BatchLoader, search_split
from ..profiling.max_batch import find_max_batch, safe_batch
from ..utils.io import atomic_torch_save, atomic_write_text, progress
from . import genotypes as G
from . import imagenet_run as IN
from .architect import Architect, scaled_loss
from .checkpoint import CHECKPOINT, payload, restore, resume_keys
from .config import SEARCH_PRESETS, SearchConfig, check_cuda_graphs, check_impl, scaled_lr
from .loop_common import (READ_EVERY, EpochHook, FiniteGuard, Meter, _check_batch, _check_sizes, _check_trainable,
                          _finish_epoch, _launch, _load_agreed, _loss_scale, _min_batch, _periodic_read, _plot,
                          _resume_point, _say, check_finite_parameters)
from .search_model import SearchNetwork, normalized_betas

AUTO_BATCH = "auto_batch.json"
#: the share of the largest fitting batch that ``--batch-size auto`` uses
AUTO_BATCH_MARGIN = 0.9

#: ``trial(batch)`` runs what a search step does at ``batch`` and returns normally, or
#: raises an out-of-memory error (:func:`~adarts_kernels.profiling.max_batch.is_oom`).
BatchTrial = Callable[[int], None]


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


def _search_model(cfg: SearchConfig, num_classes: int, device: torch.device) -> SearchNetwork:
    stem = {"stem": "imagenet"} if IN.is_imagenet(cfg) else {}
    model = SearchNetwork(cfg.C, num_classes, cfg.layers, edge=cfg.edge, k=cfg.k, kernels=cfg.kernels,
                          recompute=cfg.recompute, impl=cfg.impl, **stem).to(device)
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
            "channels_last": cfg.channels_last, "cuda_graphs": cfg.cuda_graphs, "batch_size": cfg.batch_size,
            "lr": cfg.lr, "auto_batch": auto, "device": str(device), "torch": torch.__version__,
            "world_size": ctx.world_size, "backend": ctx.backend}


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
        check_cuda_graphs(cfg, device)
        if cfg.channels_last and device.type != "cuda":
            raise ValueError("channels_last is a GPU option: on CPU the fused kernels already run their "
                             "convolutions in channels_last where it pays, and torch's CPU channels_last "
                             "convolution backward can corrupt memory on the strided views the plain-PyTorch "
                             "FactorizedReduce makes (seen with torch 2.13)")
    with _launch(cfg, check) as (ctx, device), IN.closing_loaders():
        return _run_search(cfg, device, on_epoch_end, batch_trial, ctx)


def _run_search(cfg: SearchConfig, device: torch.device, on_epoch_end: Optional[EpochHook],
                batch_trial: Optional[BatchTrial], ctx: D.Context = D.SINGLE) -> dict:
    if cfg.warmup_epochs >= cfg.epochs:     # legal (a smoke run), but the search then searches nothing
        _say(ctx, f"warning: --warmup-epochs {cfg.warmup_epochs} >= --epochs {cfg.epochs}: the architecture is "
                  f"never updated (alpha and beta stay at their initial values)")
    ckpt = _resume_point(cfg, "search", ("model", "w_opt", "a_opt", "sched"), ctx)
    imagenet = IN.is_imagenet(cfg)
    if imagenet:                     # ImageNet: the manifest's disjoint per-class subsets
        w_set, a_set = IN.search_sets(cfg, ckpt is not None, ctx)
    else:
        data = _load_agreed(cfg, ctx, device)
        if data["val"] is not None:      # digits: fixed train / val split
            w_set, a_set = data["train"], data["val"]
        else:                            # CIFAR: first half weights, last half architecture
            w_set, a_set = search_split(data["train"])
    _check_sizes(cfg, {"weights": w_set, "architecture": a_set},
                 "a search needs at least 2 training images: the first half trains the weights, the last "
                 "half the architecture")
    _check_trainable(cfg, {"weights": w_set, "architecture": a_set}, ctx)
    size = cfg.image_size if imagenet else w_set.images.shape[-1]
    pad = 4 if size >= 32 else 2

    torch.manual_seed(cfg.seed)
    model = _search_model(cfg, w_set.num_classes, device)
    auto = None
    if cfg.batch_size == "auto":
        if ckpt is not None:         # resume: the batch (and lr, unless given) the run was started with
            cfg.batch_size = ckpt["config"].get("batch_size")
            if cfg.lr is None:
                cfg.lr = ckpt["config"].get("lr")
        else:
            auto = auto_batch(cfg, model, device, w_set.num_classes, size, trial=batch_trial, ctx=ctx)
            if ctx.main:
                atomic_write_text(json.dumps(auto, indent=1), os.path.join(cfg.out, AUTO_BATCH))
        _check_batch(cfg.batch_size, ctx)
    shard, min_batch = (ctx.rank, ctx.world_size), _min_batch(ctx)
    if imagenet:
        train_loader, arch_loader, eval_loader = IN.search_loaders(cfg, w_set, a_set, ctx, device, min_batch)
    else:
        train_loader = BatchLoader(w_set, cfg.batch_size, shuffle=True, augment=True, pad=pad,
                                   seed=cfg.seed, device=device, shard=shard, min_batch=min_batch)
        arch_loader = BatchLoader(a_set, cfg.batch_size, shuffle=True, augment=True, pad=pad,
                                  seed=cfg.seed + 1, device=device, shard=shard, min_batch=min_batch)
        eval_loader = BatchLoader(a_set, cfg.batch_size, shuffle=False, augment=False, device=device)

    w_opt = torch.optim.SGD(model.weight_parameters(), lr=cfg.lr, momentum=cfg.momentum,
                            weight_decay=cfg.weight_decay)
    sched = (IN.scheduler(w_opt, cfg) if cfg.lr_schedule else
             torch.optim.lr_scheduler.CosineAnnealingLR(w_opt, cfg.epochs, eta_min=cfg.lr_min))
    architect = Architect(model, cfg.arch_lr, cfg.arch_betas, cfg.arch_weight_decay, unrolled=cfg.unrolled,
                          reduce=(lambda ts: D.average_(ts, "arch_grads")) if ctx.active else None)

    run_keys = resume_keys(cfg, ignore=("cuda_graphs",))   # a replayed step computes what the eager one does
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
              f"{', bf16 autocast' if cfg.amp else ''}{', channels_last' if cfg.channels_last else ''}"
              f"{', CUDA graphs' if cfg.cuda_graphs else ''}, {device}")

    weights = list(model.weight_parameters())
    graphed = None
    if cfg.cuda_graphs:     # one process (check_cuda_graphs): net is model
        from .graphs import GraphedSearchStep
        graphed = GraphedSearchStep(model, architect, w_opt, weights, channels_last=cfg.channels_last)
    bad_total = 0
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
            if graphed is not None:
                loss, logits, vloss = graphed(x, y, xv, yv, lr, cfg.grad_clip)
            else:
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
                _periodic_read(loss, guard, bar, step, epoch, cfg, ctx, getattr(train_loader, "postfix", None))
            drift.maybe_check(f"epoch {epoch + 1}, step {step + 1}")
        train_loss, train_acc, valid_loss, valid_acc = _finish_epoch(
            model, guard, meter, sched, eval_loader, f"search {epoch + 1}/{cfg.epochs} valid", epoch, cfg, ctx)
        if imagenet:
            bad, bad_total = IN.count_bad((train_loader, arch_loader, eval_loader), bad_total, ctx, device)
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
        if imagenet:
            rec["bad_images"] = bad
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
