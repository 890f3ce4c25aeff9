"""ImageNet in the search and retrain loops: the data sets, loaders, lr schedules, top-5
evaluation and bad-image accounting that ``--dataset imagenet`` adds to :mod:`.search_loop`
and :mod:`.retrain_loop` (CIFAR and digits do not use this module).

- **Search data**: PC-DARTS's per-class subsets (``train_fraction`` of every class trains the
  weights, a disjoint ``arch_fraction`` the architecture), drawn once by rank 0 from the
  ImageFolder (:func:`~adarts_kernels.data.make_search_manifest`, seeded by ``--seed``) and
  written to ``<out>/manifest.json`` at the first start; a resumed run reads that file back
  (checked against the folder and the settings), so it reads exactly the same images. Rank 0
  hands the manifest to every rank: ranks on other machines need the same folder, not the
  run directory.
- **Retrain data**: the whole ``train`` split (RandomResizedCrop, flip, ColorJitter) and the
  ``val`` split (Resize + CenterCrop) for monitoring and the final top-1 / top-5.
- **Loaders**: :class:`~adarts_kernels.data.ImageNetLoader` (decoding worker processes,
  ``uint8`` batches) wrapped in :class:`DeviceBatches`, which normalises on the device and
  offers the sharding arithmetic of :class:`~adarts_kernels.data.BatchLoader` (the loops'
  per-rank loss factor). The batches of epoch ``e`` are a pure function of ``(seed, e)`` and
  the files, whatever the number of workers, so a resume is exact.
- **Bad images**: a file that cannot be decoded stops the run with one line naming it (the
  checkpoint keeps the last finished epoch) unless ``--skip-bad-images``, which replaces it
  by the next decodable sample and counts it in the epoch record (``bad_images``).
"""
from __future__ import annotations

import contextlib
import math
import os
import time
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import distributed as D
from ..data import DataError, ImageNetDataset, ImageNetLoader, imagenet_normalize
from ..data.imagenet_folder import (Manifest, load_manifest, make_full_manifest, make_search_manifest,
                                    save_manifest, scan_image_folder)
from ..utils.io import progress
from .config import IMAGENET, STEP_GAMMA, WARMUP_MIN_BATCH

MANIFEST = "manifest.json"

#: the loaders made inside :func:`closing_loaders`, whose worker processes it ends
_OPEN: List[List["DeviceBatches"]] = []


@contextlib.contextmanager
def closing_loaders():
    """Ends the worker processes of every :class:`DeviceBatches` made inside it on exit (they
    are persistent, and inherit the run directory's lock: a run in this process must not
    leave them behind)."""
    made: List[DeviceBatches] = []
    _OPEN.append(made)
    try:
        yield
    finally:
        _OPEN.remove(made)
        for loader in made:
            loader.close()


def is_imagenet(cfg) -> bool:
    return cfg.dataset == IMAGENET


