"""Run directories, checkpoints and resume for the search and retrain loops.

The checkpoint written after every epoch holds the model, the optimizers, the scheduler,
the global RNG states and the log so far (and, for a search, the log's header record), so
a resumed run continues exactly where the interrupted one stopped; ``log.jsonl`` is
rewritten from the checkpoint on resume, so it always matches it.

The run directory is made by :func:`make_run_dir`: a path that cannot be a directory (a
file on the way, a name too long, a file system that refuses) is reported as
:class:`RunDirError`, one sentence naming the path and the reason, before any data is
loaded or any model built.

One run per directory: :func:`lock_run` takes an exclusive ``flock`` on ``<out>/run.lock``
for the whole run (the file names the holder: pid, host, start time); a second run into the
same directory stops with a message naming it.  A checkpoint is checked before it is used
(:func:`validate`): its kind, epoch, history and state entries, each problem reported with
the file's path.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import socket
import sys
import time
from typing import Iterable, Iterator, List, Optional, Tuple

import torch

from ..utils.io import CheckpointError, JsonlLogger, load_checkpoint, remove_stale_tmp

CHECKPOINT = "checkpoint.pt"
LOG = "log.jsonl"
LOCK = "run.lock"


class RunLockedError(RuntimeError):
    """Another process holds the run directory's lock."""


class RunDirError(ValueError):
    """The run directory cannot be created or written; the message names the path and why.

    A ``ValueError``: the ``--out`` given is unusable, as a bad setting is."""


def _short(name: str, keep: int = 24) -> str:
    return name if len(name) <= keep else f"{name[:keep]}..."


def _blocking_file(path: str) -> Optional[str]:
    """The first existing prefix of ``path`` (the path itself included, written as the user
    wrote it) that is not a directory, or ``None``: what stops ``os.makedirs`` with
    ``ENOTDIR`` / ``EEXIST``."""
    parts = os.path.normpath(path).split(os.sep)
    for i in range(1, len(parts) + 1):
        prefix = os.sep.join(parts[:i])
        if not prefix:          # the root of an absolute path
            continue
        if not os.path.lexists(prefix):
            return None
        if not os.path.isdir(prefix):
            return prefix
    return None


def _name_limit(path: str) -> int:
    """The longest file name the file system under ``path`` allows (255 almost everywhere)."""
    existing = os.path.abspath(path)
    while not os.path.isdir(existing):
        existing = os.path.dirname(existing)
    try:
        return int(os.pathconf(existing, "PC_NAME_MAX"))
    except (OSError, ValueError, AttributeError):
        return 255


def _why(out: str, e: OSError) -> str:
    """The reason ``e`` (raised while making or writing into ``out``) in words."""
    if e.errno == errno.ENAMETOOLONG:
        limit = _name_limit(out)
        long = [c for c in out.split(os.sep) if len(os.fsencode(c)) > limit]
        if long:
            return (f"the name {_short(long[0])!r} is {len(os.fsencode(long[0]))} bytes long, more than the "
                    f"{limit} the file system allows")
        return f"the path is {len(os.fsencode(out))} bytes long, more than this system allows"
    if e.errno in (errno.ENOTDIR, errno.EEXIST):
        blocker = _blocking_file(out)
        if blocker is not None:
            what = "a file" if os.path.isfile(blocker) else "something else (a broken link, a device...)"
            return f"{blocker} is {what}, not a directory"
    reason = (e.strerror or str(e)).lower()
    if e.errno == errno.ENOENT:       # makedirs made the parents, yet "no such file": /proc and the like
        reason += " (this file system does not allow new directories there)"
    where = os.fsdecode(e.filename) if e.filename is not None else out
    return reason if os.path.normpath(where) == os.path.normpath(out) else f"{where}: {reason}"


def make_run_dir(out: str) -> str:
    """Create the run directory ``out`` (and its parents) if missing; returns ``out``.

    Raises :class:`RunDirError` ``cannot create the run directory <out>: <reason>`` when
    ``out`` cannot be a directory: a file on the way (``f.txt/run``) or at ``out`` itself, a
    name longer than the file system allows, no permission, a read-only or virtual file
    system (``/proc``, ``/sys``)."""
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise RunDirError(f"cannot create the run directory {out}: {_why(out, e)}") from None
    return out


