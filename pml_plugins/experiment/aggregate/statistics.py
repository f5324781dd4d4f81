"""Statistics over seeds: mean ± t confidence interval, the paired comparison of every
method with the best one, and each method's rank per seed.

The seeds pair the methods: seed ``s`` starts every loss from the same initialised network
(the untrained row), so a method's value under seed ``s`` is compared with the best
method's value under the same seed (a paired design).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import astuple, dataclass
from typing import Any

import numpy as np

#: columns of ``summary.csv``: one row per data set, loss, size, split, stage and metric
SUMMARY_COLUMNS = (
    "dataset",
    "loss",
    "embedding_size",
    "split",
    "stage",
    "metric",
    "n",
    "mean",
    "ci95",
    "std",
)
#: columns of ``comparisons.csv``: each trained method against the best one (the group's
#: key, then the fields of :class:`Comparison`)
COMPARISON_COLUMNS = (
    "dataset",
    "split",
    "embedding_size",
    "metric",
    "loss",
    "best",
    "n_pairs",
    "mean_difference",
    "t",
    "p",
    "marked",
)
#: the loss label of the network before training (a baseline row, never ranked)
UNTRAINED = "untrained network"
#: confidence level of the intervals
CONFIDENCE = 0.95
#: level of the paired t-test against the best method (two-sided)
ALPHA = 0.05
#: the metric the ranks are taken on, where the runs have it (else Recall@1)
RANK_METRICS = ("mean_average_precision_at_r", "recall_at_1")

#: key of a group of runs: (dataset, split, embedding size, metric)
Group = tuple[str, str, int, str]


def mean_ci(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """Mean, half-width of the t confidence interval and sample std (nan for n < 2)."""
    from scipy import stats

    x = np.asarray(values, dtype=float)
    n = len(x)
    if n == 0:
        return math.nan, math.nan, math.nan
    mean = float(x.mean())
    if n < 2:
        return mean, math.nan, math.nan
    std = float(x.std(ddof=1))
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1) * std / math.sqrt(n))
    return mean, half, std


def summarise(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Mean ± CI over seeds per (dataset, loss, size, split, stage, metric).

    The untrained stage is also summarised as the loss ``UNTRAINED``: per seed the mean
    over that seed's runs (one initialisation), then over seeds.
    """
    groups: dict[tuple, list[float]] = defaultdict(list)
    untrained: dict[tuple, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        key = (r["dataset"], r["loss"], r["embedding_size"], r["split"], r["stage"], r["metric"])
        groups[key].append(r["value"])
        if r["stage"] == "untrained":
            untrained[(key[0], UNTRAINED, *key[2:])][r["seed"]].append(r["value"])
    for ukey, by_seed in untrained.items():
        groups[ukey] = [float(np.mean(v)) for _, v in sorted(by_seed.items())]
    return [
        dict(zip(SUMMARY_COLUMNS, (*key, len(values), *mean_ci(values)), strict=True))
        for key, values in sorted(groups.items(), key=lambda kv: tuple(map(str, kv[0])))
    ]


def seed_values(rows: Iterable[Mapping[str, Any]]) -> dict[Group, dict[str, dict[int, float]]]:
    """The trained values per group, loss and seed: ``{group: {loss: {seed: value}}}``."""
    out: dict[Group, dict[str, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    for r in rows:
        if r["stage"] != "trained" or math.isnan(r["value"]):
            continue
        group = (r["dataset"], r["split"], r["embedding_size"], r["metric"])
        out[group][r["loss"]][r["seed"]] = float(r["value"])
    return {g: {loss: dict(v) for loss, v in by_loss.items()} for g, by_loss in out.items()}


def paired_t_test(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """Two-sided paired t-test of ``a`` against ``b`` (pairs in the same order): (t, p).

    The statistic and p-value of :func:`scipy.stats.ttest_rel`, except where the
    differences do not vary: identical pairs give (0, 1) (nothing tells them apart), a
    constant non-zero difference gives (±inf, 0). Fewer than two pairs: (nan, nan).
    """
    from scipy import stats

    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    n = len(d)
    if n < 2:
        return math.nan, math.nan
    mean = float(d.mean())
    sd = float(d.std(ddof=1))
    # float noise of values that are equal in the runs' files is far below 1e-12
    if sd <= 1e-12:
        if abs(mean) <= 1e-12:
            return 0.0, 1.0
        return math.copysign(math.inf, mean), 0.0
    t = mean / (sd / math.sqrt(n))
    return t, float(2 * stats.t.sf(abs(t), n - 1))


@dataclass(frozen=True)
class Comparison:
    """One trained method of a group against the group's best method (highest mean).

    ``n`` pairs (the seeds both ran), ``mean_difference`` = best - this method over those
    seeds (a fraction), ``t`` and ``p`` of the paired t-test (nan for the best itself and
    for fewer than two pairs). ``marked``: the best, or not significantly below it at
    level ``ALPHA`` (two-sided test; a method significantly *above* the best on their
    common seeds, possible where they ran different seeds, stays marked), or a mean equal
    to the best's; with fewer than two pairs, only a mean equal to the best's.
    """

    loss: str
    best: str
    n: int
    mean_difference: float
    t: float
    p: float
    marked: bool


def compare_with_best(
    values: Mapping[str, Mapping[int, float]], alpha: float = ALPHA
) -> dict[str, Comparison]:
    """Each method of one group (``{loss: {seed: value}}``) against the best one."""
    means = {loss: float(np.mean(list(v.values()))) for loss, v in values.items() if v}
    if not means:
        return {}
    top = max(means.values())
    best = min(loss for loss, m in means.items() if m == top)
    out = {}
    for loss in sorted(means):
        seeds = sorted(set(values[loss]) & set(values[best]))
        a = [values[best][s] for s in seeds]
        b = [values[loss][s] for s in seeds]
        diff = float(np.mean(a) - np.mean(b)) if seeds else math.nan
        if loss == best:
            out[loss] = Comparison(loss, best, len(seeds), 0.0, math.nan, math.nan, True)
            continue
        t, p = paired_t_test(a, b)
        # not marked: significantly below the best on the seeds both ran (a method above
        # it there, possible where the two ran different seeds, is not below it)
        below = len(seeds) >= 2 and p < alpha and diff > 0
        ties = abs(means[loss] - top) <= 1e-12  # a mean equal to the best's: a tie
        marked = ties or (len(seeds) >= 2 and not below)
        out[loss] = Comparison(loss, best, len(seeds), diff, t, p, marked)
    return out


def compare_all(
    rows: Iterable[Mapping[str, Any]], alpha: float = ALPHA
) -> dict[Group, dict[str, Comparison]]:
    """:func:`compare_with_best` for every group of the trained runs."""
    return {g: compare_with_best(v, alpha) for g, v in seed_values(rows).items()}


def comparison_rows(comparisons: Mapping[Group, Mapping[str, Comparison]]) -> list[dict]:
    """The rows of ``comparisons.csv`` (:data:`COMPARISON_COLUMNS`)."""
    return [
        dict(zip(COMPARISON_COLUMNS, (*group, *astuple(c)), strict=True))
        for group, by_loss in sorted(comparisons.items(), key=lambda kv: tuple(map(str, kv[0])))
        for c in by_loss.values()
    ]


@dataclass(frozen=True)
class Rank:
    """A method's rank in each seed (1 = best of ``of`` methods, ties share the mean rank)."""

    ranks: tuple[float, ...]
    of: int

    @property
    def n(self) -> int:
        return len(self.ranks)

    @property
    def mean(self) -> float:
        return float(np.mean(self.ranks)) if self.ranks else math.nan

    @property
    def low(self) -> float:
        return min(self.ranks) if self.ranks else math.nan

    @property
    def high(self) -> float:
        return max(self.ranks) if self.ranks else math.nan


def seed_ranks(values: Mapping[str, Mapping[int, float]]) -> dict[str, Rank]:
    """Per seed, the rank of each method among the methods run with that seed (highest
    value = 1, equal values share the mean of their ranks); per method its ranks."""
    from scipy import stats

    seeds = sorted({s for v in values.values() for s in v})
    ranks: dict[str, list[float]] = {loss: [] for loss in values}
    of = 0
    for seed in seeds:
        present = [loss for loss in sorted(values) if seed in values[loss]]
        r = stats.rankdata([-values[loss][seed] for loss in present], method="average")
        for loss, rank in zip(present, r, strict=True):
            ranks[loss].append(float(rank))
        of = max(of, len(present))
    return {loss: Rank(tuple(r), of) for loss, r in ranks.items()}


def rank_metric(metrics: Iterable[str]) -> str | None:
    """The metric the ranks are taken on: the first of :data:`RANK_METRICS` present."""
    metrics = set(metrics)
    return next((m for m in RANK_METRICS if m in metrics), None)
