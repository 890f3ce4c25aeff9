"""The retrain loop (docs/method.md section 1): :func:`run_retrain` trains the network of a
genotype from scratch (or resumes it) and reports its test accuracy.

The driver (:mod:`adarts_kernels.commands.retrain`: ``adarts-retrain``, or
``python/retrain.py`` in a checkout) only parses arguments into a
:class:`~adarts_kernels.nas.config.RetrainConfig` and calls :func:`run_retrain`. What the
retrain shares with the search loop (non-finite guards, evaluation, data and batch checks,
data parallelism, launch and resume) is in :mod:`.loop_common`, whose docstring describes it.
One step is :func:`retrain_step`; with ``cuda_graphs`` it is replayed from a CUDA graph
(:class:`~adarts_kernels.nas.graphs.GraphedRetrainStep`).
"""
from __future__ import annotations

import json
import os
import time
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import distributed as D
from ..data import BatchLoader
from ..utils.io import atomic_torch_save, atomic_write_text, progress
from . import genotypes as G
from . import imagenet_run as IN
from .architect import scaled_loss
from .checkpoint import CHECKPOINT, payload, restore, resume_keys
from .config import RetrainConfig, check_cuda_graphs
from .eval_model import EvalNetwork, NetworkImageNet, count_parameters
from .loop_common import (READ_EVERY, EpochHook, FiniteGuard, Meter, _check_sizes, _check_trainable, _finish_epoch,
                          _launch, _load_agreed, _loss_scale, _min_batch, _periodic_read, _plot, _resume_point, _say,
                          check_finite_parameters, evaluate)


