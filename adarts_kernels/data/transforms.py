"""Batched image augmentation and normalisation in plain torch.

All random functions take an explicit ``torch.Generator`` (a CPU generator)
and never use the global RNG, so a given generator state always produces the
same augmentation.  Random numbers are drawn on the CPU and the resulting
indices/masks are moved to the device of the input, so results do not depend
on where the images live.

Functions:

* :func:`random_crop_flip` -- zero-pad, random crop back to the original size
  and random horizontal flip (the standard CIFAR training augmentation),
* :func:`cutout` -- zero a random square per image (DeVries & Taylor 2017, as
  used by DARTS),
* :func:`normalize` -- ``uint8`` -> ``float32`` per-channel normalisation.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = ["random_crop_flip", "cutout", "normalize"]


def _check_batch(x: torch.Tensor, fn: str) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(
            f"{fn}: expected a 4-D tensor (B, C, H, W), got "
            f"{type(x).__name__} of shape {tuple(getattr(x, 'shape', ()))}"
        )


def random_crop_flip(x: torch.Tensor, pad: int, generator: torch.Generator) -> torch.Tensor:
    """Random crop with zero padding plus random horizontal flip, per sample.

    Each image is zero-padded by ``pad`` pixels on every side, then an
    ``H x W`` window is cut out at an offset ``(dy, dx)`` drawn uniformly from
    ``{0, ..., 2*pad}`` (independently per sample), and the window is mirrored
    left-right with probability 0.5 (independently per sample).

    Formally, with ``P`` the padded image,
    ``out[b, c, i, j] = P[b, c, dy_b + i, dx_b + j']`` where ``j' = j`` if not
    flipped and ``j' = W - 1 - j`` if flipped.

    Random draws, in this order: ``dy`` (B ints), ``dx`` (B ints), flip
    (B floats, flipped where < 0.5).

    Args:
        x: ``(B, C, H, W)`` tensor, any dtype (``uint8`` or floating).
        pad: padding in pixels, >= 0.  With ``pad=0`` only flipping happens.
        generator: CPU ``torch.Generator`` providing all randomness.

    Returns:
        A new tensor with the same shape, dtype and device as ``x``.
    """
    _check_batch(x, "random_crop_flip")
    pad = int(pad)
    if pad < 0:
        raise ValueError(f"random_crop_flip: pad must be >= 0, got {pad}")
    b, c, h, w = x.shape
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    flip = torch.rand(b, generator=generator) < 0.5
    if b == 0:
        return x.clone()

    rows = dy[:, None] + torch.arange(h)[None, :]  # (B, H) rows of the padded image
    cols = dx[:, None] + torch.arange(w)[None, :]  # (B, W) cols of the padded image
    cols = torch.where(flip[:, None], cols.flip(1), cols)

    dev = x.device
    padded = F.pad(x, (pad, pad, pad, pad)) if pad > 0 else x
    bi = torch.arange(b, device=dev)[:, None, None, None]
    ci = torch.arange(c, device=dev)[None, :, None, None]
    ri = rows.to(dev)[:, None, :, None]
    cj = cols.to(dev)[:, None, None, :]
    return padded[bi, ci, ri, cj]


def cutout(x: torch.Tensor, length: int, generator: torch.Generator) -> torch.Tensor:
    """Zero a ``length x length`` square per image, clipped at the borders.

    For each sample a centre pixel ``(cy, cx)`` is drawn uniformly from the
    ``H x W`` grid; rows ``[cy - length//2, cy - length//2 + length)`` and
    columns ``[cx - length//2, cx - length//2 + length)``, intersected with
    the image, are set to zero in all channels.  (For even ``length`` this is
    exactly the DARTS / DeVries & Taylor cutout.)

    Random draws, in this order: ``cy`` (B ints), ``cx`` (B ints).

    Args:
        x: ``(B, C, H, W)`` tensor, normally ``float32`` after
            :func:`normalize` (any dtype works).
        length: side of the square; ``length <= 0`` returns a copy of ``x``
            without drawing random numbers.
        generator: CPU ``torch.Generator`` providing all randomness.

    Returns:
        A new tensor with the same shape, dtype and device as ``x``.
    """
    _check_batch(x, "cutout")
    length = int(length)
    if length <= 0:
        return x.clone()
    b, _, h, w = x.shape
    cy = torch.randint(0, h, (b,), generator=generator)
    cx = torch.randint(0, w, (b,), generator=generator)
    y0 = cy - length // 2
    x0 = cx - length // 2
    r = torch.arange(h)[None, :]
    s = torch.arange(w)[None, :]
    in_rows = (r >= y0[:, None]) & (r < (y0 + length)[:, None])  # (B, H)
    in_cols = (s >= x0[:, None]) & (s < (x0 + length)[:, None])  # (B, W)
    mask = (in_rows[:, :, None] & in_cols[:, None, :])[:, None]  # (B, 1, H, W)
    return x.masked_fill(mask.to(x.device), 0)


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Convert ``uint8`` pixels to normalised ``float32``.

    Computes ``(x / 255 - mean[c]) / std[c]`` for every channel ``c``.

    Args:
        x: ``(B, C, H, W)`` or ``(C, H, W)`` tensor of pixel values 0..255
            (normally ``uint8``; other dtypes are interpreted the same way).
        mean: ``C`` per-channel means in [0, 1] units.
        std: ``C`` per-channel standard deviations in [0, 1] units.

    Returns:
        ``torch.float32`` tensor with the shape and device of ``x``.
    """
    if not isinstance(x, torch.Tensor) or x.dim() not in (3, 4):
        raise ValueError(
            "normalize: expected a (B, C, H, W) or (C, H, W) tensor, got "
            f"{type(x).__name__} of shape {tuple(getattr(x, 'shape', ()))}"
        )
    c = x.shape[-3]
    if len(mean) != c or len(std) != c:
        raise ValueError(
            f"normalize: need {c} mean/std values, got {len(mean)} and {len(std)}"
        )
    m = torch.tensor([float(v) for v in mean], dtype=torch.float32, device=x.device).view(c, 1, 1)
    s = torch.tensor([float(v) for v in std], dtype=torch.float32, device=x.device).view(c, 1, 1)
    return (x.to(torch.float32) / 255.0 - m) / s
