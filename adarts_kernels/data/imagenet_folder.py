"""ImageNet ImageFolder scan and subset manifests (see :mod:`adarts_kernels.data.imagenet`).

* :func:`scan_image_folder` -- the sorted file lists of ``ROOT/train/<class>/*``
  and ``ROOT/val/<class>/*`` (:class:`ImageFolder`);
* :func:`make_search_manifest` / :func:`make_full_manifest` -- a
  :class:`Manifest` of named sample lists;
* :func:`save_manifest` / :func:`load_manifest` -- JSON, written atomically,
  checked against the folder on reading.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..utils.io import atomic_write
from .loader import DataError

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageFolder",
    "Manifest",
    "scan_image_folder",
    "class_list_hash",
    "make_search_manifest",
    "make_full_manifest",
    "save_manifest",
    "load_manifest",
]

PathLike = Union[str, "os.PathLike[str]"]
Sample = Tuple[str, int]  # (path relative to the root, with "/" separators; label)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
MANIFEST_FORMAT = "adarts_kernels.imagenet_manifest"
MANIFEST_VERSION = 1


# --------------------------------------------------------------------------- scan


@dataclass
class ImageFolder:
    """The files of an ImageFolder tree.

    Attributes:
        root: the directory holding ``train/`` and ``val/``.
        classes: sorted class folder names; label ``k`` is ``classes[k]``.
        train, val: ``(relative path, label)`` lists, sorted by class then
            file name (independent of the file system's listing order).
    """

    root: Path
    classes: List[str]
    train: List[Sample]
    val: List[Sample]


def _class_dirs(split_dir: Path) -> List[str]:
    with os.scandir(split_dir) as it:
        return sorted(e.name for e in it if e.is_dir() and not e.name.startswith("."))


def _image_names(class_dir: Path) -> List[str]:
    with os.scandir(class_dir) as it:
        return sorted(
            e.name for e in it
            if not e.name.startswith(".") and e.name.lower().endswith(IMAGE_EXTENSIONS) and e.is_file()
        )


def _differing(a: Sequence[str], b: Sequence[str], n: int = 3) -> str:
    only = sorted(set(a) - set(b))
    more = f" and {len(only) - n} more" if len(only) > n else ""
    return ", ".join(only[:n]) + more if only else "none"


def scan_image_folder(root: PathLike) -> ImageFolder:
    """List ``root/train/<class>/*`` and ``root/val/<class>/*``.

    Raises:
        DataError: ``root``, ``train`` or ``val`` is missing; ``train`` has no
            class folder; train and val class folders differ (a few of each
            side are named); a class folder holds no image.
    """
    root_path = Path(os.fspath(root)).expanduser()
    for split in ("train", "val"):
        if not (root_path / split).is_dir():
            raise DataError(
                f"ImageNet folder {root_path / split} is missing: expected {root_path}/train/<class>/"
                f"*.JPEG and {root_path}/val/<class>/*.JPEG"
            )
    classes = _class_dirs(root_path / "train")
    if not classes:
        raise DataError(f"ImageNet folder {root_path / 'train'} has no class folders, so no images")
    val_classes = _class_dirs(root_path / "val")
    if val_classes != classes:
        raise DataError(
            f"class folders of {root_path / 'train'} and {root_path / 'val'} differ: only in train: "
            f"{_differing(classes, val_classes)}; only in val: {_differing(val_classes, classes)}"
        )
    splits: Dict[str, List[Sample]] = {}
    for split in ("train", "val"):
        samples: List[Sample] = []
        for label, name in enumerate(classes):
            files = _image_names(root_path / split / name)
            if not files:
                raise DataError(
                    f"class folder {root_path / split / name} holds no image "
                    f"({'/'.join(IMAGE_EXTENSIONS)} files)"
                )
            samples.extend((f"{split}/{name}/{f}", label) for f in files)
        splits[split] = samples
    return ImageFolder(root_path, classes, splits["train"], splits["val"])


def class_list_hash(classes: Sequence[str]) -> str:
    """SHA-256 (hex) of the class list, order included."""
    return hashlib.sha256(json.dumps(list(classes)).encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------- manifests


@dataclass
class Manifest:
    """Named lists of ``(relative path, label)`` samples of one ImageFolder.

    Attributes:
        classes: the class list the labels index.
        splits: e.g. ``{"train": [...], "arch": [...]}`` (search) or
            ``{"train": [...], "val": [...]}`` (full).
        settings: how the lists were made (fractions, seed, ...), stored
            with them.
    """

    classes: List[str]
    splits: Dict[str, List[Sample]]
    settings: Dict[str, Any] = field(default_factory=dict)

    @property
    def class_hash(self) -> str:
        return class_list_hash(self.classes)

    def to_dict(self) -> Dict[str, Any]:
        return {
            "format": MANIFEST_FORMAT,
            "version": MANIFEST_VERSION,
            "settings": dict(self.settings),
            "num_classes": len(self.classes),
            "class_hash": self.class_hash,
            "classes": list(self.classes),
            "splits": {k: {"paths": [p for p, _ in v], "labels": [int(l) for _, l in v]}
                       for k, v in self.splits.items()},
        }

    def verify(self, root: PathLike) -> None:
        """Check that ``root`` still holds this manifest's classes and files.

        Raises:
            DataError: the class folders of ``root/train`` differ from
                ``classes``, or listed files are missing (a few are named).
        """
        root_path = Path(os.fspath(root)).expanduser()
        train = root_path / "train"
        found = _class_dirs(train) if train.is_dir() else []
        if found != list(self.classes):
            raise DataError(
                f"manifest does not match {train}: it lists {len(self.classes)} classes (hash "
                f"{self.class_hash[:12]}), the folder has {len(found)} (hash "
                f"{class_list_hash(found)[:12]}); only in the manifest: "
                f"{_differing(self.classes, found)}; only in the folder: {_differing(found, self.classes)}"
            )
        missing = [p for v in self.splits.values() for p, _ in v if not (root_path / p).is_file()]
        if missing:
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            raise DataError(
                f"manifest does not match {root_path}: {len(missing)} listed files are missing: "
                f"{', '.join(str(root_path / p) for p in missing[:3])}{more}"
            )


def _subset_count(fraction: float, n: int) -> int:
    # round half up; a tiny epsilon keeps 0.1 * 1300 (= 130.00000000000003 or 129.99...) exact
    return int(math.floor(fraction * n + 0.5 + 1e-9))


def make_search_manifest(
    folder: ImageFolder, train_fraction: float = 0.1, arch_fraction: float = 0.025, seed: int = 0
) -> Manifest:
    """PC-DARTS's ImageNet search subsets: disjoint per-class draws.

    Class ``k`` with ``n`` images (file names sorted) is permuted by
    ``numpy.random.default_rng([seed, k]).permutation(n)``; the first
    ``round(train_fraction * n)`` files (round half up) go to ``"train"``
    (network weights), the next ``round(arch_fraction * n)`` to ``"arch"``
    (architecture parameters).  The draw depends only on ``seed``, the class
    index and the sorted file names.  A class whose share would be empty is
    refused (no silent oversampling): the message names it and the number of
    images it would need.

    Raises:
        ValueError: fractions not in (0, 1] or summing to more than 1, or
            ``seed < 0``.
        DataError: a class too small for a fraction.
    """
    tf, af = float(train_fraction), float(arch_fraction)
    if not (0 < tf <= 1 and 0 < af <= 1 and tf + af <= 1 + 1e-12):
        raise ValueError(f"need 0 < train_fraction, arch_fraction and a sum <= 1, got {tf} and {af}")
    if int(seed) < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    by_class: Dict[int, List[str]] = {}
    for p, label in folder.train:
        by_class.setdefault(label, []).append(p)
    train: List[Sample] = []
    arch: List[Sample] = []
    for k, name in enumerate(folder.classes):
        files = sorted(by_class.get(k, []))
        n = len(files)
        nt, na = _subset_count(tf, n), _subset_count(af, n)
        for what, frac, cnt in (("train_fraction", tf, nt), ("arch_fraction", af, na)):
            if cnt == 0:
                need = math.ceil(0.5 / frac - 1e-9)
                raise DataError(
                    f"class {name!r} ({folder.root / 'train' / name}) has {n} images: {what}={frac} "
                    f"selects none of them (a class needs at least {need} images for one)"
                )
        if nt + na > n:
            raise DataError(
                f"class {name!r} ({folder.root / 'train' / name}) has {n} images, fewer than the "
                f"{nt} + {na} the fractions select"
            )
        perm = np.random.default_rng([int(seed), k]).permutation(n)
        train.extend(sorted((files[i], k) for i in perm[:nt]))
        arch.extend(sorted((files[i], k) for i in perm[nt:nt + na]))
    settings = {"kind": "search", "train_fraction": tf, "arch_fraction": af, "seed": int(seed)}
    return Manifest(list(folder.classes), {"train": train, "arch": arch}, settings)


def make_full_manifest(folder: ImageFolder) -> Manifest:
    """The whole ``train`` and ``val`` lists of ``folder`` (retraining / evaluation)."""
    return Manifest(list(folder.classes), {"train": list(folder.train), "val": list(folder.val)},
                    {"kind": "full"})


def save_manifest(manifest: Manifest, path: PathLike) -> None:
    """Write ``manifest`` as JSON to ``path`` atomically (temporary file, fsync, rename)."""
    path = Path(os.fspath(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, "w", lambda f: json.dump(manifest.to_dict(), f), encoding="utf-8")


def load_manifest(path: PathLike, root: Optional[PathLike] = None) -> Manifest:
    """Read a manifest written by :func:`save_manifest`; with ``root``, also
    :meth:`Manifest.verify` it against that folder.

    Raises:
        DataError: unreadable or malformed file, or (with ``root``) a folder
            that does not match.
    """
    path = Path(os.fspath(path))
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
        if d.get("format") != MANIFEST_FORMAT or d.get("version") != MANIFEST_VERSION:
            raise ValueError(f"not a version-{MANIFEST_VERSION} {MANIFEST_FORMAT} file")
        classes = [str(c) for c in d["classes"]]
        if class_list_hash(classes) != d["class_hash"]:
            raise ValueError("class_hash does not match the class list")
        splits = {}
        for k, v in d["splits"].items():
            if len(v["paths"]) != len(v["labels"]):
                raise ValueError(f"split {k!r} has {len(v['paths'])} paths but {len(v['labels'])} labels")
            splits[str(k)] = [(str(p), int(l)) for p, l in zip(v["paths"], v["labels"])]
            if any(not 0 <= l < len(classes) for _, l in splits[k]):
                raise ValueError(f"split {k!r} has labels outside 0..{len(classes) - 1}")
        manifest = Manifest(classes, splits, dict(d.get("settings", {})))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise DataError(f"cannot read ImageNet manifest {path}: {type(e).__name__}: {e}") from None
    if root is not None:
        manifest.verify(root)
    return manifest
