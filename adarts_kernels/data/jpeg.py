"""Decoding and ``uint8`` augmentation of single images (the ImageNet host pipeline).

Everything here works on one file at a time, on the host, in ``uint8``: the
output of :func:`load_train_image` and :func:`load_val_image` is a
``torch.uint8`` tensor ``(3, size, size)`` (CHW, RGB).  Conversion to float
and normalisation happen later, on the device, so only bytes cross PCIe (see
:func:`adarts_kernels.data.imagenet.normalize`).

Pipeline of one training sample (torchvision's ImageNet recipe, re-implemented
without torchvision):

1. open the file and read only its header (width, height);
2. draw the RandomResizedCrop box with torchvision's algorithm
   (:func:`random_resized_crop_params`), the flip and the optional colour
   jitter factors, all from ``numpy.random.default_rng([seed, epoch, index])``
   (see :func:`sample_rng`): a sample's augmentation is a pure function of
   ``(seed, epoch, index)`` -- independent of worker count, batch order,
   process or machine;
3. JPEG draft mode: the decoder downscales by 1/2, 1/4 or 1/8 in the DCT
   domain when the crop is going to be shrunk anyway
   (:func:`draft_scale`: the largest reduction that still leaves the crop
   region at least ``size`` pixels on both sides), which skips most of the
   decoding work for large crops;
4. conversion to RGB (greyscale, CMYK, palette and RGBA files, PNGs that carry
   a ``.JPEG`` name);
5. one bilinear, antialiased resize of the crop box to ``size x size``
   (what torchvision's ``RandomResizedCrop`` does), by torch's vectorised
   ``uint8`` kernel (4x faster than Pillow's here, see
   :func:`decode_crop_resize`);
6. horizontal flip with probability 1/2, then optional colour jitter.

Validation: Resize(shorter side ``round(size * 256 / 224)``) + CenterCrop(size)
of the (drafted) image, as torchvision computes it.

EXIF orientation is ignored, as in torchvision's ``ImageFolder``.
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageEnhance

from .loader import DataError

__all__ = [
    "sample_rng",
    "random_resized_crop_params",
    "center_crop_box",
    "resize_center_crop_geometry",
    "draft_scale",
    "open_image",
    "decode_crop_resize",
    "color_jitter",
    "load_train_image",
    "load_val_image",
    "to_chw_tensor",
    "to_pil",
]

PathLike = Union[str, "os.PathLike[str]"]
Box = Tuple[float, float, float, float]  # (left, upper, right, lower) in pixels of the full image

#: Draft (DCT-domain) reductions that libjpeg offers through Pillow.
DRAFT_SCALES = (8, 4, 2, 1)

#: torchvision's ColorJitter(0.4, 0.4, 0.4, 0.2) used for retraining.
JITTER = (0.4, 0.4, 0.4, 0.2)


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The random generator of sample ``index`` in epoch ``epoch``.

    ``numpy.random.default_rng([seed, epoch, index])`` (a ``SeedSequence``
    over the three integers, all >= 0): every draw of the sample's
    augmentation comes from it, in a fixed order (crop, flip, then jitter), so
    the augmented image is a pure function of ``(seed, epoch, index)`` and the
    file.  Creating it costs about 15 us, small next to a decode.
    """
    return np.random.default_rng([int(seed), int(epoch), int(index)])


