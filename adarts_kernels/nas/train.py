"""Search and retrain loops (SPEC sections 1 and 4), with atomic checkpoints and resume.

The drivers in ``python/`` only parse arguments into a :class:`SearchConfig` or
:class:`RetrainConfig` and call :func:`run_search` / :func:`run_retrain`.

Reproducibility: the batches of epoch ``e`` are a pure function of ``(seed, e)``
(:class:`~adarts_kernels.data.BatchLoader`), and the checkpoint written after every epoch
holds the model, both optimizers, the scheduler, the global RNG states and the log, so a
resumed run continues exactly where the interrupted one stopped.
"""
from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data import BatchLoader, load_dataset, search_split
from ..utils.io import JsonlLogger, atomic_torch_save, atomic_write_text, load_checkpoint, progress, set_postfix
from . import genotypes as G
from .architect import Architect
from .eval_model import EvalNetwork, count_parameters
from .search_model import SearchNetwork, normalized_betas, resolve_kernels

CHECKPOINT = "checkpoint.pt"
LOG = "log.jsonl"

# ----------------------------------------------------------------------------- configs

#: Search presets. ``adarts``: the authors' public defaults (SPEC section 4); ``pcdarts``:
#: PC-DARTS's large-batch setting; ``digits``: small enough that the embedded digits
#: search finishes in a couple of minutes on 2 CPU cores.
SEARCH_PRESETS: Dict[str, dict] = {
    "adarts": dict(C=16, layers=8, batch_size=64, lr=0.025, epochs=80, warmup_epochs=15),
    "pcdarts": dict(C=16, layers=8, batch_size=256, lr=0.1, epochs=50, warmup_epochs=15),
    "digits": dict(C=8, layers=5, batch_size=64, lr=0.05, epochs=10, warmup_epochs=3),
}

#: Retrain presets. ``darts``: SPEC section 1 with DARTS's defaults; ``digits``: a small
#: network for the embedded data set.
RETRAIN_PRESETS: Dict[str, dict] = {
    "darts": dict(C=36, layers=20, batch_size=96, lr=0.025, epochs=600, auxiliary=True,
                  drop_path=0.3, cutout=16),
    "digits": dict(C=16, layers=6, batch_size=64, lr=0.05, epochs=30, auxiliary=True,
                   drop_path=0.1, cutout=4),
}


@dataclass
class SearchConfig:
    """Everything a search run needs; ``None`` fields are filled from the preset."""
    dataset: str = "digits"
    data: Optional[str] = None
    download: bool = False
    out: str = "runs/search"
    preset: Optional[str] = None
    edge: str = "adarts"
    k: int = 4
    kernels: str = "auto"       # "auto" (fused for the adarts edge), "fused" or "reference"
    recompute: str = "none"     # "none" or "edge" (keep only edge inputs; re-run edges in backward)
    amp: bool = False           # bfloat16 autocast (float32 by default)
    channels_last: bool = False
    C: Optional[int] = None
    layers: Optional[int] = None
    batch_size: Optional[Union[int, str]] = None   # an int, or "auto" (largest that fits the GPU)
    lr: Optional[float] = None
    lr_min: float = 0.0
    momentum: float = 0.9
    weight_decay: float = 3e-4
    grad_clip: float = 5.0
    epochs: Optional[int] = None
    warmup_epochs: Optional[int] = None
    arch_lr: float = 6e-4
    arch_betas: Tuple[float, float] = (0.5, 0.999)
    arch_weight_decay: float = 1e-3
    unrolled: bool = False
    image_size: int = 16  # digits only; CIFAR is 32x32
    limit: Optional[int] = None  # use at most this many images per split (smoke runs)
    seed: int = 2
    device: str = "auto"
    progress: bool = True
    resume: bool = False

    def resolved(self) -> "SearchConfig":
        """A copy with the preset applied and the learning rate scaled to the batch size."""
        name = self.preset or ("digits" if self.dataset == "digits" else "adarts")
        if name not in SEARCH_PRESETS:
            raise ValueError(f"unknown search preset {name!r}; expected one of {sorted(SEARCH_PRESETS)}")
        c = dataclasses.replace(self, preset=name)
        c.kernels = resolve_kernels(c.edge, c.kernels, c.recompute)
        if c.batch_size == "auto":
            return _apply_preset(c, SEARCH_PRESETS[name], scale_lr=False)
        return _apply_preset(c, SEARCH_PRESETS[name])


