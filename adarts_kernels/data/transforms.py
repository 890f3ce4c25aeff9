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

Each random function is its parameter draw plus a deterministic application
(:func:`crop_flip_params` + :func:`apply_crop_flip`, :func:`cutout_params` +
:func:`apply_cutout`), so the parameters of a whole batch can be drawn once and
applied to any slice of it (the sharded :class:`~adarts_kernels.data.BatchLoader`).
"""

from __future__ import annotations

from typing import Sequence, Tuple

import torch
import torch.nn.functional as F

__all__ = [
    "random_crop_flip",
    "crop_flip_params",
    "apply_crop_flip",
    "cutout",
    "cutout_params",
    "apply_cutout",
    "normalize",
]


def _check_batch(x: torch.Tensor, fn: str) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(
            f"{fn}: expected a 4-D tensor (B, C, H, W), got "
            f"{type(x).__name__} of shape {tuple(getattr(x, 'shape', ()))}"
        )


def _check_params(fn: str, b: int, **params: torch.Tensor) -> None:
    for name, t in params.items():
        if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.shape[0] != b:
            raise ValueError(
                f"{fn}: {name} must be a 1-D tensor with one entry per sample ({b}), got "
                f"{type(t).__name__} of shape {tuple(getattr(t, 'shape', ()))}"
            )


def _check_pad(pad, name: str) -> int:
    """``pad`` as an int, >= 0; ``ValueError`` naming the function ``name`` otherwise."""
    pad = int(pad)
    if pad < 0:
        raise ValueError(f"{name}: pad must be >= 0, got {pad}")
    return pad


def crop_flip_params(
    b: int, pad: int, generator: torch.Generator
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw the random parameters of :func:`random_crop_flip` for ``b`` samples.

    Random draws, in this order: ``dy`` (``b`` ints in ``{0, ..., 2*pad}``),
    ``dx`` (``b`` ints in ``{0, ..., 2*pad}``), flip (``b`` floats, flipped
    where < 0.5).  Drawing for a whole batch and applying
    :func:`apply_crop_flip` to any slice of the parameters gives exactly the
    corresponding rows of :func:`random_crop_flip` on the whole batch.

    Args:
        b: number of samples, >= 0.
        pad: padding in pixels, >= 0.
        generator: CPU ``torch.Generator`` providing all randomness.

    Returns:
        ``(dy, dx, flip)``: CPU tensors of shape ``(b,)``, ``int64``,
        ``int64`` and ``bool``.
    """
    b = int(b)
    if b < 0:
        raise ValueError(f"crop_flip_params: b must be >= 0, got {b}")
    pad = _check_pad(pad, "crop_flip_params")
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    flip = torch.rand(b, generator=generator) < 0.5
    return dy, dx, flip


