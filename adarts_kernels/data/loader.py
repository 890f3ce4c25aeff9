"""In-memory image data sets and a deterministic mini-batch loader.

This module defines

* :class:`DataError` -- the single exception type raised for missing or
  corrupt data on disk (and for failed downloads),
* :class:`ImageSet` -- a minimal container holding a whole data set as two
  tensors (``uint8`` images and ``int64`` labels) plus its normalisation
  constants,
* :class:`BatchLoader` -- a worker-free iterator over an :class:`ImageSet`
  that shuffles, augments and normalises mini-batches.

Reproducibility contract of :class:`BatchLoader`: the order of the samples
and all random augmentation of epoch ``e`` depend only on ``(seed, e)``.
Every epoch draws from a fresh ``torch.Generator`` seeded with
``seed * 1_000_003 + e``; the global torch RNG is never touched.  An
interrupted training run that calls ``set_epoch(e)`` after resuming therefore
sees exactly the same batches as an uninterrupted one.

Data-parallel training shards every *global* batch (``batch_size`` samples)
over the ranks: with ``shard=(rank, world_size)`` each step still draws the
order and the augmentation parameters of the whole global batch, in the same
order as an unsharded loader, and then builds only this rank's contiguous
slice of it.  Step ``i`` of rank ``r`` is therefore a pure function of
``(seed, e, i, r, world_size)``, and concatenating the batches of ranks
``0 .. world_size - 1`` of a step gives bitwise the batch an unsharded loader
(``shard=(0, 1)``, the default) with the same ``min_batch`` yields at that
step, whatever the world size.

A final batch too small to train on (``min_batch``): BatchNorm in training
mode cannot normalise one sample at 1x1 resolution (DARTS's auxiliary head:
"Expected more than 1 value per channel"), so the training loops build their
loaders with ``min_batch=2 * world_size``: a final global batch with fewer than
``min_batch`` samples is folded into the batch before it, which then has
``batch_size`` plus those samples.  No sample is dropped, and with
``batch_size >= 2 * world_size`` and at least that many samples (both checked
by the loops) every rank's share of every batch has at least 2 samples.
"""

from __future__ import annotations

import numbers
from typing import Iterator, Optional, Sequence, Tuple, Union

import torch

from .transforms import apply_crop_flip as _apply_crop_flip
from .transforms import apply_cutout as _apply_cutout
from .transforms import crop_flip_params as _crop_flip_params
from .transforms import cutout_params as _cutout_params
from .transforms import normalize as _normalize

__all__ = ["DataError", "ImageSet", "BatchLoader"]


def _is_cuda(device: torch.device) -> bool:
    """The one device check in front of the loader's CUDA-only line (tests replace it)."""
    return device.type == "cuda"


class DataError(RuntimeError):
    """A data set is missing, corrupt, or could not be downloaded.

    The message always names the offending path (or URL) and says how to
    obtain the data, so it can be shown to a user as is.
    """


IndexLike = Union[torch.Tensor, Sequence[int], range]


