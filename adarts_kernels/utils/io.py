"""Crash-safe file output: atomic checkpoints and text, JSON-lines logs, progress bars.

Everything that writes a file here writes it atomically: the data go to a temporary
file in the destination's directory, which is flushed and ``fsync``-ed and then renamed
over the destination with :func:`os.replace`.  A reader (or a run resumed after a crash
or a ``SIGKILL``) therefore sees either the previous complete file or the new complete
file, never a half-written one.  A process killed mid-write can leave its temporary
file (``.<name>.tmp-<pid>-<n>``) behind; it is never at the destination path, and
:func:`remove_stale_tmp` deletes such leftovers.

A checkpoint written by :func:`atomic_torch_save` ends with a one-line footer holding the
sha256 of the bytes before it (``torch.load`` ignores it); :func:`load_checkpoint` checks
it, so a flipped bit is reported, not loaded.
"""
from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import re
import sys
from typing import Any, Callable, Dict, Iterable, List, Optional

import torch

__all__ = [
    "CheckpointError",
    "atomic_torch_save",
    "atomic_write_text",
    "load_checkpoint",
    "remove_stale_tmp",
    "JsonlLogger",
    "read_jsonl",
    "progress",
    "set_postfix",
]

_tmp_counter = itertools.count()


class CheckpointError(RuntimeError):
    """A checkpoint file exists but cannot be loaded (corrupt, truncated, incompatible)."""

    def __init__(self, path: str, message: str):
        super().__init__(message)
        self.path = path


# --------------------------------------------------------------------------- atomic writes
def _tmp_path(path: str) -> str:
    directory, base = os.path.split(path)
    return os.path.join(directory, f".{base}.tmp-{os.getpid()}-{next(_tmp_counter)}")


def _fsync_dir(directory: str) -> None:
    """Make a rename in ``directory`` durable; best effort (not every OS/filesystem allows it)."""
    try:
        fd = os.open(directory or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: "str | os.PathLike", mode: str, write: Callable[[Any], None], **open_kw) -> str:
    """Open a temporary file beside ``path`` in ``mode``, ``write(f)``, fsync, rename onto ``path``."""
    path = os.fspath(path)
    tmp = _tmp_path(path)
    try:
        with open(tmp, mode, **open_kw) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(os.path.dirname(path))
    return path


_FOOTER_PREFIX = b"\n#adarts-checkpoint sha256="
_FOOTER_LEN = len(_FOOTER_PREFIX) + 64 + 1
_TMP_RE = re.compile(r"^\..+\.tmp-\d+-\d+$")


def _footer(digest: str) -> bytes:
    return _FOOTER_PREFIX + digest.encode("ascii") + b"\n"


def _save_with_checksum(obj: Any, f) -> None:
    torch.save(obj, f)
    f.flush()
    # hash what reached the file (read back), then append the footer
    h = hashlib.sha256()
    with open(f.name, "rb") as r:
        for block in iter(lambda: r.read(1 << 20), b""):
            h.update(block)
    f.seek(0, os.SEEK_END)
    f.write(_footer(h.hexdigest()))


def atomic_torch_save(obj: Any, path: "str | os.PathLike") -> str:
    """``torch.save(obj, path)``, atomically: ``path`` holds the old or the new file, never a part.

    The file ends with a footer line holding the sha256 of the serialized bytes (checked by
    :func:`load_checkpoint`; ``torch.load`` ignores it).  Returns ``path``.  On any error the
    temporary file is removed and the error re-raised.
    """
    return atomic_write(path, "wb", lambda f: _save_with_checksum(obj, f))


def remove_stale_tmp(directory: "str | os.PathLike") -> List[str]:
    """Delete the temporary files (``.<name>.tmp-<pid>-<n>``) that a write killed mid-way left
    in ``directory``; returns their paths.  Call it only while no other process writes there
    (a run holds its directory's lock, :func:`adarts_kernels.nas.checkpoint.lock_run`)."""
    directory = os.fspath(directory)
    removed = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        if _TMP_RE.match(name):
            p = os.path.join(directory, name)
            try:
                if os.path.isfile(p):
                    os.remove(p)
                    removed.append(p)
            except OSError:
                pass
    return removed


