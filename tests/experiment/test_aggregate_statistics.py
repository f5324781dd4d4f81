"""Honest ranking: the paired t-test against the best method, the marks it gives the
table (every tie marked), ranks per seed, and how the table says it."""

from __future__ import annotations

import csv
import math

import pytest
from scipy import stats

from pml_plugins.experiment import aggregate as agg
from tests.experiment.test_aggregate import metrics_of, write_run

#: per method, seed -> value (a fraction); A leads, B is within the seeds' noise of A,
#: C is below A by 4-6 points in every seed, D gave A's values exactly
TABLE = {
    "A": {0: 0.80, 1: 0.70, 2: 0.75},
    "B": {0: 0.78, 1: 0.74, 2: 0.70},
    "C": {0: 0.75, 1: 0.66, 2: 0.69},
    "D": {0: 0.80, 1: 0.70, 2: 0.75},
}


def test_paired_t_test_is_scipys_ttest_rel_and_the_hand_computed_value():
    a, b = [0.5, 0.2, 0.7], [0.45, 0.25, 0.6]
    t, p = agg.paired_t_test(a, b)
    ref = stats.ttest_rel(a, b)
    assert t == pytest.approx(ref.statistic) and p == pytest.approx(ref.pvalue)
    # by hand: differences 0.05, -0.05, 0.10; mean 1/30, sd sqrt(7/1200); df 2
    d_mean, d_sd = 1 / 30, math.sqrt(7 / 1200)
    assert t == pytest.approx(d_mean / (d_sd / math.sqrt(3)))
    assert t == pytest.approx(0.7559289460184544)
    assert p == pytest.approx(0.5285954792089683)


def test_paired_t_test_without_variation_and_without_pairs():
    assert agg.paired_t_test([0.5, 0.6, 0.7], [0.5, 0.6, 0.7]) == (0.0, 1.0)
    # a constant difference: float noise (0.8 - 0.7 != 0.9 - 0.8) must not matter
    t, p = agg.paired_t_test([0.8, 0.9, 0.7], [0.7, 0.8, 0.6])
    assert t == math.inf and p == 0.0
    t, p = agg.paired_t_test([0.1, 0.2], [0.3, 0.4])
    assert t == -math.inf and p == 0.0
    assert all(math.isnan(x) for x in agg.paired_t_test([0.5], [0.4]))


def test_best_and_every_method_not_significantly_below_it_are_marked():
    out = agg.compare_with_best(TABLE)
    assert {c.best for c in out.values()} == {"A"}
    for loss in ("B", "C"):
        ref = stats.ttest_rel(list(TABLE["A"].values()), list(TABLE[loss].values()))
        assert out[loss].p == pytest.approx(ref.pvalue) and out[loss].n == 3
        assert out[loss].t == pytest.approx(ref.statistic)
    assert out["B"].p > 0.05 and out["C"].p < 0.05  # the table is built to be on both sides
    assert {loss for loss, c in out.items() if c.marked} == {"A", "B", "D"}
    assert out["C"].mean_difference == pytest.approx(0.05)
    # D is a tie with A: identical values, so whichever is called best, both are marked
    assert out["D"].p == 1.0


def test_ties_are_all_marked_whatever_their_number():
    same = {loss: {0: 0.5, 1: 0.6, 2: 0.4} for loss in ("X", "Y", "Z")}
    assert all(c.marked for c in agg.compare_with_best(same).values())
    # three methods within noise of each other, a fourth far below in every seed
    noisy = {
        "X": {0: 0.50, 1: 0.62, 2: 0.41},
        "Y": {0: 0.55, 1: 0.50, 2: 0.47},
        "Z": {0: 0.45, 1: 0.60, 2: 0.50},
        "W": {0: 0.20, 1: 0.31, 2: 0.12},
    }
    out = agg.compare_with_best(noisy)
    assert {loss for loss, c in out.items() if c.marked} == {"X", "Y", "Z"}


def test_a_method_above_the_best_on_their_common_seeds_stays_marked():
    # Q ran seeds 0, 1 and is above P there, but P's third seed lifts P's mean
    values = {"P": {0: 0.50, 1: 0.60, 2: 0.95}, "Q": {0: 0.55, 1: 0.65}}
    out = agg.compare_with_best(values)
    assert out["Q"].best == "P" and out["Q"].p == 0.0 and out["Q"].marked


@pytest.mark.parametrize("n", [2, 3, 5])
def test_any_number_of_seeds_from_two(n):
    a = {s: 0.6 + 0.01 * s for s in range(n)}
    b = {s: 0.6 + 0.01 * s - 0.02 - 0.001 * (s % 2) for s in range(n)}
    out = agg.compare_with_best({"a": a, "b": b})
    ref = stats.ttest_rel(list(a.values()), list(b.values()))
    assert out["b"].n == n and out["b"].p == pytest.approx(ref.pvalue)
    assert out["b"].marked == (ref.pvalue >= 0.05)


