"""CIFAR-10 / CIFAR-100 in the official "python version" on-disk format.

Layout expected under a root directory ``ROOT`` (the same as torchvision's)::

    ROOT/cifar-10-batches-py/data_batch_1 ... data_batch_5, test_batch
    ROOT/cifar-100-python/train, test

Each file is a Python pickle (written by Python 2, hence loaded with
``encoding="latin1"``) of a dict with

* ``"data"``: ``uint8`` array ``(N, 3072)``; each row is one 32x32 RGB image
  stored channel-major (1024 red values, then 1024 green, then 1024 blue,
  each row-major), so ``row.reshape(3, 32, 32)`` is the ``(C, H, W)`` image;
* ``"labels"`` (CIFAR-10) or ``"fine_labels"`` (CIFAR-100): ``N`` ints.

Note that unpickling can execute code: only load files from a trusted source
(the official archives are verified by MD5 when downloaded here).

:func:`load_cifar` returns an :class:`~adarts_kernels.data.loader.ImageSet`;
with ``download=True`` it fetches and safely extracts the official archive
when the data is not already present.  :func:`search_split` gives the DARTS
search split of a training set.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Dict, List, Tuple, Union

import numpy as np
import torch

from .loader import DataError, ImageSet

__all__ = ["load_cifar", "search_split", "CIFAR_SPECS"]

PathLike = Union[str, "os.PathLike[str]"]

CIFAR_SPECS: Dict[str, Dict[str, object]] = {
    "cifar10": {
        "title": "CIFAR-10",
        "folder": "cifar-10-batches-py",
        "train_files": [f"data_batch_{i}" for i in range(1, 6)],
        "test_files": ["test_batch"],
        "label_key": "labels",
        "num_classes": 10,
        "mean": (0.4914, 0.4822, 0.4465),
        "std": (0.2470, 0.2435, 0.2616),
        "url": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "md5": "c58f30108f718f92721af3b95e74349a",
    },
    "cifar100": {
        "title": "CIFAR-100",
        "folder": "cifar-100-python",
        "train_files": ["train"],
        "test_files": ["test"],
        "label_key": "fine_labels",
        "num_classes": 100,
        "mean": (0.5071, 0.4865, 0.4409),
        "std": (0.2673, 0.2564, 0.2762),
        "url": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        "md5": "eb9058c3a382ffc7106e4002c42a8d85",
    },
}

_IMAGE_BYTES = 3 * 32 * 32


def _how_to_get(spec: Dict[str, object], root: Path, corrupt: bool = False) -> str:
    archive = str(spec["url"]).rsplit("/", 1)[-1]
    first = (
        f"To replace it, delete {root / str(spec['folder'])} and then run with --download"
        if corrupt
        else "To obtain it, run with --download"
    )
    return (
        f"{first} where a network is reachable, or place the "
        f"python version of {spec['title']} ({archive} from "
        f"https://www.cs.toronto.edu/~kriz/cifar.html) extracted under {root} "
        f"(so that {root / str(spec['folder'])} exists)."
    )


def _spec(name: str) -> Dict[str, object]:
    key = str(name).lower()
    if key not in CIFAR_SPECS:
        raise ValueError(
            f"unknown CIFAR data set {name!r}; valid names: {', '.join(sorted(CIFAR_SPECS))}"
        )
    return CIFAR_SPECS[key]


def _all_files(spec: Dict[str, object], root: Path) -> List[Path]:
    folder = root / str(spec["folder"])
    names = list(spec["train_files"]) + list(spec["test_files"])  # type: ignore[arg-type]
    return [folder / n for n in names]


# --------------------------------------------------------------------------- download


def _safe_extract(archive: Path, dest: Path) -> None:
    """Extract a tar archive into ``dest``, refusing anything but plain
    files and directories inside ``dest`` (no absolute paths, no ``..``,
    no links or devices)."""
    dest_resolved = dest.resolve()
    with tarfile.open(archive, "r:*") as tar:
        members = tar.getmembers()
        for m in members:
            name = m.name
            parts = Path(name).parts
            if name.startswith(("/", "\\")) or os.path.isabs(name) or ".." in parts or (
                len(name) > 1 and name[1] == ":"
            ):
                raise DataError(f"refusing to extract {archive}: unsafe member path {name!r}")
            if not (m.isfile() or m.isdir()):
                raise DataError(
                    f"refusing to extract {archive}: member {name!r} is not a regular file "
                    "or directory"
                )
            target = (dest / name).resolve()
            if target != dest_resolved and dest_resolved not in target.parents:
                raise DataError(f"refusing to extract {archive}: member {name!r} escapes {dest}")
        for m in members:
            target = dest / m.name
            if m.isdir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            src = tar.extractfile(m)
            if src is None:  # pragma: no cover - regular files always have data
                raise DataError(f"could not read member {m.name!r} of {archive}")
            with src, open(target, "wb") as out:
                shutil.copyfileobj(src, out)


def _download(spec: Dict[str, object], root: Path, timeout: float = 60.0) -> None:
    url = str(spec["url"])
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create data directory {root}: {e}") from None
    fd, tmp_name = tempfile.mkstemp(prefix=".download-", suffix=".tar.gz", dir=root)
    tmp = Path(tmp_name)
    try:
        md5 = hashlib.md5()
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
                while True:
                    chunk = resp.read(1 << 20)
                    if not chunk:
                        break
                    md5.update(chunk)
                    out.write(chunk)
        except (urllib.error.URLError, OSError, ValueError) as e:
            reason = getattr(e, "reason", None) or e
            raise DataError(
                f"could not download {spec['title']} from {url}: {reason}. If this machine has "
                f"no network, download the archive elsewhere and extract it under {root} "
                f"(so that {root / str(spec['folder'])} exists)."
            ) from None
        digest = md5.hexdigest()
        if digest != spec["md5"]:
            raise DataError(
                f"downloaded {spec['title']} archive from {url} has MD5 {digest}, expected "
                f"{spec['md5']}; the download is corrupt or incomplete, try again."
            )
        try:
            _safe_extract(tmp, root)
        except DataError:
            raise
        except Exception as e:  # noqa: BLE001 - tarfile/zlib/OS errors all mean a bad archive
            raise DataError(
                f"could not extract {spec['title']} archive downloaded from {url} into {root}: "
                f"{e}"
            ) from None
    finally:
        try:
            tmp.unlink()
        except OSError:
            pass


# --------------------------------------------------------------------------- loading


def _read_batch(path: Path, spec: Dict[str, object], root: Path) -> Tuple[np.ndarray, np.ndarray]:
    """Read one pickle file; return ``data`` (N, 3072) uint8 and labels (N,) int64."""
    title = spec["title"]
    if not path.is_file():
        raise DataError(f"{title} file {path} is missing. {_how_to_get(spec, root)}")
    hint = _how_to_get(spec, root, corrupt=True)
    try:
        with open(path, "rb") as f:
            entry = pickle.load(f, encoding="latin1")
    except Exception as e:  # noqa: BLE001 - any unpickling failure means corrupt data
        raise DataError(
            f"{title} file {path} is corrupt (could not be unpickled: "
            f"{type(e).__name__}: {e}). {hint}"
        ) from None

    def corrupt(what: str) -> DataError:
        return DataError(f"{title} file {path} is corrupt ({what}). {hint}")

    if not isinstance(entry, dict):
        raise corrupt(f"expected a dict, found {type(entry).__name__}")

    def get(key: str):
        if key in entry:
            return entry[key]
        if key.encode() in entry:
            return entry[key.encode()]
        raise corrupt(f"no {key!r} entry")

    label_key = str(spec["label_key"])
    raw_data = get("data")
    raw_labels = get(label_key)
    try:
        data = np.asarray(raw_data)
        labels = np.asarray(raw_labels)
    except Exception as e:  # noqa: BLE001
        raise corrupt(f"unreadable arrays: {type(e).__name__}: {e}") from None
    if data.dtype != np.uint8:
        if not np.issubdtype(data.dtype, np.integer) or data.size and (
            data.min() < 0 or data.max() > 255
        ):
            raise corrupt(f"'data' has dtype {data.dtype}, expected uint8")
        data = data.astype(np.uint8)
    if data.ndim != 2 or data.shape[1] != _IMAGE_BYTES:
        raise corrupt(f"'data' has shape {data.shape}, expected (N, {_IMAGE_BYTES})")
    if labels.ndim != 1 or labels.shape[0] != data.shape[0]:
        raise corrupt(
            f"{label_key!r} has shape {labels.shape}, expected ({data.shape[0]},) to match 'data'"
        )
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        raise corrupt(f"{label_key!r} has dtype {labels.dtype}, expected integers")
    labels = labels.astype(np.int64)
    num_classes = int(spec["num_classes"])  # type: ignore[arg-type]
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise corrupt(
            f"{label_key!r} values span {labels.min()}..{labels.max()}, expected 0..{num_classes - 1}"
        )
    return data, labels


def load_cifar(name: str, root: PathLike, train: bool, download: bool = False) -> ImageSet:
    """Load CIFAR-10 or CIFAR-100 from ``root``.

    Args:
        name: ``"cifar10"`` or ``"cifar100"``.
        root: directory holding ``cifar-10-batches-py/`` or ``cifar-100-python/``.
        train: the 50,000-image training set (True) or the 10,000-image test
            set (False).
        download: if the data is not complete under ``root``, download the
            official archive (MD5-verified) and extract it there first.

    Returns:
        An :class:`ImageSet` with ``images`` ``uint8`` ``(N, 3, 32, 32)``,
        ``labels`` ``int64`` ``(N,)``, ``num_classes`` 10 or 100, the standard
        per-channel mean/std and ``name`` equal to ``name`` (lower case).

    Raises:
        ValueError: unknown ``name``.
        DataError: the data is missing or corrupt (the message names the path
            and how to obtain the data), or the download failed.
    """
    spec = _spec(name)
    root_path = Path(os.fspath(root)).expanduser()
    if download and not all(p.is_file() for p in _all_files(spec, root_path)):
        _download(spec, root_path)

    folder = root_path / str(spec["folder"])
    if not folder.is_dir():
        raise DataError(f"{spec['title']} directory {folder} is missing. {_how_to_get(spec, root_path)}")

    files = spec["train_files"] if train else spec["test_files"]
    datas, labels = [], []
    for fname in files:  # type: ignore[union-attr]
        d, l = _read_batch(folder / fname, spec, root_path)
        datas.append(d)
        labels.append(l)
    data = np.concatenate(datas, axis=0) if len(datas) > 1 else datas[0]
    lab = np.concatenate(labels, axis=0) if len(labels) > 1 else labels[0]
    images = torch.from_numpy(np.ascontiguousarray(data).reshape(-1, 3, 32, 32))
    return ImageSet(
        images=images,
        labels=torch.from_numpy(np.ascontiguousarray(lab)),
        num_classes=int(spec["num_classes"]),  # type: ignore[arg-type]
        mean=spec["mean"],  # type: ignore[arg-type]
        std=spec["std"],  # type: ignore[arg-type]
        name=str(name).lower(),
    )


def search_split(trainset: ImageSet) -> Tuple[ImageSet, ImageSet]:
    """Split a training set for the DARTS bilevel search.

    Returns ``(weights_part, arch_part)``: the first ``n // 2`` samples (in
    data-set order) train the network weights, the remaining ``n - n // 2``
    train the architecture parameters.  For CIFAR that is 25,000 / 25,000.
    Both parts keep the name, class count and mean/std of ``trainset``.
    """
    n = len(trainset)
    half = n // 2
    return trainset.subset(range(0, half)), trainset.subset(range(half, n))