def atomic_write_text(text: str, path: "str | os.PathLike", encoding: str = "utf-8") -> str:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_torch_save`). Returns ``path``."""
    return atomic_write(path, "w", lambda f: f.write(text), encoding=encoding)


def load_checkpoint(path: "str | os.PathLike", map_location: Any = "cpu") -> Any:
    """Load a checkpoint written by :func:`atomic_torch_save` (or ``torch.save``).

    Raises ``FileNotFoundError`` if ``path`` does not exist and :class:`CheckpointError`
    (a ``RuntimeError``) naming ``path`` if it exists but cannot be loaded or its checksum
    footer does not match its contents.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(2, "checkpoint file not found", path)
    if os.path.isdir(path):
        raise CheckpointError(path, f"checkpoint {path!r} is a directory, not a file")
    with open(path, "rb") as f:
        data = f.read()
    tail = data[-_FOOTER_LEN:]
    if len(data) >= _FOOTER_LEN and tail.startswith(_FOOTER_PREFIX) and tail.endswith(b"\n"):
        body = data[:-_FOOTER_LEN]
        stored = tail[len(_FOOTER_PREFIX):-1].decode("ascii", "replace")
        actual = hashlib.sha256(body).hexdigest()
        if actual != stored:
            raise CheckpointError(
                path, f"checkpoint {path!r} is corrupt: its sha256 is {actual}, the file says {stored} "
                      f"(changed on disk after it was written); not loaded")
        data = body
    # no footer: a plain torch.save file (or one cut short, which torch.load then rejects)
    try:
        return torch.load(io.BytesIO(data), map_location=map_location, weights_only=False)
    except Exception as e:  # truncated/corrupt files raise EOFError, RuntimeError, OSError, UnpicklingError...
        raise CheckpointError(
            path,
            f"cannot load checkpoint {path!r}: the file is corrupt or truncated, or was written by "
            f"incompatible code ({type(e).__name__}: {e})",
        ) from e


# --------------------------------------------------------------------------- JSON lines
def _to_jsonable(x: Any) -> Any:
    """Tensors and numpy values to python numbers/lists, recursively; floats stay floats."""
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().tolist()
    if isinstance(x, dict):
        return {str(k): _to_jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_to_jsonable(v) for v in x]
    np = sys.modules.get("numpy")
    if np is not None:
        if isinstance(x, np.ndarray):
            return x.tolist()
        if isinstance(x, np.generic):
            return x.item()
    if hasattr(x, "item") and callable(x.item):  # other scalar-like objects
        try:
            return x.item()
        except Exception:
            pass
    if isinstance(x, os.PathLike):
        return os.fspath(x)
    return str(x)


def _repair_tail(path: str) -> None:
    """Deal with a last line left without its newline by a crash, before appending to ``path``.

    A complete JSON record gets its newline; a torn fragment is cut off, so the next
    record starts on a line of its own.
    """
    try:
        size = os.path.getsize(path)
    except OSError:
        return
    if size == 0:
        return
    with open(path, "rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return
        # find the start of the last line
        pos, chunk = size, 4096
        start = 0
        while pos > 0:
            step = min(chunk, pos)
            pos -= step
            f.seek(pos)
            block = f.read(step)
            i = block.rfind(b"\n")
            if i >= 0:
                start = pos + i + 1
                break
        f.seek(start)
        tail = f.read()
        try:
            json.loads(tail.decode("utf-8"))
            complete = True
        except (UnicodeDecodeError, ValueError):
            complete = False
        if complete:
            f.seek(0, os.SEEK_END)
            f.write(b"\n")
        else:
            f.truncate(start)
        f.flush()
        os.fsync(f.fileno())


class JsonlLogger:
    """Append one JSON object per line to ``path``; every line is flushed as it is written.

    ``append=False`` truncates the file; ``append=True`` keeps what is there (a torn last
    line left by a crash is cut off first).  Tensors and numpy values are converted to
    python numbers/lists.  Usable as a context manager.
    """

    def __init__(self, path: "str | os.PathLike", append: bool = True):
        self.path = os.fspath(path)
        directory = os.path.dirname(self.path)
        if directory:
            os.makedirs(directory, exist_ok=True)
        if append:
            _repair_tail(self.path)
        self._f = open(self.path, "a" if append else "w", encoding="utf-8")

    def log(self, record: Dict[str, Any]) -> None:
        if self._f is None:
            raise ValueError(f"JsonlLogger({self.path!r}) is closed")
        line = json.dumps(_to_jsonable(record))
        self._f.write(line + "\n")
        self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    @property
    def closed(self) -> bool:
        return self._f is None

    def __enter__(self) -> "JsonlLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def read_jsonl(path: "str | os.PathLike") -> List[Dict[str, Any]]:
    """The records of a JSON-lines file; a torn last line (from a crash) is ignored.

    Blank lines are skipped; an unparseable line anywhere else raises ``ValueError``
    naming the file and line number.
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        data = f.read()
    lines = data.split(b"\n")
    records: List[Dict[str, Any]] = []
    last = len(lines) - 1  # lines[last] is b"" when the file ends with a newline
    for n, raw in enumerate(lines):
        if not raw.strip():
            continue
        try:
            records.append(json.loads(raw.decode("utf-8")))
        except (UnicodeDecodeError, ValueError) as e:
            if n == last:  # no newline after it: a partial write
                break
            raise ValueError(f"{path}:{n + 1}: not a JSON line ({e})") from None
    return records


# --------------------------------------------------------------------------- progress bars
def progress(iterable: Optional[Iterable] = None, total: Optional[int] = None, desc: str = "",
             enable: bool = True):
    """A tqdm progress bar over ``iterable`` (on stderr, ``dynamic_ncols``, not left behind).

    Returns ``iterable`` itself when ``enable`` is false or tqdm is not installed.
    """
    if not enable:
        return iterable
    try:
        from tqdm import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, total=total, desc=desc, dynamic_ncols=True, leave=False, file=sys.stderr)


def set_postfix(bar: Any, **kw: Any) -> None:
    """``bar.set_postfix(**kw)`` if ``bar`` is a tqdm bar (tensors shown as numbers); else nothing."""
    tqdm_mod = sys.modules.get("tqdm")
    if tqdm_mod is None or not isinstance(bar, tqdm_mod.tqdm):
        return
    shown = {}
    for k, v in kw.items():
        if isinstance(v, torch.Tensor) and v.numel() == 1:
            v = v.item()
        elif not isinstance(v, (str, int, float)):
            v = _to_jsonable(v)
        shown[k] = v
    bar.set_postfix(shown, refresh=False)