def random_resized_crop_params(
    width: int,
    height: int,
    rng: np.random.Generator,
    scale: Tuple[float, float] = (0.08, 1.0),
    ratio: Tuple[float, float] = (3 / 4, 4 / 3),
) -> Tuple[int, int, int, int]:
    """torchvision's ``RandomResizedCrop.get_params``, drawing from ``rng``.

    Ten tries of: area fraction ``U(scale)``, log aspect ratio
    ``U(log ratio)``, ``w = round(sqrt(area * ar))``, ``h = round(sqrt(area / ar))``;
    the first box that fits is placed uniformly at random.  If none fits, the
    whole image is cropped to the nearest allowed aspect ratio, centred.

    Returns:
        ``(top, left, h, w)`` in pixels of the ``width x height`` image.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect_ratio = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def resize_center_crop_geometry(
    width: int, height: int, size: int, resize_to: Optional[int] = None
) -> Tuple[int, int, int, int]:
    """torchvision's Resize(``resize_to``) + CenterCrop(``size``) of a ``width x height`` image.

    ``resize_to`` defaults to ``round(size * 256 / 224)`` (256 for 224).  The
    shorter side becomes ``resize_to``, the longer ``int(resize_to * long / short)``;
    the crop starts at ``round((resized - size) / 2)``.

    Returns:
        ``(resized_w, resized_h, top, left)``.
    """
    if resize_to is None:
        resize_to = int(round(size * 256 / 224))
    if width <= height:
        rw, rh = resize_to, int(resize_to * height / width)
    else:
        rw, rh = int(resize_to * width / height), resize_to
    return rw, rh, int(round((rh - size) / 2.0)), int(round((rw - size) / 2.0))


def center_crop_box(width: int, height: int, size: int, resize_to: Optional[int] = None) -> Box:
    """The region of a ``width x height`` image that Resize + CenterCrop keeps
    (:func:`resize_center_crop_geometry`), in full-image pixels (floats)."""
    rw, rh, top, left = resize_center_crop_geometry(width, height, size, resize_to)
    sx, sy = width / rw, height / rh
    return (left * sx, top * sy, (left + size) * sx, (top + size) * sy)


def draft_scale(box: Box, size: int) -> int:
    """Largest JPEG draft reduction (8, 4, 2 or 1) that keeps ``box`` at least
    ``size`` pixels wide and high, so the final resize still only shrinks."""
    bw, bh = box[2] - box[0], box[3] - box[1]
    for s in DRAFT_SCALES:
        if bw / s >= size and bh / s >= size:
            return s
    return 1


def open_image(path: PathLike) -> Image.Image:
    """Open ``path`` lazily (header only); ``DataError`` naming it if it is not an image."""
    try:
        return Image.open(path)
    except Exception as e:  # noqa: BLE001 - any failure to identify the file is bad data
        raise DataError(f"cannot read image {path}: {type(e).__name__}: {e}") from None


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # the direct P->RGB conversion warns about byte transparency
    # L, LA, CMYK, RGBA, I;16, ...: Pillow's conversion; alpha is dropped (colour kept as stored)
    return img.convert("RGB")


def _decode(img: Image.Image, scale: int) -> Tuple[Image.Image, int]:
    """Decode with a draft reduction of at most ``scale`` (JPEG only) and convert to RGB;
    returns the image and the reduction libjpeg applied."""
    used = 1
    if scale > 1 and img.format == "JPEG":
        w, h = img.size
        # Pillow picks the largest s' in (8, 4, 2, 1) with s' <= min(w // rw, h // rh)
        res = img.draft("RGB", (max(1, w // scale), max(1, h // scale)))
        if res is not None:
            used = int(round(w / res[1][2]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        img.load()
    return _to_rgb(img), used


def _hwc(rgb: Image.Image) -> torch.Tensor:
    with warnings.catch_warnings():
        # np.asarray(PIL image) is read-only; the tensor is only read
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(np.asarray(rgb))


def _resize_chw(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Bilinear antialiased resize of a ``uint8`` ``(3, H, W)`` view to ``(3, h, w)``."""
    if tuple(x.shape[-2:]) == (h, w):
        return x.contiguous()
    out = F.interpolate(x.unsqueeze(0), size=(h, w), mode="bilinear", antialias=True, align_corners=False)
    return out[0].contiguous()


