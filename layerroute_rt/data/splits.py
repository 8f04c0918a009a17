"""Evaluation splits: held out by trajectory, and length-matched tool_call/planning pairs, so a
comparison by step type is not a comparison by step length in disguise (in the method's reference
eval set, type and length were collinear, r = 0.95)."""
from __future__ import annotations

import bisect
import math
import random
import statistics
from collections.abc import Sequence
from typing import Any

from .examples import Example
from .types import Trajectory


def heldout_split(trajectories: Sequence[Trajectory], fraction: float = 0.1,
                  seed: int = 0) -> tuple[list[Trajectory], list[Trajectory]]:
    """(train, heldout): a seeded random `fraction` of the trajectories (at least one when
    fraction > 0 and there are two or more) is held out whole; both keep the input order."""
    if not 0 <= fraction < 1:
        raise ValueError(f"fraction must lie in [0, 1), got {fraction}")
    ids = [t.id for t in trajectories]
    if len(set(ids)) != len(ids):
        raise ValueError("trajectory ids must be unique to split by trajectory")
    n_held = min(len(ids) - 1, max(1, round(fraction * len(ids)))) if fraction > 0 and len(ids) > 1 else 0
    held = set(random.Random(seed).sample(sorted(ids), n_held))
    return [t for t in trajectories if t.id not in held], [t for t in trajectories if t.id in held]


def within_tolerance(a: int, b: int, rel_tol: float = 0.1, abs_tol: int = 4) -> bool:
    """Whether two step lengths match: within abs_tol tokens or rel_tol of the longer one."""
    return abs(a - b) <= max(abs_tol, rel_tol * max(a, b))


def match_lengths(lengths_a: Sequence[int], lengths_b: Sequence[int], rel_tol: float = 0.1, abs_tol: int = 4,
                  seed: int = 0) -> list[tuple[int, int]]:
    """Pairs (i, j), each index used once, with lengths_a[i] and lengths_b[j] within tolerance:
    the items of a, in seeded random order, each take the nearest unused length of b."""
    pool = sorted((length, j) for j, length in enumerate(lengths_b))
    order = list(range(len(lengths_a)))
    random.Random(seed).shuffle(order)
    pairs = []
    for i in order:
        if not pool:
            break
        k = bisect.bisect_left(pool, (lengths_a[i], -1))
        candidates = [c for c in (k - 1, k) if 0 <= c < len(pool)]
        best = min(candidates, key=lambda c: abs(pool[c][0] - lengths_a[i]))
        if within_tolerance(lengths_a[i], pool[best][0], rel_tol, abs_tol):
            pairs.append((i, pool.pop(best)[1]))
    return pairs


def length_matched_split(examples: Sequence[Example], rel_tol: float = 0.1, abs_tol: int = 4,
                         seed: int = 0) -> list[Example]:
    """tool_call and planning examples paired by step_len (see match_lengths), as a flat list
    [tool_call, planning, tool_call, planning, ...]; other step types and unmatched steps are
    left out."""
    calls = [e for e in examples if e.step_type == "tool_call"]
    plans = [e for e in examples if e.step_type == "planning"]
    pairs = match_lengths([e.step_len for e in calls], [e.step_len for e in plans], rel_tol, abs_tol, seed)
    return [e for i, j in pairs for e in (calls[i], plans[j])]


def length_type_correlation(examples: Sequence[Example]) -> float:
    """Pearson r between step type (1 = tool_call, 0 = planning) and step_len over the examples
    of those two types; nan when it is undefined (one type only, or constant length)."""
    pairs = [(float(e.step_type == "tool_call"), float(e.step_len)) for e in examples
             if e.step_type in ("tool_call", "planning")]
    if len(pairs) < 2:
        return math.nan
    try:
        return statistics.correlation(*zip(*pairs))
    except statistics.StatisticsError:
        return math.nan


def split_stats(examples: Sequence[Example]) -> dict[str, Any]:
    """Per step type: the count and the mean and median step_len; and r_type_length, the
    length/type correlation (length_type_correlation): near 0 on a length-matched split."""
    types = sorted({e.step_type for e in examples})
    lengths = {t: [e.step_len for e in examples if e.step_type == t] for t in types}
    return {"n": {t: len(v) for t, v in lengths.items()},
            "mean_step_len": {t: statistics.fmean(v) for t, v in lengths.items()},
            "median_step_len": {t: statistics.median(v) for t, v in lengths.items()},
            "r_type_length": length_type_correlation(examples)}