def default_workers() -> int:
    """``min(8, cores)``: the cores this process may run on."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, min(8, cores))


def workers(cfg) -> int:
    return default_workers() if cfg.workers is None else int(cfg.workers)


def _limited(samples: List, limit: Optional[int]) -> List:
    """At most ``limit`` samples spread over the (class-sorted) list, for smoke runs."""
    if limit is None or len(samples) <= limit:
        return samples
    return samples[::math.ceil(len(samples) / limit)][:limit]


def _rank0(fn, ctx: D.Context):
    """``fn()`` on rank 0, its result (or its error) on every rank."""
    result, err = None, None
    if ctx.main:
        try:
            result = fn()
        except Exception as e:      # noqa: BLE001 -- passed on to every rank, then re-raised
            err = e
    if not ctx.active:
        if err is not None:
            raise err
        return result
    status = D.broadcast_object(("error", f"{type(err).__name__}: {err}") if err is not None else ("ok", result),
                                ctx)
    if err is not None:
        raise err
    if status[0] == "error":
        raise DataError(f"rank 0 could not read the ImageNet folder: {status[1]}")
    return status[1]


def search_manifest(cfg, resuming: bool, ctx: D.Context) -> Manifest:
    """The search's subsets: drawn and written to ``<out>/manifest.json`` at the first start,
    read back (and checked against the folder and the settings) on resume."""
    path = os.path.join(cfg.out, MANIFEST)

    def make() -> Manifest:
        if resuming:
            if not os.path.exists(path):
                raise DataError(f"cannot resume {cfg.out}: its ImageNet manifest {path} is missing")
            m = load_manifest(path, root=cfg.data)
            now = {"train_fraction": cfg.train_fraction, "arch_fraction": cfg.arch_fraction, "seed": cfg.seed}
            diff = {k: (m.settings.get(k), v) for k, v in now.items() if m.settings.get(k) != v}
            if diff:
                detail = ", ".join(f"{k}: manifest {a!r} vs now {b!r}" for k, (a, b) in diff.items())
                raise ValueError(f"cannot resume: {path} was drawn with other settings ({detail})")
            return m
        m = make_search_manifest(scan_image_folder(cfg.data), cfg.train_fraction, cfg.arch_fraction, cfg.seed)
        save_manifest(m, path)
        return m
    return _rank0(make, ctx)


def _dataset(cfg, manifest: Manifest, split: str, train: bool, seed: int, jitter: bool = False) -> ImageNetDataset:
    return ImageNetDataset(os.path.expanduser(cfg.data), _limited(manifest.splits[split], cfg.limit), train=train,
                           size=cfg.image_size, seed=seed, jitter=jitter, skip_bad_images=cfg.skip_bad_images,
                           num_classes=len(manifest.classes))


def search_sets(cfg, resuming: bool, ctx: D.Context) -> Tuple[ImageNetDataset, ImageNetDataset]:
    """The weight and architecture subsets (training augmentation: RandomResizedCrop + flip)."""
    m = search_manifest(cfg, resuming, ctx)
    return _dataset(cfg, m, "train", True, cfg.seed), _dataset(cfg, m, "arch", True, cfg.seed + 1)


def retrain_sets(cfg, ctx: D.Context) -> Tuple[ImageNetDataset, ImageNetDataset]:
    """The whole train split (crop, flip, colour jitter) and the val split (resize, centre crop)."""
    m = _rank0(lambda: make_full_manifest(scan_image_folder(cfg.data)), ctx)
    return _dataset(cfg, m, "train", True, cfg.seed, jitter=True), _dataset(cfg, m, "val", False, cfg.seed)


class DeviceBatches:
    """An :class:`~adarts_kernels.data.ImageNetLoader` yielding ``(float32 images, labels)``
    on ``device`` (the ``uint8`` batch crosses the bus, then is normalised there), with
    :class:`~adarts_kernels.data.BatchLoader`'s ``global_batch_size`` / ``shard_bounds``.
    A file that cannot be decoded raises one-line :class:`DataError` naming it; :attr:`rate`
    is this rank's images per second in the pass so far."""

    def __init__(self, dataset: ImageNetDataset, batch_size: int, shuffle: bool, seed: int, device: torch.device,
                 num_workers: int, shard: Tuple[int, int] = (0, 1), min_batch: int = 1):
        self.loader = ImageNetLoader(dataset, batch_size, shuffle, seed=seed, shard=shard, num_workers=num_workers,
                                     min_batch=min_batch, pin_memory=device.type == "cuda")
        self.sampler, self.device, self.rate = self.loader.sampler, device, 0.0
        if _OPEN:
            _OPEN[-1].append(self)

    def close(self) -> None:
        """End the persistent worker processes (a later iteration starts new ones)."""
        dl = self.loader.dataloader
        it = getattr(dl, "_iterator", None)
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
        dl._iterator = None

    @property
    def dataset(self) -> ImageNetDataset:
        return self.loader.dataset

    def set_epoch(self, epoch: int) -> None:
        self.loader.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.sampler)

    def global_batch_size(self, i: int) -> int:
        s, count = self.sampler, len(self.sampler)
        return s.batch_size if i < count - 1 else min(s.batch_size, s.n - i * s.batch_size) if s.drop_last \
            else s.n - i * s.batch_size

    def shard_bounds(self, i: int) -> Tuple[int, int]:
        return D.shard_bounds(self.global_batch_size(i), self.sampler.rank, self.sampler.world_size)

    def postfix(self) -> Dict[str, str]:
        return {"img/s": f"{self.rate:.0f}"}

    def __iter__(self):
        it, seen, t0 = iter(self.loader), 0, time.perf_counter()
        while True:
            try:
                x, y = next(it)
            except StopIteration:
                return
            except DataError as e:
                raise DataError(f"{one_line(e)} (the run stopped before this epoch's checkpoint, which keeps "
                                f"the last finished epoch; --skip-bad-images counts and skips such files "
                                f"instead)") from None
            seen += y.shape[0]
            self.rate = seen / max(time.perf_counter() - t0, 1e-9)
            yield imagenet_normalize(x, self.device), y.to(self.device, non_blocking=x.is_pinned())


