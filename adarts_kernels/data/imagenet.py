"""ImageNet in the standard ImageFolder layout: scan, subset manifests, data set and loader.

Layout under a root directory ``ROOT``::

    ROOT/train/<class>/<file>.JPEG      (also .jpg, .jpeg, .png, any case)
    ROOT/val/<class>/<file>.JPEG

Classes are the sorted folder names of ``train`` and a label is the index of
its class; ``val`` must have the same class folders.  Only files directly in
a class folder count (no recursion), hidden files and other extensions are
ignored.

Scanning and manifests live in :mod:`adarts_kernels.data.imagenet_folder`
(re-exported here):

* :func:`scan_image_folder` -- the file lists (:class:`ImageFolder`);
* :func:`make_search_manifest` -- PC-DARTS's search subsets, a seeded,
  per-class, disjoint draw of ``train_fraction`` of every class for the
  weights and ``arch_fraction`` for the architecture (10% and 2.5% by
  default); :func:`make_full_manifest` -- the whole train and val sets;
* :func:`save_manifest` / :func:`load_manifest` -- the :class:`Manifest` as
  JSON in the run folder, so a resumed run reads exactly the same images;
* :class:`ImageNetDataset` -- decoding + ``uint8`` augmentation
  (:mod:`adarts_kernels.data.jpeg`), one ``(3, S, S)`` tensor per sample;
* :class:`ImageNetLoader` -- a ``torch.utils.data.DataLoader`` with worker
  processes and :class:`ShardedBatchSampler`, yielding ``uint8`` batches;
* :func:`normalize` -- ``uint8`` -> normalised ``float32`` on the device.

Reproducibility: the order of epoch ``e`` comes from
``torch.Generator().manual_seed(seed * 1_000_003 + e)`` (as in
:class:`~adarts_kernels.data.BatchLoader`) and the augmentation of sample
``i`` from ``numpy.random.default_rng([seed, e, i])``; the sampler passes
``(e, i)`` to the data set, so persistent workers need no epoch update and
any number of workers yields bitwise the same batches.
"""

from __future__ import annotations

import multiprocessing
import os
import warnings
from pathlib import Path
from typing import Any, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.utils.data

from .imagenet_folder import (
    IMAGE_EXTENSIONS,
    ImageFolder,
    Manifest,
    Sample,
    class_list_hash,
    load_manifest,
    make_full_manifest,
    make_search_manifest,
    save_manifest,
    scan_image_folder,
)
from .jpeg import load_train_image, load_val_image, sample_rng
from .loader import DataError

__all__ = [
    "IMAGE_EXTENSIONS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageFolder",
    "Manifest",
    "scan_image_folder",
    "class_list_hash",
    "make_search_manifest",
    "make_full_manifest",
    "save_manifest",
    "load_manifest",
    "ImageNetDataset",
    "ShardedBatchSampler",
    "ImageNetLoader",
    "normalize",
]

