"""The embedded default data set: scikit-learn's handwritten digits.

``sklearn.datasets.load_digits()`` ships with scikit-learn (no download): 1,797
real 8x8 grey-scale images of the digits 0-9 with pixel values 0..16.  It is
small enough to run an architecture search end to end on a CPU in minutes.

Preprocessing done by :func:`load_digits_splits` (deterministic, no RNG
other than the fixed split permutation):

1. pixel values are scaled from 0..16 to 0..255 (``v * 255 / 16``),
2. each image is resized from 8x8 to ``size x size`` with bilinear
   interpolation (``torch.nn.functional.interpolate(mode="bilinear",
   align_corners=False)``) on the scaled float values,
3. the result is rounded, clamped to 0..255 and stored as ``uint8``,
4. the single grey channel is replicated to 3 channels, so images are
   ``uint8`` ``(N, 3, size, size)`` like CIFAR's.

Fixed split: ``perm = torch.randperm(1797,
generator=torch.Generator().manual_seed(0))``; ``perm[:1000]`` is the
training set, ``perm[1000:1397]`` (397 images) the validation set and
``perm[1397:]`` (400 images) the test set.  Within each part the images are in
``perm`` order.

Normalisation constants: ``mean`` and ``std`` (population standard
deviation) of ``images / 255`` over all pixels of the training part; the
three channels get equal values.  ``name`` is ``"digits"``, ``num_classes``
is 10.
"""

from __future__ import annotations

from typing import Dict

import torch
import torch.nn.functional as F

from .loader import DataError, ImageSet

__all__ = ["load_digits_splits", "DIGITS_SPLIT"]

#: Sizes of the fixed (train, val, test) split of the 1,797 images.
DIGITS_SPLIT = (1000, 397, 400)
_NUM_IMAGES = 1797


def _raw_digits():
    try:
        from sklearn.datasets import load_digits  # lazy: scikit-learn is optional
    except ImportError as e:
        raise DataError(
            "the default 'digits' data set comes from scikit-learn, which is not installed "
            f"({e}); install it with: pip install scikit-learn"
        ) from None
    bunch = load_digits()
    return bunch.images, bunch.target


def load_digits_splits(size: int = 16) -> Dict[str, ImageSet]:
    """Load scikit-learn's digits as ``{"train", "val", "test"}`` ImageSets.

    Args:
        size: side length of the resized square images (>= 1; 8 keeps the
            original resolution).

    Returns:
        ``{"train": ImageSet (1000), "val": ImageSet (397), "test": ImageSet (400)}``,
        each with ``images`` ``uint8`` ``(N, 3, size, size)``, ``labels``
        ``int64`` ``(N,)`` in 0..9, ``num_classes=10`` and the train-part
        mean/std.  See the module docstring for the exact preprocessing and
        split; the result is identical on every call.

    Raises:
        ValueError: ``size`` < 1.
        DataError: scikit-learn is not installed, or its data is unexpected.
    """
    size = int(size)
    if size < 1:
        raise ValueError(f"load_digits_splits: size must be >= 1, got {size}")
    raw_images, raw_targets = _raw_digits()
    images = torch.as_tensor(raw_images, dtype=torch.float32)
    labels = torch.as_tensor(raw_targets).to(torch.int64)
    if images.shape != (_NUM_IMAGES, 8, 8) or labels.shape != (_NUM_IMAGES,):
        raise DataError(
            "scikit-learn's load_digits() returned images of shape "
            f"{tuple(images.shape)} and targets of shape {tuple(labels.shape)}, expected "
            f"({_NUM_IMAGES}, 8, 8) and ({_NUM_IMAGES},); reinstall with: "
            "pip install --force-reinstall scikit-learn"
        )

    x = images[:, None] * (255.0 / 16.0)  # (N, 1, 8, 8) float32 in 0..255
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = x.round().clamp_(0, 255).to(torch.uint8)
    x = x.expand(-1, 3, -1, -1).contiguous()  # (N, 3, size, size)

    perm = torch.randperm(_NUM_IMAGES, generator=torch.Generator().manual_seed(0))
    n_train, n_val, _ = DIGITS_SPLIT
    idx = {
        "train": perm[:n_train],
        "val": perm[n_train:n_train + n_val],
        "test": perm[n_train + n_val:],
    }

    train_pixels = x[idx["train"], 0].to(torch.float64) / 255.0
    mean = float(train_pixels.mean())
    std = float(train_pixels.std(correction=0))
    mean3 = (mean, mean, mean)
    std3 = (std, std, std)

    return {
        part: ImageSet(x[i], labels[i], 10, mean3, std3, "digits") for part, i in idx.items()
    }
