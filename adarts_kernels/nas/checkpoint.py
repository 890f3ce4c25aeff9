"""Run directories, checkpoints and resume for the search and retrain loops.

The checkpoint written after every epoch holds the model, the optimizers, the scheduler,
the global RNG states and the log so far (and, for a search, the log's header record), so
a resumed run continues exactly where the interrupted one stopped; ``log.jsonl`` is
rewritten from the checkpoint on resume, so it always matches it.
"""
from __future__ import annotations

import dataclasses
import os
import sys
from typing import Iterable, List, Optional, Tuple

import torch

from ..utils.io import JsonlLogger, load_checkpoint

CHECKPOINT = "checkpoint.pt"
LOG = "log.jsonl"


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
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, CHECKPOINT)
    if os.path.exists(path):
        if not resume:
            raise FileExistsError(f"{out} already holds a run ({path}); pass --resume to continue it "
                                  f"or choose another --out")
        return load_checkpoint(path)
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


def restore(ckpt: Optional[dict], cfg, run_keys, objects: dict,
            header: Optional[dict] = None) -> Tuple[List[dict], int, JsonlLogger, Optional[dict]]:
    """Load ``objects`` (name -> thing with ``load_state_dict``) and the RNG state from
    ``ckpt``; return the epoch records so far, the first epoch to run, the log file rewritten
    to match the checkpoint exactly, and the header record.

    ``header`` (a dict, or ``None`` for no header) is the log's first record for a fresh
    run; a resumed run keeps the header its checkpoint holds (the run's start), or writes
    ``header`` when the checkpoint has none."""
    history: List[dict] = []
    start_epoch = 0
    if ckpt is not None:
        check_same_run(ckpt["config"], dataclasses.asdict(cfg), run_keys)
        for key, obj in objects.items():
            obj.load_state_dict(ckpt[key])
        history = ckpt["history"]
        start_epoch = ckpt["epoch"] + 1
        set_rng_state(ckpt["rng"])
        if header is not None and ckpt.get("header") is not None:
            header = ckpt["header"]
        print(f"[resume] {cfg.out}: continuing after epoch {start_epoch}/{cfg.epochs}", file=sys.stderr)
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
