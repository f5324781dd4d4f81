"""Figures a reader can read without a caption: what is drawn, not only that a PNG exists."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pml_plugins.experiment import aggregate as agg
from pml_plugins.experiment.aggregate import figures
from tests.experiment.test_aggregate import metrics_of, write_run

#: two sizes with very different ranges: a shared colour scale would flatten d = 2
VALUES = {
    2: {"A": [0.30, 0.34, 0.32], "B": [0.20, 0.22, 0.21], "C": [0.31, 0.29, 0.35]},
    64: {"A": [0.90, 0.92, 0.91], "B": [0.93, 0.95, 0.94], "C": [0.80, 0.82, 0.81]},
}


@pytest.fixture
def grid(tmp_path):
    root = tmp_path / "runs"
    for dim, by_loss in VALUES.items():
        for loss, values in by_loss.items():
            for seed, value in enumerate(values):
                untrained = metrics_of(0.1 + 0.01 * seed, 0.05)
                write_run(root, loss, dim, seed, metrics_of(value, value / 2), untrained)
    rows = agg.tidy_rows(agg.find_runs(root))
    return root, rows, agg.summarise(rows)


@pytest.fixture
def drawn(monkeypatch):
    """The figures as they are saved (the Figure objects, before they are closed)."""
    figs = []
    save = figures._save

    def keep(fig, path, dpi=110):
        figs.append(fig)
        return save(fig, path, dpi)

    monkeypatch.setattr(figures, "_save", keep)
    return figs


def test_heatmap_has_one_colour_scale_per_size_values_in_cells_and_the_untrained_row(
    grid, drawn, tmp_path
):
    _, rows, summary = grid
    path = tmp_path / "h.png"
    agg.plot_heatmap(summary, "digits", "test", "recall_at_1", path, agg.compare_all(rows))
    (fig,) = drawn
    panels = [ax for ax in fig.axes if ax.images]
    assert len(panels) == 2
    for ax, dim in zip(panels, (2, 64), strict=True):
        means = [100 * np.mean(v) for v in VALUES[dim].values()]
        (image,) = ax.images
        assert image.norm.vmin == pytest.approx(min(means))
        assert image.norm.vmax == pytest.approx(max(means))
        grid_values = image.get_array()
        assert np.ma.is_masked(grid_values[0, 0]) or np.isnan(grid_values[0, 0])  # grey
        texts = {t.get_text(): t for t in ax.texts}
        assert [t.get_text() for t in ax.texts][0].startswith("11.0 ± ")  # untrained row
        for loss, values in VALUES[dim].items():
            mean = f"{100 * np.mean(values):.1f} ± "
            (cell,) = [t for text, t in texts.items() if text.startswith(mean)]
            marked = agg.compare_all(rows)[("digits", "test", dim, "recall_at_1")][loss].marked
            assert (cell.get_fontweight() == "bold") == marked
    marks = [
        c.marked
        for g, by in agg.compare_all(rows).items()
        if g[3] == "recall_at_1"
        for c in by.values()
    ]
    assert any(marks) and not all(marks)  # both kinds of cell were checked
    rows_shown = [t.get_text() for t in panels[0].get_yticklabels()]
    assert rows_shown == [agg.UNTRAINED, "A", "B", "C"]
    assert "95% CI" in fig._suptitle.get_text() and "paired t-test" in fig._suptitle.get_text()
    assert path.stat().st_size > 5000


def test_recall_curves_name_the_interval_and_share_one_legend(grid, drawn, tmp_path):
    _, _, summary = grid
    agg.plot_recall_curves(summary, "digits", "test", tmp_path / "r.png")
    (fig,) = drawn
    assert "95% CI" in fig._suptitle.get_text() and "3 seeds" in fig._suptitle.get_text()
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == ["A", "B", "C", agg.UNTRAINED]
    assert all(ax.get_legend() is None for ax in fig.axes)


def test_method_styles_never_differ_by_colour_alone():
    names = [f"m{i:02d}" for i in range(12)]
    styles = figures.method_styles(names)
    combos = {(s["color"], s["marker"], s["linestyle"]) for s in styles.values()}
    assert len(combos) == len(names) + 1  # + the untrained network
    assert len({s["marker"] for n, s in styles.items() if n != agg.UNTRAINED}) == 12
    assert set(figures.PALETTE) == {styles[n]["color"] for n in names[:7]}


def test_rank_figure_is_written_with_every_method(grid, drawn, tmp_path):
    _, rows, _ = grid
    path = agg.plot_ranks(rows, "digits", "test", tmp_path / "rank.png")
    (fig,) = drawn
    for ax, dim in zip(fig.axes, (2, 64), strict=True):
        labels = [t.get_text() for t in ax.get_yticklabels()]
        ranks = agg.seed_ranks({k: dict(enumerate(v)) for k, v in VALUES[dim].items()})
        assert labels == sorted(ranks, key=lambda loss: ranks[loss].mean)
    with Image.open(path) as img:
        assert len(np.unique(np.asarray(img.convert("L")))) > 10


def test_aggregate_writes_the_rank_figure_and_the_comparisons(grid, tmp_path):
    root, _, _ = grid
    written = agg.aggregate(root, tmp_path / "r")
    assert tmp_path / "r" / "digits" / "rank_map_at_r.png" in written
    assert tmp_path / "r" / "comparisons.csv" in written


def test_on_unit_circle_keeps_the_angle():
    emb = np.array([[3.0, 4.0], [-0.01, 0.0], [0.0, -250.0], [1e-3, 1e-3]])
    xy = agg.on_unit_circle(emb)
    np.testing.assert_allclose(np.linalg.norm(xy, axis=1), 1.0)
    np.testing.assert_allclose(np.arctan2(xy[:, 1], xy[:, 0]), np.arctan2(emb[:, 1], emb[:, 0]))


def test_scatter_draws_the_points_on_the_unit_circle():
    rng = np.random.RandomState(1)
    raw = rng.normal(size=(200, 2)) * [5.0, 0.2]  # a long thin cloud, far from the circle
    labels = np.repeat([5, 6, 7, 8], 50)
    panel = figures.ScatterPanel("X", 0, agg.on_unit_circle(raw), labels, 0.5)
    fig = figures.draw_scatter_2d([panel, panel], "digits")
    ax = fig.axes[0]
    (points,) = [c for c in ax.collections if len(c.get_offsets()) == len(labels)]
    offsets = np.asarray(points.get_offsets())
    np.testing.assert_allclose(np.linalg.norm(offsets, axis=1), 1.0)
    # the same points (drawn in a shuffled order), in their directions
    order = np.lexsort(offsets.T)
    expected = agg.on_unit_circle(raw)
    np.testing.assert_allclose(offsets[order], expected[np.lexsort(expected.T)])
    assert ax.get_aspect() == 1.0
    assert "seed 0" in ax.get_title() and "R@1 50.0%" in ax.get_title()
    assert "L2-normalised" in fig._suptitle.get_text()
    figures._pyplot().close(fig)
