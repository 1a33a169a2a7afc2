"""The one statistic the throughput benchmarks report: a geometric mean of paired ratios with its 95%
interval (Student's t over the log ratios), so that no benchmark carries a t table of its own."""

from __future__ import annotations

import math
import statistics

# Student's t, two-sided 95%, by degrees of freedom: 1-30 and 59 (split_overhead uses 7; the investigations
# split_interleaved 10 and 65, two_processes 29 and 59). An untabulated df takes the largest tabulated one
# below it, which gives a slightly wider interval than the exact one.
T975 = {
    **dict(enumerate([12.71, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
                      2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
                      2.060, 2.056, 2.052, 2.048, 2.045, 2.042], start=1)),
    59: 2.001,
}  # fmt: skip


def t975(df: int) -> float:
    return T975[max(k for k in T975 if k <= df)]


def geometric_interval(ratios: list[float]) -> tuple[float, float, float]:
    """(geometric mean, low, high) of ``ratios``: at least two."""
    logs = [math.log(r) for r in ratios]
    mean = statistics.mean(logs)
    half = t975(len(logs) - 1) * statistics.stdev(logs) / math.sqrt(len(logs))
    return math.exp(mean), math.exp(mean - half), math.exp(mean + half)


def interval(ratios: list[float], name: str = "geometric_mean") -> dict:
    """``geometric_interval`` as a results entry: ``{name: mean, "interval_95": [low, high]}``."""
    mean, low, high = geometric_interval(ratios)
    return {name: mean, "interval_95": [low, high]}