class ImageSet:
    """A whole image data set held in memory.

    Attributes:
        images: ``torch.uint8`` tensor of shape ``(N, C, H, W)`` (``C`` is 3
            for every data set shipped here), pixel values 0..255.
        labels: ``torch.int64`` tensor of shape ``(N,)`` with values in
            ``[0, num_classes)``.
        num_classes: number of classes.
        mean: per-channel mean, a tuple of ``C`` floats in [0, 1] units
            (i.e. of ``images / 255``).
        std: per-channel standard deviation, a tuple of ``C`` floats in
            [0, 1] units.
        name: short name of the data set, e.g. ``"cifar10"``.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        num_classes: int,
        mean: Sequence[float],
        std: Sequence[float],
        name: str,
    ) -> None:
        if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(
                "ImageSet.images must be a torch.uint8 tensor of shape (N, C, H, W), got "
                f"{type(images).__name__} {getattr(images, 'dtype', '')} "
                f"{tuple(getattr(images, 'shape', ()))}"
            )
        if not isinstance(labels, torch.Tensor) or labels.dtype != torch.int64 or labels.dim() != 1:
            raise ValueError(
                "ImageSet.labels must be a torch.int64 tensor of shape (N,), got "
                f"{type(labels).__name__} {getattr(labels, 'dtype', '')} "
                f"{tuple(getattr(labels, 'shape', ()))}"
            )
        if labels.shape[0] != images.shape[0]:
            raise ValueError(
                f"ImageSet: {images.shape[0]} images but {labels.shape[0]} labels"
            )
        mean = tuple(float(m) for m in mean)
        std = tuple(float(s) for s in std)
        channels = images.shape[1]
        if len(mean) != channels or len(std) != channels:
            raise ValueError(
                f"ImageSet: mean/std need one value per channel ({channels}), "
                f"got mean={mean}, std={std}"
            )
        if any(s <= 0 for s in std):
            raise ValueError(f"ImageSet: std must be positive, got {std}")
        if int(num_classes) < 1:
            raise ValueError(f"ImageSet: num_classes must be >= 1, got {num_classes}")
        self.images = images
        self.labels = labels
        self.num_classes = int(num_classes)
        self.mean = mean
        self.std = std
        self.name = str(name)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def image_shape(self) -> Tuple[int, int, int]:
        """``(C, H, W)`` of a single image."""
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def subset(self, indices: IndexLike) -> "ImageSet":
        """Return a new :class:`ImageSet` with the samples at ``indices``.

        Args:
            indices: a 1-D integer tensor, a sequence of ints or a ``range``;
                order is kept, repeats are allowed.

        Returns:
            A new ImageSet (images/labels are copies made by indexing) with the
            same ``num_classes``, ``mean``, ``std`` and ``name``.
        """
        if isinstance(indices, range):
            if indices.step == 1 and 0 <= indices.start <= indices.stop <= len(self):
                # Contiguous slice: a cheap view, no copy.
                sl = slice(indices.start, indices.stop)
                return ImageSet(self.images[sl], self.labels[sl], self.num_classes,
                                self.mean, self.std, self.name)
            idx = torch.tensor(list(indices), dtype=torch.int64)
        elif isinstance(indices, torch.Tensor):
            idx = indices.to(dtype=torch.int64, device=self.images.device).reshape(-1)
        else:
            idx = torch.as_tensor(list(indices), dtype=torch.int64).reshape(-1)
        return ImageSet(self.images[idx], self.labels[idx], self.num_classes,
                        self.mean, self.std, self.name)

    def __repr__(self) -> str:
        return (
            f"ImageSet(name={self.name!r}, n={len(self)}, image_shape={self.image_shape}, "
            f"num_classes={self.num_classes})"
        )


class BatchLoader:
    """Iterate over an :class:`ImageSet` in mini-batches, in the main process.

    Each yielded batch is ``(images, labels)`` with

    * ``images``: ``torch.float32`` tensor ``(B, C, H, W)``, normalised as
      ``(x / 255 - mean) / std`` with the data set's per-channel constants,
    * ``labels``: ``torch.int64`` tensor ``(B,)``,

    both on ``device``.  Without a shard ``B`` is ``batch_size`` except
    possibly for the last batch (which is dropped if ``drop_last``, and folded
    into the one before it if smaller than ``min_batch``).  With
    ``shard=(rank, world_size)``, step ``i`` yields only this rank's slice of
    global batch ``i``: ``B = stop - start`` with
    ``(start, stop) = shard_bounds(i)``, between
    ``global_batch_size(i) // world_size`` and one more; ``B`` is 0 (tensors
    ``(0, C, H, W)`` and ``(0,)``) when the global batch has fewer samples
    than ranks.

    Args:
        dataset: the data set to iterate over (must not be empty).
        batch_size: samples per batch, >= 1.
        shuffle: visit the samples in a random order (new order each epoch).
        augment: apply :func:`~adarts_kernels.data.transforms.random_crop_flip`
            (zero padding by ``pad``, random crop, horizontal flip with p=0.5).
        cutout: if > 0, apply :func:`~adarts_kernels.data.transforms.cutout`
            with this side length after normalisation (independently of
            ``augment``; pass 0 for evaluation loaders).
        pad: padding of the random crop; 4 for 32x32 CIFAR, 2 for 16x16 digits.
        drop_last: drop the final incomplete batch.
        min_batch: the rule for a final batch too small to train on: a final
            global batch with fewer than ``min_batch`` samples is folded into
            the previous batch (which then holds ``batch_size`` plus the
            leftover samples; nothing is dropped).  Folding needs a previous
            batch: a data set smaller than ``min_batch`` is still one batch
            (the training loops refuse such a set).  The default 1 never
            folds; the training loops pass ``2 * world_size``, so that no
            rank trains BatchNorm on a single sample.  ``1 <= min_batch <=
            batch_size``; ignored with ``drop_last``.
        seed: base seed.  Epoch ``e`` uses
            ``torch.Generator().manual_seed(seed * 1_000_003 + e)`` for both
            the order and the augmentation, so batches are a pure function of
            ``(seed, e)``.
        device: where the batches are put.  Augmentation runs on that device
            (random numbers are still drawn on the CPU generator, so the result
            does not depend on the device).
        shard: ``(rank, world_size)`` for data-parallel training, ints with
            ``0 <= rank < world_size``.  ``batch_size`` stays the global batch;
            global batch ``i`` is split like
            ``torch.tensor_split(torch.arange(global_batch_size(i)), world_size)``
            (contiguous slices in rank order, the first ranks get one extra
            sample) and this loader yields slice ``rank``.  ``len()`` counts
            global batches, the same on every rank.  ``(0, 1)`` (default) is
            the unsharded loader.

    Call :meth:`set_epoch` before iterating each epoch; iterating twice
    without changing the epoch yields identical batches.
    """

    def __init__(
        self,
        dataset: ImageSet,
        batch_size: int,
        shuffle: bool,
        augment: bool,
        cutout: int = 0,
        pad: int = 4,
        drop_last: bool = False,
        seed: int = 0,
        device: Union[str, torch.device] = "cpu",
        shard: Tuple[int, int] = (0, 1),
        min_batch: int = 1,
    ) -> None:
        if not isinstance(dataset, ImageSet):
            raise ValueError(f"BatchLoader needs an ImageSet, got {type(dataset).__name__}")
        if len(dataset) == 0:
            raise ValueError(f"BatchLoader: data set {dataset.name!r} is empty")
        if int(batch_size) < 1:
            raise ValueError(f"BatchLoader: batch_size must be >= 1, got {batch_size}")
        if int(pad) < 0:
            raise ValueError(f"BatchLoader: pad must be >= 0, got {pad}")
        if int(cutout) < 0:
            raise ValueError(f"BatchLoader: cutout must be >= 0, got {cutout}")
        if drop_last and len(dataset) < int(batch_size):
            raise ValueError(
                f"BatchLoader: drop_last=True with batch_size={batch_size} larger than the "
                f"data set ({len(dataset)} samples) would yield no batch"
            )
        if not 1 <= int(min_batch) <= int(batch_size):
            raise ValueError(f"BatchLoader: min_batch must be between 1 and batch_size={batch_size}, "
                             f"got {min_batch}")
        self.rank, self.world_size = self._check_shard(shard)
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.augment = bool(augment)
        self.cutout = int(cutout)
        self.pad = int(pad)
        self.drop_last = bool(drop_last)
        self.min_batch = int(min_batch)
        self.seed = int(seed)
        self.device = torch.device(device)
        self.epoch = 0

    @staticmethod
    def _check_shard(shard) -> Tuple[int, int]:
        try:
            rank, world_size = shard
        except (TypeError, ValueError):
            raise ValueError(
                f"BatchLoader: shard must be a pair (rank, world_size), got {shard!r}"
            ) from None
        for name, v in (("rank", rank), ("world_size", world_size)):
            if isinstance(v, bool) or not isinstance(v, numbers.Integral):
                raise ValueError(
                    f"BatchLoader: shard {name} must be an int, got {type(v).__name__} {v!r}"
                )
        rank, world_size = int(rank), int(world_size)
        if world_size < 1:
            raise ValueError(f"BatchLoader: shard world_size must be >= 1, got {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(
                f"BatchLoader: shard rank must satisfy 0 <= rank < world_size={world_size}, "
                f"got {rank}"
            )
        return rank, world_size

    @property
    def shard(self) -> Tuple[int, int]:
        """``(rank, world_size)`` of this loader; ``(0, 1)`` when not sharded."""
        return self.rank, self.world_size

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order and augmentation the next iteration uses."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        """Number of global batches per epoch (the same on every rank)."""
        n = len(self.dataset)
        full, rest = divmod(n, self.batch_size)
        if self.drop_last:
            return full
        if rest and (rest >= self.min_batch or full == 0):
            return full + 1
        return full             # no remainder, or one folded into the last full batch

    def global_batch_size(self, i: int) -> int:
        """Number of samples of global batch ``i`` (0-based, ``0 <= i < len(self)``): the
        last one holds what is left, ``batch_size`` plus a folded remainder included."""
        i = int(i)
        count = len(self)
        if not 0 <= i < count:
            raise IndexError(f"BatchLoader: batch index {i} out of range for {count} batches")
        if i < count - 1:
            return self.batch_size
        # every batch starts at i * batch_size: the last one takes all the samples after its start
        last = len(self.dataset) - i * self.batch_size
        return min(self.batch_size, last) if self.drop_last else last

    def shard_bounds(self, i: int) -> Tuple[int, int]:
        """This rank's slice ``[start, stop)`` of global batch ``i`` (positions within the batch).

        The same split as ``torch.tensor_split(torch.arange(global_batch_size(i)),
        world_size)[rank]``; ``start == stop`` when the slice is empty.
        """
        q, r = divmod(self.global_batch_size(i), self.world_size)
        start = self.rank * q + min(self.rank, r)
        return start, start + q + (1 if self.rank < r else 0)

    def _generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        ds = self.dataset
        n = len(ds)
        gen = self._generator()
        if self.shuffle:
            order: Optional[torch.Tensor] = torch.randperm(n, generator=gen)
        else:
            order = None
        _, h, w = ds.image_shape
        non_blocking = _is_cuda(self.device)   # asynchronous host-to-device copies on CUDA
        for b in range(len(self)):
            # Draw everything of the whole global batch, in the unsharded order
            # (crop/flip, then cutout), then build only this rank's slice.
            gb = self.global_batch_size(b)
            crop = _crop_flip_params(gb, self.pad, gen) if self.augment else None
            centres = _cutout_params(gb, h, w, gen) if self.cutout > 0 else None
            lo, hi = self.shard_bounds(b)
            start = b * self.batch_size + lo
            stop = b * self.batch_size + hi
            if order is None:
                images = ds.images[start:stop]
                labels = ds.labels[start:stop]
            else:
                idx = order[start:stop].to(ds.images.device)
                images = ds.images[idx]
                labels = ds.labels[idx]
            images = images.to(self.device, non_blocking=non_blocking)
            labels = labels.to(self.device, non_blocking=non_blocking)
            if crop is not None:
                dy, dx, flip = crop
                images = _apply_crop_flip(images, dy[lo:hi], dx[lo:hi], flip[lo:hi], self.pad)
            x = _normalize(images, ds.mean, ds.std)
            if centres is not None:
                cy, cx = centres
                x = _apply_cutout(x, self.cutout, cy[lo:hi], cx[lo:hi])
            yield x, labels

    def __repr__(self) -> str:
        return (
            f"BatchLoader({self.dataset!r}, batch_size={self.batch_size}, shuffle={self.shuffle}, "
            f"augment={self.augment}, cutout={self.cutout}, pad={self.pad}, "
            f"drop_last={self.drop_last}, seed={self.seed}, device={str(self.device)!r}"
            + (f", min_batch={self.min_batch}" if self.min_batch > 1 else "")
            + (f", shard=({self.rank}, {self.world_size})" if self.world_size > 1 else "")
            + ")"
        )