def apply_crop_flip(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor,
                    pad: int) -> torch.Tensor:
    """Apply given crop offsets and flips (see :func:`random_crop_flip`); no randomness.

    ``out[b, c, i, j] = P[b, c, dy[b] + i, dx[b] + j']`` with ``P`` the image
    zero-padded by ``pad`` on every side, ``j' = j`` if not ``flip[b]`` and
    ``j' = W - 1 - j`` if ``flip[b]``.

    Args:
        x: ``(B, C, H, W)`` tensor, any dtype, any device.
        dy, dx: ``(B,)`` integer tensors with values in ``{0, ..., 2*pad}``
            (as drawn by :func:`crop_flip_params`, normally on the CPU).
        flip: ``(B,)`` ``bool`` tensor.
        pad: padding in pixels, >= 0.

    Returns:
        A new tensor with the same shape, dtype and device as ``x``.
    """
    _check_batch(x, "apply_crop_flip")
    pad = _check_pad(pad, "apply_crop_flip")
    b, c, h, w = x.shape
    _check_params("apply_crop_flip", b, dy=dy, dx=dx, flip=flip)
    if flip.dtype != torch.bool:
        raise ValueError(f"apply_crop_flip: flip must be a bool tensor, got {flip.dtype}")
    for name, t in (("dy", dy), ("dx", dx)):
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise ValueError(f"apply_crop_flip: {name} must be an integer tensor, got {t.dtype}")
    if b == 0:
        return x.clone()
    for name, t in (("dy", dy), ("dx", dx)):
        lo, hi = int(t.min()), int(t.max())
        if lo < 0 or hi > 2 * pad:
            raise ValueError(
                f"apply_crop_flip: {name} must lie in [0, {2 * pad}] for pad={pad}, "
                f"got values in [{lo}, {hi}]"
            )

    pdev = dy.device
    rows = dy[:, None] + torch.arange(h, device=pdev)[None, :]  # (B, H) rows of the padded image
    cols = dx.to(pdev)[:, None] + torch.arange(w, device=pdev)[None, :]  # (B, W) cols
    cols = torch.where(flip.to(pdev)[:, None], cols.flip(1), cols)

    dev = x.device
    padded = F.pad(x, (pad, pad, pad, pad)) if pad > 0 else x
    bi = torch.arange(b, device=dev)[:, None, None, None]
    ci = torch.arange(c, device=dev)[None, :, None, None]
    ri = rows.to(dev)[:, None, :, None]
    cj = cols.to(dev)[:, None, None, :]
    return padded[bi, ci, ri, cj]


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
    (B floats, flipped where < 0.5).  This is exactly
    ``apply_crop_flip(x, *crop_flip_params(B, pad, generator), pad)``.

    Args:
        x: ``(B, C, H, W)`` tensor, any dtype (``uint8`` or floating).
        pad: padding in pixels, >= 0.  With ``pad=0`` only flipping happens.
        generator: CPU ``torch.Generator`` providing all randomness.

    Returns:
        A new tensor with the same shape, dtype and device as ``x``.
    """
    _check_batch(x, "random_crop_flip")
    pad = _check_pad(pad, "random_crop_flip")
    dy, dx, flip = crop_flip_params(x.shape[0], pad, generator)
    return apply_crop_flip(x, dy, dx, flip, pad)


def cutout_params(
    b: int, h: int, w: int, generator: torch.Generator
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Draw the square centres of :func:`cutout` for ``b`` images of ``h x w``.

    Random draws, in this order: ``cy`` (``b`` ints in ``[0, h)``), ``cx``
    (``b`` ints in ``[0, w)``).  :func:`cutout` with ``length <= 0`` draws
    nothing, so callers skip this call then.

    Args:
        b: number of samples, >= 0.
        h, w: image height and width, >= 1.
        generator: CPU ``torch.Generator`` providing all randomness.

    Returns:
        ``(cy, cx)``: ``int64`` CPU tensors of shape ``(b,)``.
    """
    b, h, w = int(b), int(h), int(w)
    if b < 0:
        raise ValueError(f"cutout_params: b must be >= 0, got {b}")
    if h < 1 or w < 1:
        raise ValueError(f"cutout_params: h and w must be >= 1, got {h} x {w}")
    cy = torch.randint(0, h, (b,), generator=generator)
    cx = torch.randint(0, w, (b,), generator=generator)
    return cy, cx


def apply_cutout(x: torch.Tensor, length: int, cy: torch.Tensor, cx: torch.Tensor) -> torch.Tensor:
    """Zero the ``length x length`` square centred at ``(cy[b], cx[b])`` of each image.

    Rows ``[cy - length//2, cy - length//2 + length)`` and columns
    ``[cx - length//2, cx - length//2 + length)``, intersected with the image,
    are set to zero in all channels (see :func:`cutout`); no randomness.

    Args:
        x: ``(B, C, H, W)`` tensor, any dtype, any device.
        length: side of the square; ``length <= 0`` returns a copy of ``x``.
        cy, cx: ``(B,)`` integer tensors (as drawn by :func:`cutout_params`,
            normally on the CPU).

    Returns:
        A new tensor with the same shape, dtype and device as ``x``.
    """
    _check_batch(x, "apply_cutout")
    length = int(length)
    b, _, h, w = x.shape
    _check_params("apply_cutout", b, cy=cy, cx=cx)
    if length <= 0:
        return x.clone()
    pdev = cy.device
    y0 = cy - length // 2
    x0 = cx.to(pdev) - length // 2
    r = torch.arange(h, device=pdev)[None, :]
    s = torch.arange(w, device=pdev)[None, :]
    in_rows = (r >= y0[:, None]) & (r < (y0 + length)[:, None])  # (B, H)
    in_cols = (s >= x0[:, None]) & (s < (x0 + length)[:, None])  # (B, W)
    mask = (in_rows[:, :, None] & in_cols[:, None, :])[:, None]  # (B, 1, H, W)
    return x.masked_fill(mask.to(x.device), 0)


def cutout(x: torch.Tensor, length: int, generator: torch.Generator) -> torch.Tensor:
    """Zero a ``length x length`` square per image, clipped at the borders.

    For each sample a centre pixel ``(cy, cx)`` is drawn uniformly from the
    ``H x W`` grid; rows ``[cy - length//2, cy - length//2 + length)`` and
    columns ``[cx - length//2, cx - length//2 + length)``, intersected with
    the image, are set to zero in all channels.  (For even ``length`` this is
    exactly the DARTS / DeVries & Taylor cutout.)

    Random draws, in this order: ``cy`` (B ints), ``cx`` (B ints).  This is
    exactly ``apply_cutout(x, length, *cutout_params(B, H, W, generator))``
    for ``length > 0``.

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
    cy, cx = cutout_params(b, h, w, generator)
    return apply_cutout(x, length, cy, cx)


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