@dataclass
class RetrainConfig:
    """Everything a retrain run needs; ``None`` fields are filled from the preset."""
    genotype: str = "ADARTS_V1"
    dataset: str = "digits"
    data: Optional[str] = None
    download: bool = False
    out: str = "runs/retrain"
    preset: Optional[str] = None
    C: Optional[int] = None
    layers: Optional[int] = None
    batch_size: Optional[int] = None
    lr: Optional[float] = None
    momentum: float = 0.9
    weight_decay: float = 3e-4
    grad_clip: float = 5.0
    epochs: Optional[int] = None
    auxiliary: Optional[bool] = None
    auxiliary_weight: float = 0.4
    drop_path: Optional[float] = None
    cutout: Optional[int] = None
    image_size: int = 16
    limit: Optional[int] = None
    seed: int = 0
    device: str = "auto"
    progress: bool = True
    resume: bool = False

    def resolved(self) -> "RetrainConfig":
        name = self.preset or ("digits" if self.dataset == "digits" else "darts")
        if name not in RETRAIN_PRESETS:
            raise ValueError(f"unknown retrain preset {name!r}; expected one of {sorted(RETRAIN_PRESETS)}")
        G.load(self.genotype)  # fail early on an unknown name or a bad file
        return _apply_preset(dataclasses.replace(self, preset=name), RETRAIN_PRESETS[name])


def _apply_preset(c, preset: dict, scale_lr: bool = True):
    """Fill ``c``'s unset fields from ``preset``; an unset lr follows the linear scaling rule
    (SPEC section 4): the preset's lr times batch size over the preset's batch size.
    ``scale_lr=False`` (batch size ``"auto"``, not known yet) leaves both for later."""
    for key, value in preset.items():
        if key != "lr" and getattr(c, key) is None:
            setattr(c, key, value)
    if isinstance(c.batch_size, str) and c.batch_size != "auto":
        raise ValueError(f"batch_size must be a positive integer or 'auto', got {c.batch_size!r}")
    if scale_lr and c.lr is None:
        c.lr = preset["lr"] * c.batch_size / preset["batch_size"]
    _check_common(c)
    return c


def _check_common(c) -> None:
    if c.dataset not in ("digits", "cifar10", "cifar100"):
        raise ValueError(f"unknown dataset {c.dataset!r}; expected digits, cifar10 or cifar100")
    for key in ("batch_size", "epochs", "C", "layers"):
        if key == "batch_size" and c.batch_size == "auto":
            continue
        if getattr(c, key) < 1:
            raise ValueError(f"{key} must be at least 1, got {getattr(c, key)}")
    if c.limit is not None and c.limit < 1:
        raise ValueError(f"limit must be at least 1, got {c.limit}")
    if c.lr is not None and c.lr <= 0:
        raise ValueError(f"lr must be positive, got {c.lr}")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} asked for, but this torch sees no CUDA device")
    return dev


# ----------------------------------------------------------------------------- helpers

def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _prepare_out(out: str, resume: bool) -> Optional[dict]:
    """Create ``out``; return the checkpoint to resume from, if any. Refuses to overwrite."""
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, CHECKPOINT)
    if os.path.exists(path):
        if not resume:
            raise FileExistsError(f"{out} already holds a run ({path}); pass --resume to continue it "
                                  f"or choose another --out")
        return load_checkpoint(path)
    if resume:
        print(f"[resume] no checkpoint at {path}: starting from scratch", file=sys.stderr)
    return None


def _load(cfg) -> dict:
    data = load_dataset(cfg.dataset, root=cfg.data, download=cfg.download,
                        size=cfg.image_size if cfg.dataset == "digits" else None)
    if cfg.limit is not None:
        data = {k: (v.subset(range(min(cfg.limit, len(v)))) if v is not None else None) for k, v in data.items()}
    return data


def _check_same_run(saved: dict, now: dict, keys) -> None:
    diff = {k: (saved.get(k), now.get(k)) for k in keys if saved.get(k) != now.get(k)}
    if diff:
        detail = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items())
        raise ValueError(f"cannot resume: the checkpoint was made with other settings ({detail})")


