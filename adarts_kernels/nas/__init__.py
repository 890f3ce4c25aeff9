"""The ADARTS / PC-DARTS / DARTS search space, networks, architect and training loops.

``config`` (presets, :class:`SearchConfig`, :class:`RetrainConfig`), ``checkpoint`` (run
directories, checkpoints, resume), ``search_loop`` (:func:`run_search`, :func:`search_step`,
:func:`auto_batch`), ``retrain_loop`` (:func:`run_retrain`) and ``loop_common`` (what both
loops share: :func:`evaluate`, :class:`NonFiniteError`, ...); ``loops`` re-exports them for
backward compatibility.
"""
from . import genotypes
from .architect import Architect
from .checkpoint import RunDirError, RunLockedError, epoch_records, lock_run, make_run_dir
from .config import RETRAIN_PRESETS, SEARCH_PRESETS, RetrainConfig, SearchConfig, resolve_device
from .eval_model import EvalNetwork, NetworkImageNet, count_parameters
from .genotypes import PRIMITIVES, Genotype
from .loop_common import NonFiniteError, evaluate
from .retrain_loop import run_retrain
from .search_loop import auto_batch, run_search, search_step, step_pair_trial
from .search_model import SearchNetwork, normalized_betas

__all__ = ["genotypes", "Architect", "EvalNetwork", "NetworkImageNet", "count_parameters", "PRIMITIVES", "Genotype",
           "SearchNetwork", "normalized_betas", "SEARCH_PRESETS", "RETRAIN_PRESETS", "SearchConfig",
           "RetrainConfig", "resolve_device", "run_search", "run_retrain", "search_step", "auto_batch",
           "step_pair_trial", "evaluate", "epoch_records", "NonFiniteError", "RunLockedError", "lock_run",
           "RunDirError", "make_run_dir"]