PathLike = Union[str, "os.PathLike[str]"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# --------------------------------------------------------------------------- data set


class ImageNetDataset(torch.utils.data.Dataset):
    """Decoded, augmented ImageNet samples.

    ``dataset[i]`` (epoch :attr:`epoch`) or ``dataset[(e, i)]`` is
    ``(image, label)``: ``torch.uint8`` ``(3, size, size)`` and an ``int``.
    Training (``train=True``): RandomResizedCrop + flip (+ ColorJitter with
    ``jitter``) drawn from ``numpy.random.default_rng([seed, e, i])``;
    evaluation: Resize(``round(size * 256 / 224)``) + CenterCrop(``size``).

    Args:
        root: the ImageFolder root the sample paths are relative to.
        samples: ``(relative path, label)`` list, e.g. ``manifest.splits["train"]``.
        train: training augmentation (True) or the evaluation transform.
        size: output side (224 for ImageNet).
        seed: augmentation seed (>= 0).
        jitter: colour jitter (retraining).
        skip_bad_images: a file that cannot be decoded is replaced by the
            next index (cyclically) that decodes, with the augmentation draws
            of the requested ``(e, i)``; each replacement is counted in
            :attr:`bad_image_count` (shared with worker processes) and the
            first one per file and process warns naming it.  When False
            (default) such a file raises :class:`DataError` naming it.
        use_draft: JPEG draft mode.
        num_classes: number of classes (default: ``max(label) + 1``).
    """

    def __init__(self, root: PathLike, samples: Sequence[Sample], train: bool, size: int = 224,
                 seed: int = 0, jitter: bool = False, skip_bad_images: bool = False,
                 use_draft: bool = True, num_classes: Optional[int] = None) -> None:
        if len(samples) == 0:
            raise ValueError("ImageNetDataset: no samples")
        if int(size) < 1 or int(seed) < 0:
            raise ValueError(f"ImageNetDataset: need size >= 1 and seed >= 0, got {size} and {seed}")
        self.root = Path(os.fspath(root)).expanduser()
        self.paths = [p for p, _ in samples]
        self.labels = [int(l) for _, l in samples]
        self.train = bool(train)
        self.size = int(size)
        self.seed = int(seed)
        self.jitter = bool(jitter)
        self.skip_bad_images = bool(skip_bad_images)
        self.use_draft = bool(use_draft)
        self.num_classes = int(num_classes) if num_classes is not None else max(self.labels) + 1
        self.epoch = 0
        # a lock-protected shared int: worker processes inherit it, so the
        # parent reads the total of all workers
        self._bad = multiprocessing.get_context().Value("q", 0)
        self._known_bad: set = set()

    @classmethod
    def from_manifest(cls, manifest: Manifest, split: str, root: PathLike, **kwargs: Any) -> "ImageNetDataset":
        """The data set of ``manifest.splits[split]`` under ``root``; ``train``
        defaults to ``split != "val"``."""
        if split not in manifest.splits:
            raise ValueError(f"manifest has no split {split!r}; it has {', '.join(manifest.splits)}")
        kwargs.setdefault("train", split != "val")
        return cls(root, manifest.splits[split], num_classes=len(manifest.classes), **kwargs)

    @property
    def bad_image_count(self) -> int:
        """How many times a bad file was replaced so far (all processes)."""
        return int(self._bad.value)

    def set_epoch(self, epoch: int) -> None:
        """Epoch used by plain integer indexing."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.paths)

    def _load(self, epoch: int, index: int) -> torch.Tensor:
        path = self.root / self.paths[index]
        if self.train:
            return load_train_image(path, self.size, sample_rng(self.seed, epoch, index),
                                    self.jitter, self.use_draft)[0]
        return load_val_image(path, self.size, self.use_draft)[0]

    def __getitem__(self, key: Union[int, Tuple[int, int]]) -> Tuple[torch.Tensor, int]:
        if isinstance(key, tuple):
            epoch, index = int(key[0]), int(key[1])
        else:
            epoch, index = self.epoch, int(key)
        n = len(self.paths)
        if not -n <= index < n:
            raise IndexError(f"ImageNetDataset: index {index} out of range for {n} samples")
        index %= n
        if not self.skip_bad_images:
            return self._load(epoch, index), self.labels[index]
        for j in range(n):
            src = (index + j) % n
            if src in self._known_bad:
                continue
            try:
                # the draws of the requested (epoch, index), whichever file is used
                path = self.root / self.paths[src]
                if self.train:
                    img = load_train_image(path, self.size, sample_rng(self.seed, epoch, index),
                                           self.jitter, self.use_draft)[0]
                else:
                    img = load_val_image(path, self.size, self.use_draft)[0]
            except DataError as e:
                self._known_bad.add(src)
                warnings.warn(f"skipping bad image: {e}", RuntimeWarning, stacklevel=2)
                continue
            if j:
                with self._bad.get_lock():
                    self._bad.value += 1
            return img, self.labels[src]
        raise DataError(f"no image under {self.root} could be decoded ({n} files tried)")


# --------------------------------------------------------------------------- sampler and loader


class ShardedBatchSampler(torch.utils.data.Sampler):
    """Batches of ``(epoch, index)`` keys for :class:`ImageNetDataset`, sharded like
    :class:`~adarts_kernels.data.BatchLoader`.

    Epoch ``e`` visits ``torch.randperm(n, generator=torch.Generator().manual_seed(
    seed * 1_000_003 + e))`` (or ``0..n-1`` without ``shuffle``) in global
    batches of ``batch_size``; a final global batch smaller than ``min_batch``
    is folded into the one before (``drop_last`` drops it instead).  With
    ``shard=(rank, world_size)`` this rank gets the contiguous slice
    ``torch.tensor_split(arange(global batch), world_size)[rank]``, so the
    ranks' batches of a step concatenate to the unsharded batch and the ranks
    of an epoch partition it.  ``min_batch`` defaults to ``2 * world_size``
    (capped at ``batch_size``) and must be >= ``world_size``, so no rank gets an
    empty batch.
    """

    def __init__(self, n: int, batch_size: int, shuffle: bool, seed: int = 0,
                 shard: Tuple[int, int] = (0, 1), min_batch: Optional[int] = None,
                 drop_last: bool = False) -> None:
        rank, world = (int(v) for v in shard)
        if not 0 <= rank < world:
            raise ValueError(f"ShardedBatchSampler: need 0 <= rank < world_size, got shard={shard}")
        if not 1 <= world <= int(batch_size):
            raise ValueError(f"ShardedBatchSampler: need 1 <= world_size <= batch_size={batch_size}")
        if int(n) < world:
            raise ValueError(f"ShardedBatchSampler: {n} samples cannot feed {world} ranks")
        mb = min(2 * world, int(batch_size)) if min_batch is None else int(min_batch)
        if not world <= mb <= int(batch_size):
            raise ValueError(f"ShardedBatchSampler: need world_size <= min_batch <= batch_size, got {mb}")
        if drop_last and int(n) < int(batch_size):
            raise ValueError(f"ShardedBatchSampler: drop_last with {n} < batch_size={batch_size} samples")
        self.n, self.batch_size, self.shuffle, self.seed = int(n), int(batch_size), bool(shuffle), int(seed)
        self.rank, self.world_size, self.min_batch, self.drop_last = rank, world, mb, bool(drop_last)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        full, rest = divmod(self.n, self.batch_size)
        if self.drop_last:
            return full
        return full + 1 if rest and (rest >= self.min_batch or full == 0) else full

    def __iter__(self) -> Iterator[List[Tuple[int, int]]]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        count = len(self)
        for b in range(count):
            start = b * self.batch_size
            gb = self.batch_size if b < count - 1 else (
                min(self.batch_size, self.n - start) if self.drop_last else self.n - start)
            q, r = divmod(gb, self.world_size)
            lo = self.rank * q + min(self.rank, r)
            hi = lo + q + (1 if self.rank < r else 0)
            yield [(self.epoch, i) for i in order[start + lo:start + hi]]


class ImageNetLoader:
    """Worker-process loading of an :class:`ImageNetDataset`.

    Iterating yields ``(images, labels)``: ``torch.uint8`` ``(B, 3, S, S)``
    and ``torch.int64`` ``(B,)`` on the host (pinned when ``pin_memory``);
    pass ``images`` to :func:`normalize` on the device.  Batching and sharding
    are :class:`ShardedBatchSampler`'s; call :meth:`set_epoch` before each
    epoch.  Batches are a pure function of ``(seed, epoch, rank,
    world_size)`` and the files, whatever ``num_workers``.

    Args:
        dataset: the samples.
        batch_size: global batch (all ranks together).
        shuffle: new order each epoch.
        seed: order seed (the augmentation seed is the data set's).
        shard, min_batch, drop_last: see :class:`ShardedBatchSampler`.
        num_workers: decoding processes (0: in this process).  Workers are
            persistent (started once, reused every epoch).
        prefetch_factor: batches each worker prepares ahead.
        pin_memory: page-locked batches for asynchronous copies; default
            ``torch.cuda.is_available()``.
        multiprocessing_context: e.g. ``"fork"``/``"spawn"``; default torch's.
    """

    def __init__(self, dataset: ImageNetDataset, batch_size: int, shuffle: bool, seed: int = 0,
                 shard: Tuple[int, int] = (0, 1), num_workers: int = 4, min_batch: Optional[int] = None,
                 drop_last: bool = False, prefetch_factor: int = 4, pin_memory: Optional[bool] = None,
                 multiprocessing_context: Optional[str] = None) -> None:
        self.dataset = dataset
        self.sampler = ShardedBatchSampler(len(dataset), batch_size, shuffle, seed, shard, min_batch, drop_last)
        workers = int(num_workers)
        self.dataloader = torch.utils.data.DataLoader(
            dataset,
            batch_sampler=self.sampler,
            num_workers=workers,
            persistent_workers=workers > 0,
            prefetch_factor=int(prefetch_factor) if workers > 0 else None,
            pin_memory=torch.cuda.is_available() if pin_memory is None else bool(pin_memory),
            multiprocessing_context=multiprocessing_context if workers > 0 else None,
        )

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)
        self.dataset.set_epoch(epoch)

    @property
    def bad_image_count(self) -> int:
        return self.dataset.bad_image_count

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        for images, labels in self.dataloader:
            yield images, labels


def normalize(batch: torch.Tensor, device: Union[str, torch.device] = "cpu",
              mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> torch.Tensor:
    """Move a ``uint8`` ``(B, 3, H, W)`` batch to ``device`` and normalise it there.

    Only the bytes cross the bus (4x less than float32); the result is
    ``float32`` ``(B, 3, H, W)`` on ``device``: ``(x / 255 - mean[c]) / std[c]``.
    """
    if batch.dtype != torch.uint8 or batch.dim() != 4 or batch.shape[1] != len(mean):
        raise ValueError(f"normalize: expected uint8 (B, {len(mean)}, H, W), got {batch.dtype} "
                         f"{tuple(batch.shape)}")
    dev = torch.device(device)
    x = batch.to(dev, non_blocking=batch.is_pinned()).float()
    m = torch.tensor([255.0 * v for v in mean], device=dev).view(1, -1, 1, 1)
    s = torch.tensor([1.0 / (255.0 * v) for v in std], device=dev).view(1, -1, 1, 1)
    return (x - m) * s