def one_line(e: BaseException) -> str:
    """The message of ``e`` as one line: a worker process's error comes back wrapped in its
    traceback, whose last line is the original ``DataError: message``."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    if len(lines) <= 1:
        return lines[0] if lines else type(e).__name__
    last = lines[-1]
    return last.split("DataError: ", 1)[1] if "DataError: " in last else last


def search_loaders(cfg, w_set: ImageNetDataset, a_set: ImageNetDataset, ctx: D.Context, device: torch.device,
                   min_batch: int) -> Tuple[DeviceBatches, DeviceBatches, DeviceBatches]:
    """Weights (shuffled, sharded), architecture (shuffled, sharded) and evaluation (the
    architecture subset in order with the evaluation transform, whole batches)."""
    n, shard = workers(cfg), (ctx.rank, ctx.world_size)
    train = DeviceBatches(w_set, cfg.batch_size, True, cfg.seed, device, n, shard, min_batch)
    arch = DeviceBatches(a_set, cfg.batch_size, True, cfg.seed + 1, device, n, shard, min_batch)
    eval_set = ImageNetDataset(a_set.root, list(zip(a_set.paths, a_set.labels)), train=False, size=cfg.image_size,
                               skip_bad_images=cfg.skip_bad_images, num_classes=a_set.num_classes)
    return train, arch, DeviceBatches(eval_set, cfg.batch_size, False, 0, device, n)


def retrain_loaders(cfg, train_set: ImageNetDataset, val_set: ImageNetDataset, ctx: D.Context, device: torch.device,
                    min_batch: int) -> Tuple[DeviceBatches, DeviceBatches]:
    n = workers(cfg)
    train = DeviceBatches(train_set, cfg.batch_size, True, cfg.seed, device, n, (ctx.rank, ctx.world_size), min_batch)
    return train, DeviceBatches(val_set, min(cfg.batch_size, 256), False, 0, device, n)


def lr_factor(cfg, epoch: int) -> float:
    """The lr of ``epoch`` over ``cfg.lr``: ``cosine`` (to ``lr_min``), ``step`` (x0.97 every
    epoch) or ``linear`` (after the warm-up, to 0 at the end), times ``(epoch + 1) / W`` in
    the first ``W = lr_warmup_epochs`` epochs when the batch exceeds 256 (PC-DARTS)."""
    E = cfg.epochs
    W = (cfg.lr_warmup_epochs or 0) if cfg.batch_size > WARMUP_MIN_BATCH else 0
    if cfg.lr_schedule == "cosine":
        lr_min = getattr(cfg, "lr_min", 0.0)
        f = (lr_min + (cfg.lr - lr_min) * (1 + math.cos(math.pi * epoch / E)) / 2) / cfg.lr
    elif cfg.lr_schedule == "step":
        f = STEP_GAMMA ** epoch
    else:   # linear
        f = 1.0 if epoch < W else (E - epoch) / max(E - W, 1)
    return f * (epoch + 1) / W if epoch < W else f


def scheduler(opt: torch.optim.Optimizer, cfg) -> torch.optim.lr_scheduler.LRScheduler:
    """The epoch scheduler of ``cfg.lr_schedule`` (see :func:`lr_factor`); stepped once per epoch."""
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: lr_factor(cfg, epoch))


def count_bad(loaders: Sequence[DeviceBatches], before: int, ctx: D.Context, device: torch.device) -> Tuple[int, int]:
    """``(this epoch's replaced files over every rank, the running total of this rank)``."""
    total = sum(loader.dataset.bad_image_count for loader in loaders)
    mine = total - before
    if ctx.active:
        mine = int(D.sum_values([mine], "metrics", device)[0])
    return mine, total


@torch.no_grad()
def evaluate_topk(model: nn.Module, loader: DeviceBatches, desc: str = "", bar: bool = False,
                  ctx: D.Context = D.SINGLE) -> Tuple[float, float, float]:
    """Mean loss, top-1 and top-5 accuracy (%) of ``model`` over ``loader``; under data
    parallelism every rank takes its shard of each batch and the sums are combined (as
    :func:`~adarts_kernels.nas.loop_common.evaluate`)."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64)
    n = 0
    split = ctx.active and ctx.world_size > 1
    for x, y in progress(loader, total=len(loader), desc=desc, enable=bar):
        if split:
            if y.shape[0] < ctx.world_size and not ctx.main:
                continue
            if y.shape[0] >= ctx.world_size:
                lo, hi = D.shard_bounds(y.shape[0], ctx.rank, ctx.world_size)
                x, y = x[lo:hi], y[lo:hi]
        out = model(x)
        logits = out[0] if isinstance(out, tuple) else out
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hit = top == y[:, None]
        sums += torch.stack([F.cross_entropy(logits, y, reduction="sum").double(), hit[:, 0].sum().double(),
                             hit.any(1).sum().double()]).cpu()
        n += y.shape[0]
    model.train(was_training)
    vals = sums.tolist() + [n]
    if ctx.active:
        vals = D.sum_values(vals, "metrics", next(model.parameters()).device)
    loss, top1, top5, count = vals
    count = max(count, 1)
    return loss / count, 100.0 * top1 / count, 100.0 * top5 / count
