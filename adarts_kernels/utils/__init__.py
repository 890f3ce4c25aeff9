"""Utilities: crash-safe checkpoint/text/log output and progress bars."""
from .io import (
    CheckpointError,
    JsonlLogger,
    atomic_torch_save,
    atomic_write_text,
    load_checkpoint,
    progress,
    read_jsonl,
    remove_stale_tmp,
    set_postfix,
)

__all__ = [
    "CheckpointError",
    "JsonlLogger",
    "atomic_torch_save",
    "atomic_write_text",
    "load_checkpoint",
    "progress",
    "read_jsonl",
    "remove_stale_tmp",
    "set_postfix",
]