def decode_crop_resize(
    img: Image.Image,
    box: Box,
    size: int,
    use_draft: bool = True,
    path: PathLike = "<image>",
    resize: str = "torch",
) -> Tuple[torch.Tensor, int]:
    """Decode ``img`` (opened by :func:`open_image`) and resize region ``box`` to ``size x size``.

    Args:
        img: a lazily opened image; it is decoded here (only once).
        box: ``(left, upper, right, lower)`` in pixels of the full image,
            floats allowed.
        size: output side.
        use_draft: let libjpeg downscale by :func:`draft_scale` while decoding
            (JPEG only; other formats ignore it).
        path: named in the error message.
        resize: ``"torch"`` (default): the box is rounded to whole pixels of
            the decoded image -- exact for a RandomResizedCrop box without
            draft; with draft reduction ``s`` the crop moves by less than
            ``s / 2`` full-resolution pixels, which only changes which random
            crop is taken -- and resized by
            ``F.interpolate(uint8, mode="bilinear", antialias=True)``, whose
            ``uint8`` kernel is vectorised: 0.22 ms against Pillow's 0.97 ms
            for a 290x310 -> 224x224 crop (1 thread, max difference 3 grey
            levels).  ``"pil"``: ``PIL.Image.resize(BILINEAR, box=...)`` with
            the exact sub-pixel box.

    Returns:
        ``(image, scale)``: ``torch.uint8`` ``(3, size, size)`` RGB and the
        draft reduction actually used (1 when none).

    Raises:
        DataError: the file is corrupt or truncated.
    """
    try:
        rgb, scale = _decode(img, draft_scale(box, size) if use_draft else 1)
        # libjpeg's scaled pixel i covers full-resolution pixels [i*s, (i+1)*s), so
        # the box maps by plain division; clamp against the rounded-up drafted size.
        b = [v / scale for v in box]
        b = [max(0.0, b[0]), max(0.0, b[1]), min(float(rgb.width), b[2]), min(float(rgb.height), b[3])]
        if resize == "pil":
            return to_chw_tensor(rgb.resize((size, size), Image.Resampling.BILINEAR, box=tuple(b))), scale
        x0, y0 = int(round(b[0])), int(round(b[1]))
        x1, y1 = max(x0 + 1, int(round(b[2]))), max(y0 + 1, int(round(b[3])))
        return _resize_chw(_hwc(rgb)[y0:y1, x0:x1].permute(2, 0, 1), size, size), scale
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - OSError (truncated), SyntaxError, ValueError from decoders
        raise DataError(f"cannot decode image {path}: {type(e).__name__}: {e}") from None


def color_jitter(
    img: Image.Image,
    rng: np.random.Generator,
    brightness: float = JITTER[0],
    contrast: float = JITTER[1],
    saturation: float = JITTER[2],
    hue: float = JITTER[3],
) -> Image.Image:
    """torchvision's ``ColorJitter`` as its Pillow backend computes it, on a ``uint8`` RGB image.

    Factors ``b, c, s ~ U(max(0, 1 - x), 1 + x)`` and ``h ~ U(-hue, hue)`` are
    drawn first (in that order), then the four operations are applied in the
    order of ``rng.permutation(4)`` (0 brightness, 1 contrast, 2 saturation,
    3 hue):

    * brightness: ``ImageEnhance.Brightness(b)`` = blend with black, ``x * b``;
    * contrast: ``ImageEnhance.Contrast(c)`` = blend with the grey level of the
      rounded mean luminance;
    * saturation: ``ImageEnhance.Color(s)`` = blend with the image's own
      luminance (``L`` conversion);
    * hue: RGB -> HSV (8-bit), ``H += int(h * 255)`` (truncated) modulo 256,
      back to RGB.

    Every step rounds and clips to 0..255 (Pillow's blends), so it never
    leaves ``uint8``.
    """
    b = rng.uniform(max(0.0, 1 - brightness), 1 + brightness)
    c = rng.uniform(max(0.0, 1 - contrast), 1 + contrast)
    s = rng.uniform(max(0.0, 1 - saturation), 1 + saturation)
    h = rng.uniform(-hue, hue)
    for op in rng.permutation(4):
        if op == 0:
            img = ImageEnhance.Brightness(img).enhance(b)
        elif op == 1:
            img = ImageEnhance.Contrast(img).enhance(c)
        elif op == 2:
            img = ImageEnhance.Color(img).enhance(s)
        else:
            hh, ss, vv = img.convert("HSV").split()
            shift = np.asarray(hh, dtype=np.uint8) + np.uint8(int(h * 255) % 256)
            img = Image.merge("HSV", (Image.fromarray(shift, "L"), ss, vv)).convert("RGB")
    return img


