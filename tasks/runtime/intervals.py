"""95% intervals for evaluation metrics, and whether one model is worse than another beyond noise.

Pure functions, no torch. A metric `m` travels with its sample size `m_n` and, when it is a mean
rather than a rate (ROUGE-L, validation loss, a benchmark's accuracy as lm-eval reports it), its
standard error `m_stderr`. Rates get Wilson score intervals, which stay inside [0, 1] and do not
collapse to a point at 0/12 or 12/12; means get mean ± 1.96 standard errors.

The difference of two rates uses Newcombe's hybrid score interval, built from the two Wilson
intervals; the difference of two means, the normal one. A candidate is *worse beyond noise* on a
metric when even the favourable end of that difference interval is worse than `-margin`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

Z95 = 1.959964
# what follows a metric's name in the metrics dict: its sample size, standard error and interval
SUFFIXES = ("_n", "_stderr", "_low", "_high")
LOWER_IS_BETTER = ("identity_leak", "val_loss", "perplexity")


class Estimate(NamedTuple):
    value: float
    n: int
    low: float
    high: float
    stderr: float | None  # None: a rate, whose interval is Wilson's


def wilson(rate: float, n: int, z: float = Z95) -> tuple[float, float]:
    if n <= 0:
        return 0.0, 1.0
    centre = (rate + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(rate * (1 - rate) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def higher_is_better(metric: str) -> bool:
    return not metric.endswith(LOWER_IS_BETTER)


def is_headline(key: str) -> bool:
    """A metric itself, not one of the numbers that qualify it."""
    return not key.endswith(SUFFIXES)


def estimate(metrics: dict[str, float], name: str) -> Estimate | None:
    """The value of `name` with its interval; None when its sample size was not recorded (a
    version evaluated before intervals existed), which the gate then compares as a point."""
    if name not in metrics or f"{name}_n" not in metrics:
        return None
    value, n = float(metrics[name]), int(metrics[f"{name}_n"])
    stderr = metrics.get(f"{name}_stderr")
    if stderr is None:
        low, high = wilson(value, n)
        return Estimate(value, n, low, high, None)
    stderr = float(stderr)
    return Estimate(value, n, value - Z95 * stderr, value + Z95 * stderr, stderr)


def with_intervals(metrics: dict[str, float]) -> dict[str, float]:
    """The metrics plus `_low` and `_high` for each one that has a sample size."""
    out = dict(metrics)
    for name in [k for k in metrics if is_headline(k)]:
        found = estimate(metrics, name)
        if found is not None:
            out[f"{name}_low"], out[f"{name}_high"] = found.low, found.high
    return out


def difference(new: Estimate, old: Estimate) -> tuple[float, float, float]:
    """`new - old` with its 95% interval."""
    d = new.value - old.value
    if new.stderr is None and old.stderr is None:  # Newcombe: two Wilson intervals
        below = math.sqrt((new.value - new.low) ** 2 + (old.high - old.value) ** 2)
        above = math.sqrt((new.high - new.value) ** 2 + (old.value - old.low) ** 2)
        return d, d - below, d + above
    half = Z95 * math.hypot(_stderr(new), _stderr(old))
    return d, d - half, d + half


def _stderr(found: Estimate) -> float:
    return found.stderr if found.stderr is not None else (found.high - found.low) / (2 * Z95)


def shown(found: Estimate) -> str:
    return f"{found.value:.3f} [{found.low:.3f}, {found.high:.3f}] (n={found.n})"


def interval_text(metrics: dict[str, float], name: str) -> str:
    """`[low, high] n=12` for tables, or "" when the sample size is not known."""
    found = estimate(metrics, name)
    return f"[{found.low:.3f}, {found.high:.3f}] n={found.n}" if found else ""


class Comparison(NamedTuple):
    worse: bool  # beyond noise and margin
    reason: str


def compare(metric: str, new: dict[str, float], old: dict[str, float], margin: float) -> Comparison:
    """Whether `new` is worse than `old` on `metric` beyond noise, and the sentence that says so."""
    better_sign = 1 if higher_is_better(metric) else -1
    a, b = estimate(new, metric), estimate(old, metric)
    if a is None or b is None:  # no sample size on one side: points, as promotion compared before
        gain = better_sign * (float(new[metric]) - float(old[metric]))
        verdict = "as good or better" if gain >= -margin else "worse"
        return Comparison(gain < -margin, f"{metric} {new[metric]:.3f} vs {old[metric]:.3f} (no interval): {verdict}")
    d, low, high = difference(a, b)
    best_case = high if better_sign > 0 else -low  # the most favourable reading of the change
    worst_case = low if better_sign > 0 else -high
    if best_case < -margin:
        verdict = "worse beyond noise" + (f" and the margin {margin:g}" if margin else "")
    elif best_case < 0:
        verdict = f"worse beyond noise, within the margin {margin:g}"
    elif worst_case > 0:
        verdict = "better beyond noise"
    else:
        verdict = "within noise"
    reason = f"{metric} {shown(a)} vs {shown(b)}: difference {d:+.3f} [{low:+.3f}, {high:+.3f}], {verdict}"
    return Comparison(best_case < -margin, reason)