def retrain_loss(net: nn.Module, x: torch.Tensor, y: torch.Tensor, auxiliary_weight: float,
                 smooth: dict) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(loss, logits)`` of a training forward: the cross-entropy of the logits, plus
    ``auxiliary_weight`` times the auxiliary head's when the network has one; ``smooth``:
    ``{"label_smoothing": s}`` or ``{}``."""
    logits, logits_aux = net(x)
    loss = F.cross_entropy(logits, y, **smooth)
    if logits_aux is not None:
        loss = loss + auxiliary_weight * F.cross_entropy(logits_aux, y, **smooth)
    return loss, logits


def retrain_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, grad_clip: float,
                 auxiliary_weight: float, smooth: dict, scale: float = 1.0,
                 net: Optional[nn.Module] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """One retrain step: :func:`retrain_loss` through ``net`` (``model``, or it in
    ``DistributedDataParallel``) times ``scale`` (data parallelism; 1 otherwise), backward,
    gradient-norm clipping of ``model``'s parameters at ``grad_clip``, ``opt.step()``.
    Returns ``(loss, logits)``, detached, unscaled."""
    opt.zero_grad(set_to_none=True)
    loss, logits = retrain_loss(net if net is not None else model, x, y, auxiliary_weight, smooth)
    scaled_loss(loss, scale).backward()
    nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    return loss.detach(), logits.detach()


def run_retrain(cfg: RetrainConfig, on_epoch_end: Optional[EpochHook] = None) -> dict:
    """Train the network of a genotype from scratch (or resume); returns the final record
    with ``test_acc``. Writes ``checkpoint.pt``, ``log.jsonl`` (one record per epoch),
    ``result.json``, ``cells.png``. Under ``torchrun`` every rank calls this (data parallel,
    ``cfg.batch_size`` the global batch); rank 0 writes the files."""
    cfg = cfg.resolved()
    with _launch(cfg, lambda device: check_cuda_graphs(cfg, device)) as (ctx, device), IN.closing_loaders():
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
    imagenet = IN.is_imagenet(cfg)
    if imagenet:        # the whole train split; the val split monitors and is the final test
        train_set, test_set = IN.retrain_sets(cfg, ctx)
        monitor_set = test_set
    else:
        data = _load_agreed(cfg, ctx, device)
        train_set, test_set = data["train"], data["test"]
        monitor_set = data["val"] if data["val"] is not None else test_set
    _check_sizes(cfg, {"training": train_set, "test": test_set, "monitoring": monitor_set},
                 "a retrain needs at least one training and one test image")
    _check_trainable(cfg, {"training": train_set}, ctx)
    if imagenet:
        size = cfg.image_size
        train_loader, test_loader = IN.retrain_loaders(cfg, train_set, test_set, ctx, device, _min_batch(ctx))
        monitor_loader = test_loader
    else:
        size = train_set.images.shape[-1]
        pad = 4 if size >= 32 else 2
        train_loader = BatchLoader(train_set, cfg.batch_size, shuffle=True, augment=True, pad=pad,
                                   cutout=cfg.cutout, seed=cfg.seed, device=device,
                                   shard=(ctx.rank, ctx.world_size), min_batch=_min_batch(ctx))
        monitor_loader = BatchLoader(monitor_set, 256, shuffle=False, augment=False, device=device)
        test_loader = BatchLoader(test_set, 256, shuffle=False, augment=False, device=device)

    torch.manual_seed(cfg.seed)
    network = NetworkImageNet if imagenet else EvalNetwork
    model = network(cfg.C, train_set.num_classes, cfg.layers, cfg.auxiliary, genotype, image_size=size).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    sched = IN.scheduler(opt, cfg) if cfg.lr_schedule else torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.epochs)
    smooth = {"label_smoothing": cfg.label_smoothing} if cfg.label_smoothing else {}

    # the genotype itself is compared below; a replayed step computes what the eager one does
    run_keys = resume_keys(cfg, ignore=("genotype", "cuda_graphs"))
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
              f"lr {cfg.lr:g}, {cfg.epochs} epochs{', CUDA graphs' if cfg.cuda_graphs else ''}, {device}")
    graphed = None
    if cfg.cuda_graphs:     # one process (check_cuda_graphs): net is model
        from .graphs import GraphedRetrainStep
        graphed = GraphedRetrainStep(model, opt, cfg.auxiliary_weight, cfg.label_smoothing or 0.0)
    if ctx.main:
        _plot(genotype, os.path.join(cfg.out, "cells.png"), f"retrained cell ({cfg.genotype})")

    bad_total = 0
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
            if graphed is not None:
                loss, logits = graphed(x, y, cfg.grad_clip)
            else:
                loss, logits = retrain_step(model, opt, x, y, cfg.grad_clip, cfg.auxiliary_weight, smooth, scale,
                                            net)
            guard.check(loss, step, 1)
            meter.update(loss, logits, y)
            if step % READ_EVERY == READ_EVERY - 1:    # the loop's only host read, outside the step
                _periodic_read(loss, guard, bar, step, epoch, cfg, ctx, getattr(train_loader, "postfix", None))
            drift.maybe_check(f"epoch {epoch + 1}, step {step + 1}")
        train_loss, train_acc, valid_loss, valid_acc = _finish_epoch(
            model, guard, meter, sched, monitor_loader, f"retrain {epoch + 1}/{cfg.epochs} valid", epoch, cfg, ctx)
        at_epoch_end.check(f"the end of epoch {epoch + 1}")
        rec = {"epoch": epoch + 1, "lr": lr, "drop_path": model.drop_path_prob, "train_loss": train_loss,
               "train_acc": train_acc, "valid_loss": valid_loss, "valid_acc": valid_acc,
               "seconds": time.time() - t0}
        if ctx.active:
            rec["world_size"] = ctx.world_size
        if imagenet:
            rec["bad_images"], bad_total = IN.count_bad((train_loader, test_loader), bad_total, ctx, device)
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
    if cfg.top5:
        test_loss, test_acc, test_top5 = IN.evaluate_topk(model, test_loader, "test", cfg.progress and ctx.main, ctx)
    else:
        test_loss, test_acc = evaluate(model, test_loader, "test", cfg.progress and ctx.main, ctx)
    result = {"genotype": G.to_dict(genotype), "params": n_params, "test_loss": test_loss,
              "test_acc": test_acc, "epochs": cfg.epochs, "out": cfg.out}
    if cfg.top5:
        result["test_top5"] = test_top5
    if ctx.main:
        atomic_write_text(json.dumps(result, indent=1), os.path.join(cfg.out, "result.json"))
        top5 = f", top-5 {test_top5:.2f}%" if cfg.top5 else ""
        split = "val" if imagenet else "test"
        print(f"test accuracy: {test_acc:.2f}%{top5} ({len(test_set)} {cfg.dataset} {split} images)")
    return result