def to_chw_tensor(img: Image.Image) -> torch.Tensor:
    """``torch.uint8`` ``(3, H, W)`` from an RGB ``PIL.Image`` (one copy)."""
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def to_pil(x: torch.Tensor) -> Image.Image:
    """RGB ``PIL.Image`` from a ``torch.uint8`` ``(3, H, W)`` tensor."""
    return Image.fromarray(x.permute(1, 2, 0).contiguous().numpy(), "RGB")


def load_train_image(
    path: PathLike,
    size: int,
    rng: np.random.Generator,
    jitter: bool = False,
    use_draft: bool = True,
    scale: Tuple[float, float] = (0.08, 1.0),
    ratio: Tuple[float, float] = (3 / 4, 4 / 3),
    resize: str = "torch",
) -> Tuple[torch.Tensor, int]:
    """Training transform of one file: RandomResizedCrop + flip (+ jitter).

    Args:
        path: image file.
        size: output side.
        rng: the sample's generator (:func:`sample_rng`); draws crop, flip
            (``rng.random() < 0.5``), then the jitter factors.
        jitter: apply :func:`color_jitter` (retraining only).
        use_draft: JPEG draft mode (see :func:`decode_crop_resize`).
        scale, ratio: RandomResizedCrop ranges.
        resize: ``"torch"`` or ``"pil"``, see :func:`decode_crop_resize`.

    Returns:
        ``(image, draft_scale)``: ``torch.uint8`` ``(3, size, size)`` and the
        draft reduction used.

    Raises:
        DataError: unreadable, corrupt or truncated file (the message names it).
    """
    img = open_image(path)
    try:
        width, height = img.size
        top, left, h, w = random_resized_crop_params(width, height, rng, scale, ratio)
        flip = rng.random() < 0.5
        out, s = decode_crop_resize(img, (left, top, left + w, top + h), size, use_draft, path, resize)
    finally:
        img.close()
    if flip:
        out = out.flip(-1)
    if jitter:
        out = to_chw_tensor(color_jitter(to_pil(out), rng))
    return out, s


def load_val_image(
    path: PathLike, size: int, use_draft: bool = True, resize_to: Optional[int] = None,
    resize: str = "torch",
) -> Tuple[torch.Tensor, int]:
    """Validation transform of one file: Resize(shorter side ``resize_to``) + CenterCrop(``size``).

    Without draft reduction (``use_draft=False``, a PNG, or a crop too small
    to reduce) this is torchvision's Resize + CenterCrop: a torch ``uint8``
    resize of the whole image, then a whole-pixel crop.  With a reduction it
    is Pillow's resize of the centre box of the drafted image (sub-pixel box).
    ``resize="pil"`` always uses the latter.

    Returns ``(image, draft_scale)`` like :func:`load_train_image`;
    deterministic (no random draws).
    """
    img = open_image(path)
    try:
        width, height = img.size
        rw, rh, top, left = resize_center_crop_geometry(width, height, size, resize_to)
        box = center_crop_box(width, height, size, resize_to)
        want = draft_scale(box, size) if use_draft else 1
        if resize == "pil" or (want > 1 and img.format == "JPEG"):
            # Drafted pixels do not tile the image exactly (the last one is partial,
            # 63 for 500 / 8), so a whole-image resize would stretch it by up to 1%
            # (6 grey levels mean error at size 32); Pillow's sub-pixel box keeps the
            # crop in place (1.7), and the drafted image is small, so it is cheap.
            return decode_crop_resize(img, box, size, use_draft, path, "pil")
        try:
            rgb, s = _decode(img, 1)
            # resize the whole image, then crop whole pixels: torchvision's
            # Resize + CenterCrop exactly
            full = _resize_chw(_hwc(rgb).permute(2, 0, 1), rh, rw)
        except Exception as e:  # noqa: BLE001 - see decode_crop_resize
            raise DataError(f"cannot decode image {path}: {type(e).__name__}: {e}") from None
    finally:
        img.close()
    return full[:, top:top + size, left:left + size].contiguous(), s