def test_one_seed_marks_the_highest_value_only():
    out = agg.compare_with_best({"a": {0: 0.5}, "b": {0: 0.4}, "c": {0: 0.5}})
    assert {loss for loss, c in out.items() if c.marked} == {"a", "c"}
    assert math.isnan(out["b"].p)


def test_ranks_per_seed_share_ties_and_summarise_over_seeds():
    ranks = agg.seed_ranks(TABLE)
    # seed 0: A = D = 0.80 (ranks 1, 2 -> 1.5 each), B 0.78 (3), C 0.75 (4)
    # seed 1: B 0.74 (1), A = D 0.70 (2.5), C 0.66 (4); seed 2: A = D (1.5), B 0.70 (3),
    # C 0.69 (4)
    assert ranks["A"].ranks == (1.5, 2.5, 1.5) and ranks["D"].ranks == (1.5, 2.5, 1.5)
    assert ranks["B"].ranks == (3.0, 1.0, 3.0)
    assert ranks["C"].ranks == (4.0, 4.0, 4.0)
    assert ranks["B"].mean == pytest.approx(7 / 3) and (ranks["B"].low, ranks["B"].high) == (1, 3)
    assert ranks["C"].of == 4 and ranks["C"].n == 3


def write_table_runs(root, table, dim=64, untrained=0.1):
    for loss, by_seed in table.items():
        for seed, value in by_seed.items():
            write_run(
                root, loss, dim, seed, metrics_of(value, value / 2), metrics_of(untrained, 0.05)
            )


def table_row(text: str, section: str, loss: str) -> list[str]:
    block = text.split(section)[1].split("\n## ")[0]
    (line,) = [x for x in block.splitlines() if x.startswith(f"| {loss} |")]
    return [c.strip() for c in line.strip("|").split("|")]


def test_table_bolds_every_tie_and_says_how(tmp_path):
    write_table_runs(tmp_path / "runs", TABLE)
    agg.aggregate(tmp_path / "runs", tmp_path / "r")
    text = (tmp_path / "r" / "digits" / "table.md").read_text()
    section = "## test split, embedding size 64"
    header = next(x for x in text.splitlines() if x.startswith("| method"))
    assert header.endswith("| rank (MAP@R) | seeds |")
    r1 = {loss: table_row(text, section, loss)[1] for loss in TABLE}
    assert [loss for loss, cell in r1.items() if cell.startswith("**")] == ["A", "B", "D"]
    assert r1["C"].startswith("70.00 ±")
    # MAP@R is R@1 / 2 here: the same ranks; A and D tie in every seed
    assert table_row(text, section, "A")[-2] == "1.8 (1.5–2.5)"
    assert table_row(text, section, "C")[-2] == "4.0 (4–4)"
    for words in ("paired t-test", "5%", "not corrected", "comparisons.csv", "n = 3"):
        assert words in text
    # the CSV holds the p-values the marks come from
    with open(tmp_path / "r" / "comparisons.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["metric"] == "recall_at_1"]
    by_loss = {r["loss"]: r for r in rows}
    ref = stats.ttest_rel(list(TABLE["A"].values()), list(TABLE["C"].values()))
    assert float(by_loss["C"]["p"]) == pytest.approx(ref.pvalue)
    assert by_loss["C"]["marked"] == "False" and by_loss["B"]["marked"] == "True"
    assert {r["best"] for r in rows} == {"A"}


def test_a_zero_width_interval_is_flagged_as_seeds_that_agreed(tmp_path):
    write_table_runs(tmp_path / "runs", {"A": {0: 0.5, 1: 0.5, 2: 0.5}, "B": TABLE["B"]})
    agg.aggregate(tmp_path / "runs", tmp_path / "r", tables=True)
    text = (tmp_path / "r" / "digits" / "table.md").read_text()
    cell = table_row(text, "## test split, embedding size 64", "A")[1]
    assert cell == "50.00 ± 0.00†"
    assert "± 0.00†: every seed gave the same value" in text
    assert "not known to 0.01 points" in text
    assert agg.tables.format_cell(0.5, 0.01) == "50.00 ± 1.00"


def test_one_seed_table_says_there_is_no_test(tmp_path):
    write_table_runs(tmp_path / "runs", {"A": {0: 0.5}, "B": {0: 0.6}})
    agg.aggregate(tmp_path / "runs", tmp_path / "r")
    text = (tmp_path / "r" / "digits" / "table.md").read_text()
    section = "## test split, embedding size 64"
    assert table_row(text, section, "B")[1] == "**60.00**"
    assert table_row(text, section, "A")[1] == "50.00"
    assert table_row(text, section, "A")[-2] == "2"
    assert "one seed gives no interval and no test" in text