def _restore(ckpt: Optional[dict], cfg, run_keys, objects: dict) -> Tuple[List[dict], int, JsonlLogger]:
    """Load ``objects`` (name -> thing with ``load_state_dict``) and the RNG state from
    ``ckpt``; return the log so far, the first epoch to run, and the log file rewritten to
    match the checkpoint exactly."""
    history: List[dict] = []
    start_epoch = 0
    if ckpt is not None:
        _check_same_run(ckpt["config"], dataclasses.asdict(cfg), run_keys)
        for key, obj in objects.items():
            obj.load_state_dict(ckpt[key])
        history = ckpt["history"]
        start_epoch = ckpt["epoch"] + 1
        _set_rng_state(ckpt["rng"])
        print(f"[resume] {cfg.out}: continuing after epoch {start_epoch}/{cfg.epochs}", file=sys.stderr)
    logger = JsonlLogger(os.path.join(cfg.out, LOG), append=False)
    for rec in history:
        logger.log(rec)
    return history, start_epoch, logger


@torch.no_grad()
def evaluate(model: nn.Module, loader: BatchLoader) -> Tuple[float, float]:
    """Mean loss and accuracy (%) of ``model`` over ``loader`` (eval mode, no augmentation)."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64)
    correct = torch.zeros((), dtype=torch.int64)
    n = 0
    for x, y in loader:
        out = model(x)
        logits = out[0] if isinstance(out, tuple) else out
        loss_sum = loss_sum + F.cross_entropy(logits, y, reduction="sum").double().cpu()
        correct = correct + (logits.argmax(1) == y).sum().cpu()
        n += y.shape[0]
    model.train(was_training)
    return float(loss_sum) / max(n, 1), 100.0 * float(correct) / max(n, 1)


class _Meter:
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

EpochHook = Callable[[int, dict], None]


def _search_model(cfg: "SearchConfig", num_classes: int, device: torch.device) -> SearchNetwork:
    model = SearchNetwork(cfg.C, num_classes, cfg.layers, edge=cfg.edge, k=cfg.k, kernels=cfg.kernels,
                          recompute=cfg.recompute).to(device)
    if cfg.amp:
        model.autocast_dtype = torch.bfloat16
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def search_step(model: SearchNetwork, architect: Architect, w_opt: torch.optim.Optimizer, weights: List[torch.Tensor],
                x: torch.Tensor, y: torch.Tensor, xv: Optional[torch.Tensor], yv: Optional[torch.Tensor],
                lr: float, grad_clip: float, channels_last: bool = False):
    """One search step (SPEC section 4): an architecture step on ``(xv, yv)`` when given,
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


def _auto_batch(cfg: "SearchConfig", model: SearchNetwork, device: torch.device, num_classes: int,
                size: int) -> dict:
    """Find the largest search batch that fits ``device`` with real steps on a copy of the
    model (both optimizers, the architecture step included), keep a 10% margin, and scale
    the weight lr linearly from the preset. Sets ``cfg.batch_size`` and ``cfg.lr``."""
    import copy
    from ..profiling.max_batch import find_max_batch, safe_batch
    if device.type != "cuda":
        raise ValueError(f"--batch-size auto probes GPU memory; it needs a CUDA device, got {device}")

    def try_batch(b: int) -> None:
        probe = copy.deepcopy(model)
        w = list(probe.weight_parameters())
        opt = torch.optim.SGD(w, lr=0.0, momentum=cfg.momentum)
        arch = Architect(probe, 0.0, cfg.arch_betas, 0.0, unrolled=cfg.unrolled)
        x = torch.randn(b, 3, size, size, device=device)
        t = torch.randint(0, num_classes, (b,), device=device)
        try:
            for _ in range(2):       # the second step has the optimizer states allocated
                search_step(probe, arch, opt, w, x, t, x, t, 0.0, cfg.grad_clip, cfg.channels_last)
            torch.cuda.synchronize(device)
        finally:
            del probe, opt, arch, x, t, w

    torch.cuda.reset_peak_memory_stats(device)
    best, tried = find_max_batch(try_batch, start=16, limit=1 << 14)
    chosen = safe_batch(best, 0.9)
    preset = SEARCH_PRESETS[cfg.preset]
    user_lr = cfg.lr is not None
    if not user_lr:
        cfg.lr = preset["lr"] * chosen / preset["batch_size"]
    cfg.batch_size = chosen
    return {"max_fit": best, "batch_size": chosen, "margin": 0.9, "lr": cfg.lr,
            "lr_rule": "given" if user_lr else f"{preset['lr']} x {chosen}/{preset['batch_size']}",
            "tried": tried, "device": torch.cuda.get_device_name(device)}


