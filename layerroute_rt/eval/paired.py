"""Paired comparison of two settings on the same cases (each case right or wrong in both).

A difference in accuracy between two settings run on the same cases is carried by the
discordant cases only: those right in one setting and wrong in the other. The exact sign test
(McNemar's exact form) asks whether the discordant cases split unevenly; the bootstrap resamples
the cases (pairs kept together) for a confidence interval of the difference in accuracy.
"""
from __future__ import annotations

import math
import random
from collections.abc import Sequence


def sign_test(gains: int, losses: int) -> float:
    """Two-sided exact sign test p-value for `gains` against `losses` discordant pairs
    (binomial(gains + losses, 1/2)); 1.0 with no discordant pair."""
    for name, v in (("gains", gains), ("losses", losses)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"sign_test: {name} must be an integer >= 0, got {v!r}")
    n = gains + losses
    if n == 0:
        return 1.0
    k = min(gains, losses)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2.0 ** n
    return min(1.0, 2.0 * tail)


def bootstrap_diff_ci(a: Sequence[bool], b: Sequence[bool], resamples: int = 10000, seed: int = 0,
                      level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap CI, in points (x100), of mean(a) - mean(b) over paired cases."""
    if len(a) != len(b) or not a:
        raise ValueError(f"bootstrap_diff_ci: a and b must be paired and non-empty, got {len(a)} and {len(b)}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"bootstrap_diff_ci: level must be in (0, 1), got {level!r}")
    d = [int(x) - int(y) for x, y in zip(a, b)]
    n = len(d)
    rng = random.Random(seed)
    stats = sorted(sum(d[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    lo = stats[int(math.floor((1.0 - level) / 2 * (resamples - 1)))]
    hi = stats[int(math.ceil((1.0 + level) / 2 * (resamples - 1)))]
    return 100.0 * lo, 100.0 * hi


def compare(a: Sequence[bool], b: Sequence[bool], resamples: int = 10000, seed: int = 0) -> dict:
    """Setting a against setting b on the same cases: accuracies, the difference in points,
    discordant counts (gains: right in a only; losses: right in b only), the sign test's p and
    the bootstrap 95% CI of the difference."""
    if len(a) != len(b) or not a:
        raise ValueError(f"compare: a and b must be paired and non-empty, got {len(a)} and {len(b)}")
    gains = sum(1 for x, y in zip(a, b) if x and not y)
    losses = sum(1 for x, y in zip(a, b) if y and not x)
    lo, hi = bootstrap_diff_ci(a, b, resamples, seed)
    n = len(a)
    return {"n": n, "a_correct": sum(map(bool, a)), "b_correct": sum(map(bool, b)),
            "diff_points": 100.0 * (gains - losses) / n, "gains": gains, "losses": losses,
            "sign_test_p": sign_test(gains, losses), "ci95_points": [lo, hi]}
