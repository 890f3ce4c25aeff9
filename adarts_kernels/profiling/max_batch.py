"""The largest batch that fits: a probe with real steps that recovers from out-of-memory."""
from __future__ import annotations

import gc
from typing import Callable, List, Tuple

import torch


def is_oom(exc: BaseException) -> bool:
    """True for an out-of-memory error of any device (CUDA's own class or a message saying so)."""
    oom_cls = getattr(torch.cuda, "OutOfMemoryError", None)
    if oom_cls is not None and isinstance(exc, oom_cls):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def _release() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def find_max_batch(try_batch: Callable[[int], None], start: int = 16, limit: int = 16384,
                   granularity: int = 8) -> Tuple[int, List[Tuple[int, bool]]]:
    """Largest batch ``b <= limit`` (a multiple of ``granularity``) for which ``try_batch(b)``
    runs without running out of memory.

    ``try_batch(b)`` should do what the real job does at batch ``b`` (forward, backward and
    optimizer steps) and return normally; an out-of-memory error (:func:`is_oom`) means
    "does not fit", any other error propagates. Doubling from ``start``, then bisection.
    Returns ``(best, tried)`` with ``tried`` the ``(batch, fitted)`` pairs in order; raises
    ``RuntimeError`` when even ``start`` does not fit.
    """
    if start < 1 or limit < start or granularity < 1:
        raise ValueError(f"find_max_batch: need 1 <= start <= limit and granularity >= 1, "
                         f"got start={start}, limit={limit}, granularity={granularity}")
    tried: List[Tuple[int, bool]] = []

    def fits(b: int) -> bool:
        try:
            try_batch(b)
            ok = True
        except Exception as e:     # noqa: BLE001 - only out-of-memory is an answer
            if not is_oom(e):
                raise
            ok = False
        _release()
        tried.append((b, ok))
        return ok

    if not fits(start):
        raise RuntimeError(f"find_max_batch: even batch {start} does not fit in memory")
    good, bad = start, None
    while bad is None and good < limit:
        b = min(good * 2, limit)
        if fits(b):
            good = b
        else:
            bad = b
    if bad is None:
        return good, tried
    while bad - good > granularity:
        mid = (good + bad) // 2
        mid -= mid % granularity
        if mid <= good:
            break
        if fits(mid):
            good = mid
        else:
            bad = mid
    return good, tried


def safe_batch(max_fit: int, margin: float = 0.9, granularity: int = 8) -> int:
    """``max_fit`` times ``margin``, rounded down to ``granularity`` (at least 1): headroom
    for fragmentation and for evaluation batches."""
    b = int(max_fit * margin)
    b -= b % granularity
    return max(b, min(max_fit, granularity), 1)
