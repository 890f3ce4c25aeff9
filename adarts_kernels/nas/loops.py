"""Backward compatibility only: the search and retrain loops now live in three modules.

- :mod:`.search_loop`: :func:`run_search`, :func:`search_step`, :func:`auto_batch`,
  :func:`step_pair_trial`, :func:`search_header`, :func:`arch_summary`;
- :mod:`.retrain_loop`: :func:`run_retrain`;
- :mod:`.loop_common`: what both share (:class:`NonFiniteError`, :class:`FiniteGuard`,
  :func:`evaluate`, :class:`Meter`, the data / batch checks, the launch and resume helpers).

This module re-exports every name it used to define (public and private), so
``from adarts_kernels.nas.loops import run_search`` and ``loops.search_step`` keep working.
New code imports from the modules above. Replacing a name here (``monkeypatch.setattr(loops,
...)``) no longer changes what the loops run: replace it in the module that looks it up
(e.g. ``search_loop.search_step``, ``loop_common._load``, ``retrain_loop.EvalNetwork``).
"""
from __future__ import annotations

from .eval_model import EvalNetwork
from .loop_common import (_NO_STEP, MIN_SHARD, READ_EVERY, EpochHook, FiniteGuard, Meter, NonFiniteError, _check_batch,
                          _check_sizes, _check_trainable, _finish_epoch, _launch, _load, _load_agreed,
                          _local_selection, _loss_scale, _min_batch, _periodic_read, _plot, _read, _resume_point, _say,
                          check_finite_parameters, evaluate)
from .retrain_loop import _run_retrain, _seed_epoch, run_retrain
from .search_loop import (AUTO_BATCH, AUTO_BATCH_MARGIN, BatchTrial, _is_cuda, _run_search, _search_model,
                          arch_summary, auto_batch, run_search, search_header, search_step, step_pair_trial)

__all__ = [
    # search_loop
    "AUTO_BATCH", "AUTO_BATCH_MARGIN", "BatchTrial", "arch_summary", "auto_batch", "run_search", "search_header",
    "search_step", "step_pair_trial", "_is_cuda", "_run_search", "_search_model",
    # retrain_loop
    "run_retrain", "_run_retrain", "_seed_epoch", "EvalNetwork",
    # loop_common
    "EpochHook", "MIN_SHARD", "READ_EVERY", "FiniteGuard", "Meter", "NonFiniteError", "check_finite_parameters",
    "evaluate", "_NO_STEP", "_check_batch", "_check_sizes", "_check_trainable", "_finish_epoch", "_launch", "_load",
    "_load_agreed", "_local_selection", "_loss_scale", "_min_batch", "_periodic_read", "_plot", "_read",
    "_resume_point", "_say",
]