@contextlib.contextmanager
def lock_run(out: str) -> Iterator[str]:
    """Hold an exclusive lock on the run directory ``out`` (created if missing) while the
    ``with`` body runs; the lock file ``<out>/run.lock`` records the holder (pid, host, start
    time).  Raises :class:`RunLockedError` naming the holder when another process has it.
    Temporary files left in ``out`` by a killed write are removed once the lock is held.
    An unusable ``out`` raises :class:`RunDirError` (see :func:`make_run_dir`), as does a
    directory this process cannot create the lock file in."""
    make_run_dir(out)
    path = os.path.join(out, LOCK)
    try:
        import fcntl
    except ImportError:      # no flock (Windows): run unlocked, say so
        print(f"[run] no file locking on this platform: nothing stops a second run into {out}", file=sys.stderr)
        yield path
        return
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:   # an existing directory without write permission, a read-only file system
        raise RunDirError(f"cannot write in the run directory {out}: {_why(out, e)}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            try:
                holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
                info = json.loads(holder)
                who = f"pid {info.get('pid')} on {info.get('host')}, started {info.get('started')}"
            except (OSError, ValueError, AttributeError):
                who = "another process (no holder recorded)"
            raise RunLockedError(f"{out} is in use by another run ({who}); wait for it to finish or choose "
                                 f"another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                  "started": time.strftime("%Y-%m-%d %H:%M:%S %z")}).encode() + b"\n", 0)
        for p in remove_stale_tmp(out):
            print(f"[run] removed {p}, left by an interrupted write", file=sys.stderr)
        yield path
    finally:
        os.close(fd)    # releases the lock; the file stays (its content is the last holder)


def rng_state() -> dict:
    """The global RNG states (CPU, and every CUDA device torch sees)."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def prepare_out(out: str, resume: bool) -> Optional[dict]:
    """Create ``out``; return the checkpoint to resume from, if any. Refuses to overwrite."""
    make_run_dir(out)
    path = os.path.join(out, CHECKPOINT)
    if os.path.exists(path):
        if not resume:
            raise FileExistsError(f"{out} already holds a run ({path}); pass --resume to continue it "
                                  f"or choose another --out")
        return load_checkpoint(path)   # validated by restore(), which knows the run
    if resume:
        print(f"[resume] no checkpoint at {path}: starting from scratch", file=sys.stderr)
    return None


def check_same_run(saved: dict, now: dict, keys: Iterable[str]) -> None:
    """Refuse to resume when a setting in ``keys`` differs between the checkpoint's config
    ``saved`` and the present one ``now``; the message names each difference."""
    diff = {k: (saved.get(k), now.get(k)) for k in keys if saved.get(k) != now.get(k)}
    if diff:
        detail = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items())
        raise ValueError(f"cannot resume: the checkpoint was made with other settings ({detail})")


#: config keys a resumed run may change: where things are read and written, and the display
#: (``dist_timeout`` and ``check_every`` guard a data-parallel run without changing its numbers; the
#: ImageNet loader's ``workers`` change nothing in the batches, and ``skip_bad_images`` may be turned
#: on to resume a run a corrupt file stopped)
DIFFERENT_OK = frozenset({"out", "resume", "progress", "device", "data", "download", "dist_timeout",
                          "check_every", "workers", "skip_bad_images"})


def resume_keys(cfg, ignore: Iterable[str] = ()) -> List[str]:
    """Every config key of ``cfg`` that a resumed run must keep: all but :data:`DIFFERENT_OK`
    and ``ignore``."""
    skip = DIFFERENT_OK | set(ignore)
    return [f.name for f in dataclasses.fields(cfg) if f.name not in skip]


def validate(ckpt, kind: str, cfg, objects: Iterable[str], path: str) -> None:
    """Refuse a checkpoint ``ckpt`` (loaded from ``path``) that a ``kind`` run with config
    ``cfg`` cannot continue from: not a dict, another kind, an epoch outside the run, a
    history that does not match it, missing state entries. Raises :class:`CheckpointError`
    naming ``path``."""
    def bad(why: str):
        return CheckpointError(path, f"cannot resume from {path}: {why}")
    if not isinstance(ckpt, dict):
        raise bad(f"it holds a {type(ckpt).__name__}, not a checkpoint dict")
    missing = [k for k in ("kind", "epoch", "config", "rng", "history", *objects) if k not in ckpt]
    if missing:
        raise bad(f"entries missing: {', '.join(missing)}")
    if ckpt["kind"] != kind:
        raise bad(f"it is a {ckpt['kind']!r} checkpoint, this is a {kind} run")
    epoch = ckpt["epoch"]
    if not isinstance(epoch, int) or isinstance(epoch, bool) or not 0 <= epoch < cfg.epochs:
        raise bad(f"epoch {epoch!r} is outside this run's {cfg.epochs} epochs (0-based, "
                  f"0..{cfg.epochs - 1})")
    if not isinstance(ckpt["config"], dict):
        raise bad("its config is not a dict")
    hist = ckpt["history"]
    if not isinstance(hist, list) or len(hist) != epoch + 1 or not all(isinstance(r, dict) for r in hist):
        raise bad(f"its history should be a list of {epoch + 1} epoch records, got "
                  f"{len(hist) if isinstance(hist, list) else type(hist).__name__}")
    if not isinstance(ckpt["rng"], dict) or "torch" not in ckpt["rng"]:
        raise bad("its RNG state is missing or malformed")


class _NoLog:
    """The log of a rank that writes nothing (data parallelism: rank 0 writes)."""

    def log(self, record: dict) -> None:
        pass


def restore(ckpt: Optional[dict], cfg, run_keys, objects: dict,
            header: Optional[dict] = None, write: bool = True) -> Tuple[List[dict], int, JsonlLogger, Optional[dict]]:
    """Load ``objects`` (name -> thing with ``load_state_dict``) and the RNG state from
    ``ckpt``; return the epoch records so far, the first epoch to run, the log file rewritten
    to match the checkpoint exactly, and the header record.

    ``header`` (a dict, or ``None`` for no header) is the log's first record for a fresh
    run; a resumed run keeps the header its checkpoint holds (the run's start), or writes
    ``header`` when the checkpoint has none.

    ``write=False`` (every data-parallel rank but rank 0): the same state is loaded, but the
    log file is neither rewritten nor written (the logger returned ignores records)."""
    history: List[dict] = []
    start_epoch = 0
    if ckpt is not None:
        path = os.path.join(cfg.out, CHECKPOINT)
        check_same_run(ckpt["config"], dataclasses.asdict(cfg), run_keys)
        for key, obj in objects.items():
            try:
                obj.load_state_dict(ckpt[key])
            except (KeyError, ValueError, RuntimeError, TypeError, IndexError) as e:
                raise CheckpointError(path, f"cannot resume from {path}: its {key!r} state does not fit "
                                            f"this run ({type(e).__name__}: {e})") from e
        history = ckpt["history"]
        start_epoch = ckpt["epoch"] + 1
        set_rng_state(ckpt["rng"])
        if header is not None and ckpt.get("header") is not None:
            header = ckpt["header"]
        if write:
            print(f"[resume] {cfg.out}: {start_epoch} of {cfg.epochs} epochs done, continuing", file=sys.stderr)
    if not write:
        return history, start_epoch, _NoLog(), header
    logger = JsonlLogger(os.path.join(cfg.out, LOG), append=False)
    if header is not None:
        logger.log(header)
    for rec in history:
        logger.log(rec)
    return history, start_epoch, logger, header


def payload(kind: str, epoch: int, cfg, history: List[dict], genotype: dict, **state) -> dict:
    """The checkpoint of ``kind`` (``"search"`` / ``"retrain"``) after ``epoch`` (0-based):
    the config as a dict, ``state`` (state dicts and the like, by name), the global RNG
    states, the log so far and the genotype."""
    return {"kind": kind, "epoch": epoch, "config": dataclasses.asdict(cfg), **state, "rng": rng_state(),
            "history": history, "genotype": genotype}


def epoch_records(records: List[dict]) -> List[dict]:
    """The per-epoch records of a ``log.jsonl`` (as read by
    :func:`~adarts_kernels.utils.io.read_jsonl`): every record but the header."""
    return [r for r in records if r.get("kind") != "header"]
