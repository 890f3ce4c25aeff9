"""Data sets, augmentation and loading for adarts_kernels (plain torch, no torchvision).

* ``digits`` -- scikit-learn's bundled 8x8 handwritten digits, resized and split
  1000/397/400 (the default data set; needs no download), see
  :mod:`adarts_kernels.data.digits`.
* ``cifar10`` / ``cifar100`` -- the official python-pickle archives, see
  :mod:`adarts_kernels.data.cifar`.
* ImageNet (ImageFolder of JPEGs, decoded on the fly by worker processes) --
  :mod:`adarts_kernels.data.imagenet`: :class:`ImageNetDataset` and
  :class:`ImageNetLoader` yield ``uint8`` batches that
  :func:`imagenet_normalize` turns into floats on the device.

All data sets are :class:`ImageSet` objects (``uint8`` images ``(N, 3, H, W)``
and ``int64`` labels ``(N,)``) iterated with the deterministic
:class:`BatchLoader`.  Missing or corrupt data raises :class:`DataError`.
"""

from __future__ import annotations

import os
from typing import Dict, Optional, Union

from .cifar import load_cifar, search_split
from .digits import load_digits_splits
from .imagenet import (
    ImageFolder,
    ImageNetDataset,
    ImageNetLoader,
    Manifest,
    ShardedBatchSampler,
    load_manifest,
    make_full_manifest,
    make_search_manifest,
    save_manifest,
    scan_image_folder,
)
from .imagenet import normalize as imagenet_normalize
from .loader import BatchLoader, DataError, ImageSet
from .transforms import cutout, normalize, random_crop_flip

__all__ = [
    "ImageSet",
    "DataError",
    "BatchLoader",
    "load_cifar",
    "search_split",
    "load_digits_splits",
    "random_crop_flip",
    "cutout",
    "normalize",
    "load_dataset",
    "DATASET_NAMES",
    "ImageFolder",
    "ImageNetDataset",
    "ImageNetLoader",
    "Manifest",
    "ShardedBatchSampler",
    "load_manifest",
    "make_full_manifest",
    "make_search_manifest",
    "save_manifest",
    "scan_image_folder",
    "imagenet_normalize",
]

#: Names accepted by :func:`load_dataset`.
DATASET_NAMES = ("digits", "cifar10", "cifar100")


def load_dataset(
    name: str,
    root: Optional[Union[str, "os.PathLike[str]"]] = None,
    download: bool = False,
    size: Optional[int] = None,
) -> Dict[str, Optional[ImageSet]]:
    """Load a data set by name.

    Args:
        name: ``"digits"``, ``"cifar10"`` or ``"cifar100"``.
        root: directory with the CIFAR data (required for CIFAR, ignored for
            digits).
        download: for CIFAR, download the archive if it is not under ``root``.
        size: image side for digits (default 16).  For CIFAR only ``None`` or
            32 is accepted (images are not resized).

    Returns:
        ``{"train": ImageSet, "val": ImageSet or None, "test": ImageSet}``.
        ``val`` is the fixed 397-image validation part for digits and ``None``
        for CIFAR (use :func:`search_split` on ``train`` for the search).

    Raises:
        ValueError: unknown name or unsupported ``size``.
        DataError: CIFAR without ``root``, or missing/corrupt data.
    """
    key = str(name).lower()
    if key not in DATASET_NAMES:
        raise ValueError(
            f"unknown data set {name!r}; valid names: {', '.join(DATASET_NAMES)}"
        )
    if key == "digits":
        return dict(load_digits_splits(16 if size is None else size))
    if size is not None and int(size) != 32:
        raise ValueError(f"{key} images are 32x32 and are not resized; got size={size}")
    if root is None:
        raise DataError(
            f"{key} needs a data directory: pass --data DIR (the directory that holds, or with "
            "--download will receive, the extracted python version of the data set)"
        )
    return {
        "train": load_cifar(key, root, train=True, download=download),
        "val": None,
        "test": load_cifar(key, root, train=False, download=download),
    }