def run_search(cfg: SearchConfig, on_epoch_end: Optional[EpochHook] = None) -> dict:
    """Run (or resume) an architecture search; returns the final record.

    Writes into ``cfg.out``: ``checkpoint.pt`` (every epoch, atomically), ``log.jsonl``
    (one record per epoch), ``genotype.json`` and ``cells.png`` (the derived cells).
    ``on_epoch_end(epoch, record)`` is called after each epoch's checkpoint is written.
    """
    cfg = cfg.resolved()
    device = resolve_device(cfg.device)
    ckpt = _prepare_out(cfg.out, cfg.resume)

    data = _load(cfg)
    if data["val"] is not None:      # digits: fixed train / val split
        w_set, a_set = data["train"], data["val"]
    else:                            # CIFAR: first half weights, last half architecture
        w_set, a_set = search_split(data["train"])
    pad = 4 if w_set.images.shape[-1] >= 32 else 2

    if cfg.channels_last and device.type != "cuda":
        raise ValueError("channels_last is a GPU option: on CPU the fused kernels already run their "
                         "convolutions in channels_last where it pays, and torch's CPU channels_last "
                         "convolution backward can corrupt memory on the strided views the plain-PyTorch "
                         "FactorizedReduce makes (seen with torch 2.13)")
    torch.manual_seed(cfg.seed)
    model = _search_model(cfg, w_set.num_classes, device)
    auto = None
    if cfg.batch_size == "auto":
        if ckpt is not None:         # resume: the batch the run was started with
            cfg.batch_size, cfg.lr = ckpt["config"]["batch_size"], ckpt["config"]["lr"]
        else:
            auto = _auto_batch(cfg, model, device, w_set.num_classes, w_set.images.shape[-1])
            atomic_write_text(os.path.join(cfg.out, "auto_batch.json"), json.dumps(auto, indent=1))
    train_loader = BatchLoader(w_set, cfg.batch_size, shuffle=True, augment=True, pad=pad,
                               seed=cfg.seed, device=device)
    arch_loader = BatchLoader(a_set, cfg.batch_size, shuffle=True, augment=True, pad=pad,
                              seed=cfg.seed + 1, device=device)
    eval_loader = BatchLoader(a_set, cfg.batch_size, shuffle=False, augment=False, device=device)

    w_opt = torch.optim.SGD(model.weight_parameters(), lr=cfg.lr, momentum=cfg.momentum,
                            weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(w_opt, cfg.epochs, eta_min=cfg.lr_min)
    architect = Architect(model, cfg.arch_lr, cfg.arch_betas, cfg.arch_weight_decay, unrolled=cfg.unrolled)

    run_keys = ("dataset", "edge", "k", "C", "layers", "batch_size", "epochs", "seed", "unrolled", "image_size",
                "limit")
    history, start_epoch, logger = _restore(ckpt, cfg, run_keys, {
        "model": model, "w_opt": w_opt, "a_opt": architect, "sched": sched})

    n_weights = sum(p.numel() for p in model.weight_parameters())
    print(f"search: {cfg.edge} supernet C={cfg.C} layers={cfg.layers} k={cfg.k}, {n_weights:,} weights; "
          f"{cfg.dataset} {len(w_set)}+{len(a_set)} images, batch {cfg.batch_size}"
          f"{' (auto: largest fit ' + str(auto['max_fit']) + ')' if auto else ''}, lr {cfg.lr:g}, "
          f"{cfg.epochs} epochs ({cfg.warmup_epochs} warm-up), "
          f"{'second' if cfg.unrolled else 'first'} order, kernels {cfg.kernels}, recompute {cfg.recompute}"
          f"{', bf16 autocast' if cfg.amp else ''}{', channels_last' if cfg.channels_last else ''}, {device}",
          file=sys.stderr)

    weights = list(model.weight_parameters())
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.time()
        lr = w_opt.param_groups[0]["lr"]
        train_loader.set_epoch(epoch)
        arch_loader.set_epoch(epoch)
        model.train()
        meter, arch_meter = _Meter(device), _Meter(device)
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
            meter.update(loss, logits, y)
            if cfg.progress and step % 10 == 0:    # the loop's only host read, outside the step
                set_postfix(bar, loss=f"{float(loss):.3f}")
        sched.step()
        train_loss, train_acc = meter.read()
        valid_loss, valid_acc = evaluate(model, eval_loader)
        geno = model.genotype()
        rec = {
            "epoch": epoch + 1, "lr": lr, "train_loss": train_loss, "train_acc": train_acc,
            "arch_loss": (float(arch_meter.loss) / arch_meter.n) if arch_meter.n else None,
            "valid_loss": valid_loss, "valid_acc": valid_acc, "batch_size": cfg.batch_size,
            "genotype": G.to_dict(geno), "normal_skip_connect": G.count_skips(geno.normal),
            **arch_summary(model), "seconds": time.time() - t0,
        }
        history.append(rec)
        atomic_torch_save({
            "kind": "search", "epoch": epoch, "config": dataclasses.asdict(cfg), "model": model.state_dict(),
            "w_opt": w_opt.state_dict(), "a_opt": architect.state_dict(), "sched": sched.state_dict(),
            "rng": _rng_state(), "history": history, "genotype": G.to_dict(geno),
        }, os.path.join(cfg.out, CHECKPOINT))
        logger.log(rec)
        print(f"search epoch {epoch + 1}/{cfg.epochs}: train loss {train_loss:.3f} acc {train_acc:.1f}%, "
              f"valid acc {valid_acc:.1f}%, skip_connect in normal cell: {rec['normal_skip_connect']}, "
              f"{rec['seconds']:.1f}s", file=sys.stderr)
        if on_epoch_end is not None:
            on_epoch_end(epoch, rec)

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
    with ``test_acc``. Writes ``checkpoint.pt``, ``log.jsonl``, ``result.json``, ``cells.png``."""
    cfg = cfg.resolved()
    device = resolve_device(cfg.device)
    ckpt = _prepare_out(cfg.out, cfg.resume)
    genotype = G.load(cfg.genotype)

    data = _load(cfg)
    train_set, test_set = data["train"], data["test"]
    monitor_set = data["val"] if data["val"] is not None else test_set
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

    run_keys = ("dataset", "C", "layers", "batch_size", "epochs", "seed", "auxiliary", "image_size", "limit")
    if ckpt is not None and ckpt.get("genotype") != G.to_dict(genotype):
        raise ValueError(f"cannot resume {cfg.out}: the checkpoint was trained with another genotype")
    history, start_epoch, logger = _restore(ckpt, cfg, run_keys, {"model": model, "opt": opt, "sched": sched})

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
        meter = _Meter(device)
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
            meter.update(loss, logits, y)
            if cfg.progress and step % 10 == 0:    # the loop's only host read, outside the step
                set_postfix(bar, loss=f"{float(loss):.3f}")
        sched.step()
        train_loss, train_acc = meter.read()
        valid_loss, valid_acc = evaluate(model, monitor_loader)
        rec = {"epoch": epoch + 1, "lr": lr, "drop_path": model.drop_path_prob, "train_loss": train_loss,
               "train_acc": train_acc, "valid_loss": valid_loss, "valid_acc": valid_acc,
               "seconds": time.time() - t0}
        history.append(rec)
        atomic_torch_save({
            "kind": "retrain", "epoch": epoch, "config": dataclasses.asdict(cfg), "model": model.state_dict(),
            "opt": opt.state_dict(), "sched": sched.state_dict(), "rng": _rng_state(), "history": history,
            "genotype": G.to_dict(genotype),
        }, os.path.join(cfg.out, CHECKPOINT))
        logger.log(rec)
        print(f"retrain epoch {epoch + 1}/{cfg.epochs}: train loss {train_loss:.3f} acc {train_acc:.1f}%, "
              f"valid acc {valid_acc:.1f}%, {rec['seconds']:.1f}s", file=sys.stderr)
        if on_epoch_end is not None:
            on_epoch_end(epoch, rec)

    test_loss, test_acc = evaluate(model, test_loader)
    result = {"genotype": G.to_dict(genotype), "params": n_params, "test_loss": test_loss,
              "test_acc": test_acc, "epochs": cfg.epochs, "out": cfg.out}
    import json
    atomic_write_text(json.dumps(result, indent=1), os.path.join(cfg.out, "result.json"))
    print(f"test accuracy: {test_acc:.2f}% ({len(test_set)} {cfg.dataset} test images)")
    return result
