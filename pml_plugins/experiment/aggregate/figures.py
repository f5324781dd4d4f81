"""The figures: Recall@K curves, heatmaps, ranks per seed, training curves, 2-D embeddings.

Every figure names what its error bars and marks are; the methods keep one colour, marker
and line style across figures (a colour-blind-safe palette: Okabe & Ito, 2008).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .discovery import LOG, Run, embed_test_split, read_loss_history
from .statistics import (
    ALPHA,
    CONFIDENCE,
    UNTRAINED,
    Comparison,
    Group,
    compare_all,
    compare_with_best,
    rank_metric,
    seed_ranks,
    seed_values,
)
from .tables import short_name

#: Okabe & Ito's colour-blind-safe palette without its yellow (too light on white)
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#000000")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p")
LINESTYLES = ("-", "--", "-.", ":", (0, (5, 1, 1, 1, 1, 1)), (0, (8, 2)))
#: the untrained network: grey, dotted, crosses
UNTRAINED_STYLE = {"color": "#888888", "marker": "x", "linestyle": ":"}
#: bins of the angle histograms of the 2-D embeddings
ANGLE_BINS = 36


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def method_styles(losses: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Colour, marker and line style per method (sorted by name), untrained included: no
    two methods share all three, and colour is never the only difference."""
    out = {}
    for i, loss in enumerate(sorted(set(losses) - {UNTRAINED})):
        out[loss] = {
            "color": PALETTE[i % len(PALETTE)],
            "marker": MARKERS[i % len(MARKERS)],
            "linestyle": LINESTYLES[(i // len(PALETTE)) % len(LINESTYLES)],
        }
    out[UNTRAINED] = dict(UNTRAINED_STYLE)
    return out


def _summary_lookup(summary: Sequence[Mapping[str, Any]], dataset: str, split: str) -> dict:
    return {
        (r["loss"], r["embedding_size"], r["metric"]): r
        for r in summary
        if r["dataset"] == dataset
        and r["split"] == split
        and (r["stage"] == "trained" or r["loss"] == UNTRAINED)
    }


def _seeds_text(look: Mapping[tuple, Mapping[str, Any]]) -> str:
    """``3 seeds``, or ``2/3 seeds`` where the methods ran different numbers of seeds."""
    ns = sorted({r["n"] for (loss, _, _), r in look.items() if loss != UNTRAINED})
    return f"{'/'.join(map(str, ns))} seed{'s' if ns != [1] else ''}"


def _ci_text(look: Mapping[tuple, Mapping[str, Any]]) -> str:
    if all(r["n"] < 2 for r in look.values()):
        return "one seed: no error bars"
    return f"error bars: {100 * CONFIDENCE:g}% CI of the mean (t-distribution)"


def _save(fig, path: Path, dpi: int = 110) -> Path:
    plt = _pyplot()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def plot_recall_curves(summary, dataset: str, split: str, path: Path) -> Path:
    """One panel per embedding size: Recall@K per method with its 95% CI, the untrained
    network dotted grey; the methods are shifted a little along K so that their error
    bars do not hide each other; one legend for all panels, under them."""
    plt = _pyplot()
    look = _summary_lookup(summary, dataset, split)
    dims = sorted({d for _, d, _ in look})
    losses = sorted({loss for loss, _, _ in look if loss != UNTRAINED})
    names = [*losses, UNTRAINED]
    styles = method_styles(losses)
    ks = sorted({int(m[10:]) for _, _, m in look if re.fullmatch(r"recall_at_\d+", m)})
    fig, axes = plt.subplots(1, len(dims), figsize=(6 * len(dims), 5), squeeze=False)
    handles: dict[str, Any] = {}
    for ax, dim in zip(axes[0], dims, strict=True):
        for i, loss in enumerate(names):
            pts = [
                (k, look[(loss, dim, f"recall_at_{k}")])
                for k in ks
                if (loss, dim, f"recall_at_{k}") in look
            ]
            if not pts:
                continue
            shift = 2 ** ((i - (len(names) - 1) / 2) * 0.06)
            x = [k * shift for k, _ in pts]
            y = [100 * r["mean"] for _, r in pts]
            err = [0 if math.isnan(r["ci95"]) else 100 * r["ci95"] for _, r in pts]
            line = ax.errorbar(x, y, yerr=err, label=loss, capsize=2, lw=1.3, ms=5, **styles[loss])
            handles.setdefault(loss, line)
        ax.set_xscale("log", base=2)
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.minorticks_off()
        ax.set_xlabel("K")
        ax.set_ylabel("Recall@K (%)")
        ax.set_title(f"embedding size {dim}")
        ax.grid(alpha=0.3)
    fig.suptitle(
        f"{dataset}, {split} split: Recall@K, mean over {_seeds_text(look)}; {_ci_text(look)}",
        fontsize=10,
    )
    _legend_below(fig, handles, [n for n in names if n in handles], ncol=5)
    return _save(fig, path)


def _legend_below(fig, handles: Mapping[str, Any], labels: Sequence[str], ncol: int) -> None:
    """One legend for every panel, under them (the same styles mean the same in each),
    and the panels laid out above it."""
    bottom = 0.0
    if labels:
        ncol = min(ncol, len(labels))
        fig.legend(
            [handles[x] for x in labels],
            labels,
            loc="lower center",
            ncol=ncol,
            fontsize=8,
            frameon=False,
        )
        bottom = (0.1 + 0.3 * math.ceil(len(labels) / ncol)) / fig.get_figheight()
    # room above the panels for the figure's title (tight_layout leaves it out)
    lines = fig.get_suptitle().count("\n") + 1 if fig.get_suptitle() else 0
    top = 1 - (0.1 + 0.2 * lines) / fig.get_figheight()
    fig.tight_layout(rect=(0, bottom, 1, top))


def _text_color(rgba: Sequence[float]) -> str:
    """Black on light cells, white on dark ones (relative luminance)."""
    r, g, b = rgba[:3]
    return "black" if 0.2126 * r + 0.7152 * g + 0.0722 * b > 0.45 else "white"


def plot_heatmap(
    summary,
    dataset: str,
    split: str,
    metric: str,
    path: Path,
    comparisons: Mapping[Group, Mapping[str, Comparison]] | None = None,
) -> Path:
    """Loss × embedding size: one column per size, each with its own colour scale over the
    trained methods (a shared one would flatten the small sizes); each cell holds its
    mean ± 95% CI, bold where the method is the best or not significantly different from
    it (``comparisons``, from :func:`~.statistics.compare_all`); the untrained network in
    the top row, grey (outside the colour scale)."""
    plt = _pyplot()
    from matplotlib.patches import Rectangle

    look = _summary_lookup(summary, dataset, split)
    dims = sorted({d for _, d, _ in look})
    losses = sorted({loss for loss, _, _ in look if loss != UNTRAINED})
    names = [UNTRAINED, *losses]
    comparisons = comparisons or {}
    cmap = plt.get_cmap("cividis").with_extremes(bad="#dddddd")
    fig, axes = plt.subplots(
        1,
        len(dims),
        figsize=(3.3 * len(dims) + 2.4, 0.42 * len(names) + 2.4),
        squeeze=False,
        sharey=True,
    )
    for ax, dim in zip(axes[0], dims, strict=True):
        cells = [look.get((loss, dim, metric)) for loss in names]
        colored = np.array([[np.nan if c is None else 100 * c["mean"]] for c in cells])
        colored[0] = np.nan  # the untrained row stays grey
        finite = colored[np.isfinite(colored)]
        lo, hi = (finite.min(), finite.max()) if finite.size else (0.0, 1.0)
        if hi - lo < 1e-9:
            lo, hi = lo - 0.5, hi + 0.5
        im = ax.imshow(colored, cmap=cmap, vmin=lo, vmax=hi, aspect="auto")
        marks = comparisons.get((dataset, split, dim, metric), {})
        for i, (loss, c) in enumerate(zip(names, cells, strict=True)):
            if c is None or math.isnan(c["mean"]):
                continue
            text = f"{100 * c['mean']:.1f}"
            if not math.isnan(c["ci95"]):
                text += f" ± {100 * c['ci95']:.1f}"
            bold = loss in marks and marks[loss].marked
            if bold:
                ax.add_patch(
                    Rectangle((-0.47, i - 0.44), 0.94, 0.88, fill=False, ec="#D55E00", lw=2.2)
                )
            color = "black" if i == 0 else _text_color(cmap(im.norm(colored[i, 0])))
            ax.text(
                0,
                i,
                text,
                ha="center",
                va="center",
                fontsize=8.5,
                color=color,
                fontweight="bold" if bold else "normal",
                fontstyle="italic" if i == 0 else "normal",
            )
        ax.axhline(0.5, color="white", lw=3)
        ax.set_xticks([0], [f"embedding size {dim}"])
        ax.set_yticks(range(len(names)), names)
        fig.colorbar(im, ax=ax, fraction=0.12, pad=0.03).set_label(
            f"{short_name(metric)} (%), trained, d = {dim}", fontsize=8
        )
    n_text = _seeds_text({k: v for k, v in look.items() if k[2] == metric} or look)
    fig.suptitle(
        f"{dataset}, {split} split: {short_name(metric)} (%), mean ± {100 * CONFIDENCE:g}% "
        f"CI over {n_text}\ncolours: one scale per embedding size, over the trained methods\n"
        f"framed, bold: the highest mean and every method not significantly below it\n"
        f"(two-sided paired t-test over seeds, {100 * ALPHA:g}% level)\n"
        f"top row, grey: the network before training",
        fontsize=9,
    )
    fig.tight_layout()
    return _save(fig, path)


def plot_ranks(rows: Sequence[Mapping[str, Any]], dataset: str, split: str, path: Path) -> Path:
    """One panel per embedding size: each method's rank (of MAP@R, else R@1) among the
    trained methods in every seed (circles), their mean (diamond) and range (line), the
    methods sorted by mean rank; bold names: not significantly different from the best."""
    plt = _pyplot()
    rows = [r for r in rows if r["dataset"] == dataset and r["split"] == split]
    metric = rank_metric(r["metric"] for r in rows if r["stage"] == "trained")
    values = seed_values(rows)
    dims = sorted({g[2] for g in values if g[3] == metric})
    methods = sorted({loss for by_loss in values.values() for loss in by_loss})
    styles = method_styles(methods)
    fig, axes = plt.subplots(
        1,
        max(1, len(dims)),
        figsize=(5.2 * max(1, len(dims)), max(3.4, 0.36 * len(methods) + 1.9)),
        squeeze=False,
    )
    n_seeds: set[int] = set()
    for ax, dim in zip(axes[0], dims, strict=False):
        group = values[(dataset, split, dim, metric)]
        ranks = seed_ranks(group)
        marks = compare_with_best(group)
        order = sorted(ranks, key=lambda loss: (ranks[loss].mean, loss))
        of = max(r.of for r in ranks.values())
        for y, loss in enumerate(order):
            rank = ranks[loss]
            n_seeds.add(rank.n)
            style = styles[loss]
            ax.plot([rank.low, rank.high], [y, y], color=style["color"], lw=2, alpha=0.6)
            jitter = np.linspace(-0.18, 0.18, rank.n) if rank.n > 1 else np.zeros(1)
            ax.scatter(rank.ranks, y + jitter, s=22, facecolors="none", edgecolors=style["color"])
            ax.scatter([rank.mean], [y], s=60, marker="D", color=style["color"], zorder=3)
            ax.text(of + 0.6, y, f"{rank.mean:.1f}", va="center", fontsize=8)
        ax.set_yticks(range(len(order)), order)
        for label, loss in zip(ax.get_yticklabels(), order, strict=True):
            if marks[loss].marked:
                label.set_fontweight("bold")
        ax.set_ylim(len(order) - 0.5, -0.5)
        ax.set_xlim(0.5, of + 1.2)
        ax.set_xticks(range(1, of + 1))
        ax.set_xlabel(f"rank of {short_name(metric)} in a seed (1 = best of {of})")
        ax.set_title(f"embedding size {dim}")
        ax.grid(axis="x", alpha=0.3)
    ns = "/".join(map(str, sorted(n_seeds)))
    fig.suptitle(
        f"{dataset}, {split} split: rank of {short_name(metric)} among the trained methods\n"
        f"circles: each of {ns} seeds; diamond and number: mean rank; line: lowest–highest; "
        f"bold names: not significantly\nbelow the best mean (two-sided paired t-test over "
        f"seeds, {100 * ALPHA:g}% level)",
        fontsize=9,
    )
    fig.tight_layout()
    return _save(fig, path)


def plot_training_curves(runs: Sequence[Run], dataset: str, path: Path) -> Path:
    """One panel per loss: the total loss per iteration of every run (colour and marker:
    embedding size; line style: seed), from the record-keeper's loss history."""
    plt = _pyplot()
    runs = [r for r in runs if r.dataset == dataset]
    # runs that train nothing (a fold ensemble: no loss history) get no panel
    trained = [r for r in runs if "tuning" not in r.config or "ensemble" not in r.config["tuning"]]
    runs = trained or runs
    losses = sorted({r.loss for r in runs})
    cols = min(3, len(losses))
    nrows = math.ceil(len(losses) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.1 * nrows), squeeze=False)
    dims = sorted({r.embedding_size for r in runs})
    seeds = sorted({r.seed for r in runs})
    handles: dict[str, Any] = {}
    for ax, loss in zip(axes.flat, losses, strict=False):
        for run in sorted(
            (r for r in runs if r.loss == loss), key=lambda r: (r.embedding_size, r.seed)
        ):
            hist = read_loss_history(run)
            if hist is None:
                continue
            j = dims.index(run.embedding_size)
            ax.plot(
                *hist,
                color=PALETTE[j % len(PALETTE)],
                marker=MARKERS[j % len(MARKERS)],
                markersize=3,
                linestyle=LINESTYLES[seeds.index(run.seed) % len(LINESTYLES)],
                alpha=0.8,
                label=f"d = {run.embedding_size}, seed {run.seed}",
            )
        if not ax.lines:
            ax.text(0.5, 0.5, "no loss history", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(loss, fontsize=9)
        ax.set_xlabel("iteration")
        ax.set_ylabel("total loss")
        ax.grid(alpha=0.3)
        for line in ax.lines:
            handles.setdefault(str(line.get_label()), line)
    for ax in list(axes.flat)[len(losses) :]:
        ax.axis("off")
    fig.suptitle(
        f"{dataset}: training loss per iteration (record-keeper loss_histories), every run; "
        f"colour and marker: embedding size, line style: seed",
        fontsize=10,
    )
    # one legend column per seed, one row per embedding size (matplotlib fills columns first)
    labels = sorted(handles, key=lambda x: [int(n) for n in re.findall(r"\d+", x)][::-1])
    _legend_below(fig, handles, labels, ncol=max(1, len(seeds)))
    return _save(fig, path, dpi=100)


def on_unit_circle(embeddings: np.ndarray) -> np.ndarray:
    """The embeddings L2-normalised, as the evaluation compares them (zero rows stay 0)."""
    x = np.asarray(embeddings, dtype=float)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norm, 1e-12)


@dataclass
class ScatterPanel:
    """The 2-D test embeddings of one run, L2-normalised (``xy``), and their labels."""

    loss: str
    seed: int
    xy: np.ndarray
    labels: np.ndarray
    recall_at_1: float | None


def scatter_panels(runs: Sequence[Run], dataset: str, split: str) -> list[ScatterPanel] | None:
    """Per loss, the 2-D run of its lowest seed embedded and L2-normalised (None without
    2-D runs; runs without a checkpoint are left out)."""
    chosen: dict[str, Run] = {}
    for run in sorted(runs, key=lambda r: r.seed):
        if run.dataset == dataset and run.embedding_size == 2:
            chosen.setdefault(run.loss, run)
    if not chosen:
        return None
    panels = []
    for loss, run in sorted(chosen.items()):
        emb = embed_test_split(run)
        if emb is None:
            continue
        r1 = (run.metrics.get("trained") or {}).get(split, {}).get("recall_at_1")
        panels.append(ScatterPanel(loss, run.seed, on_unit_circle(emb[0]), emb[1], r1))
    return panels


def _class_colors(classes: Sequence[Any]):
    plt = _pyplot()
    if len(classes) <= len(PALETTE):
        return {c: PALETTE[i] for i, c in enumerate(classes)}
    cmap = plt.get_cmap("tab20")
    return {c: cmap(i % cmap.N) for i, c in enumerate(classes)}


def draw_scatter_2d(panels: Sequence[ScatterPanel], dataset: str):
    """The figure of :func:`plot_scatter_2d`: per panel the points on the unit circle (the
    rim) and, inside, one ring per class (up to 10 classes) whose height at each angle is
    the fraction of that class's points in that 10° bin."""
    plt = _pyplot()
    from matplotlib.collections import PatchCollection
    from matplotlib.lines import Line2D
    from matplotlib.patches import Wedge

    classes = sorted({c for p in panels for c in np.unique(p.labels).tolist()})
    colors = _class_colors(classes)
    cols = min(3, len(panels))
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.6 * cols, 3.9 * nrows + 1.0), squeeze=False)
    edges = np.linspace(-180, 180, ANGLE_BINS + 1)
    rings = len(classes) <= 10
    band = 0.66 / max(1, len(classes))
    for ax, panel in zip(axes.flat, panels, strict=False):
        order = np.random.RandomState(0).permutation(len(panel.labels))
        ax.add_patch(plt.Circle((0, 0), 1.0, fill=False, color="#999999", lw=0.6))
        ax.scatter(
            panel.xy[order, 0],
            panel.xy[order, 1],
            s=4,
            alpha=0.35,
            c=[colors[c] for c in panel.labels[order].tolist()],
            linewidths=0,
        )
        if rings:
            angles = np.degrees(np.arctan2(panel.xy[:, 1], panel.xy[:, 0]))
            fractions = {
                c: np.histogram(angles[panel.labels == c], bins=edges)[0]
                / max(1, int((panel.labels == c).sum()))
                for c in classes
            }
            top = max((f.max() for f in fractions.values()), default=1.0) or 1.0
            wedges, wedge_colors = [], []
            for i, c in enumerate(classes):
                base = 0.2 + i * band
                ax.add_patch(plt.Circle((0, 0), base, fill=False, color="#dddddd", lw=0.4))
                for j, frac in enumerate(fractions[c]):
                    h = 0.9 * band * frac / top
                    if h > 0:
                        wedges.append(Wedge((0, 0), base + h, edges[j], edges[j + 1], width=h))
                        wedge_colors.append(colors[c])
            ax.add_collection(PatchCollection(wedges, facecolors=wedge_colors, edgecolors="none"))
        for deg in (0, 90, 180, 270):
            rad = math.radians(deg)
            ax.text(
                1.14 * math.cos(rad),
                1.14 * math.sin(rad),
                f"{deg}°",
                ha="center",
                va="center",
                fontsize=6,
                color="#666666",
            )
        ax.set_xlim(-1.25, 1.25)
        ax.set_ylim(-1.25, 1.25)
        ax.set_aspect("equal")
        ax.axis("off")
        r1 = "" if panel.recall_at_1 is None else f", R@1 {100 * panel.recall_at_1:.1f}%"
        ax.set_title(f"{panel.loss}\nseed {panel.seed}{r1}", fontsize=9)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    seeds = sorted({p.seed for p in panels})
    points = sorted({len(p.labels) for p in panels})
    fig.suptitle(
        f"{dataset}: 2-D test embeddings as the evaluation sees them: L2-normalised, on the "
        f"unit circle\n(rim: {'/'.join(map(str, points))} points, seed "
        f"{'/'.join(map(str, seeds))})"
        + ("; rings: each class's share of its points per 10° of angle" if rings else ""),
        fontsize=9,
    )
    handles = [
        Line2D([], [], marker="o", linestyle="", color=colors[c], label=str(c)) for c in classes
    ]
    if len(classes) <= 20:
        fig.legend(
            handles=handles,
            title="class",
            loc="lower center",
            ncol=min(10, len(classes)),
            fontsize=8,
            title_fontsize=8,
            frameon=False,
        )
    top = 1 - 0.5 / fig.get_figheight()
    fig.tight_layout(rect=(0, 0.45 / fig.get_figheight() * (1 + len(classes) // 10), 1, top))
    return fig


def plot_scatter_2d(
    runs: Sequence[Run], dataset: str, path: Path, split: str = "test"
) -> Path | None:
    """The 2-D test embeddings of each loss's lowest seed (:func:`draw_scatter_2d`); None
    without 2-D runs; a figure saying so where no 2-D run has a checkpoint."""
    panels = scatter_panels(runs, dataset, split)
    if panels is None:
        return None
    plt = _pyplot()
    if not panels:  # 2-D runs without checkpoints (epochs: 0): say so, in the declared file
        LOG.info("%s: no checkpoints of 2-D runs", dataset)
        fig, ax = plt.subplots(figsize=(5, 2))
        ax.text(0.5, 0.5, f"{dataset}: no checkpoints of 2-D runs", ha="center", va="center")
        ax.axis("off")
        return _save(fig, path, dpi=100)
    return _save(draw_scatter_2d(panels, dataset), path, dpi=100)


def plot_all(
    summary: Sequence[Mapping[str, Any]],
    rows: Sequence[Mapping[str, Any]],
    runs: Sequence[Run],
    dataset: str,
    split: str,
    folder: Path,
) -> list[Path]:
    """Every figure of one data set, into ``folder``."""
    comparisons = compare_all(r for r in rows if r["dataset"] == dataset)
    written = [plot_recall_curves(summary, dataset, split, folder / "recall_at_k.png")]
    for metric, name in (
        ("mean_average_precision_at_r", "heatmap_map_at_r.png"),
        ("recall_at_1", "heatmap_recall_at_1.png"),
    ):
        written.append(plot_heatmap(summary, dataset, split, metric, folder / name, comparisons))
    ranked_on = rank_metric(r["metric"] for r in rows if r["dataset"] == dataset)
    if ranked_on is not None:
        name = f"rank_{short_name(ranked_on).lower().replace('@', '_at_')}.png"
        written.append(plot_ranks(rows, dataset, split, folder / name))
    written.append(plot_training_curves(runs, dataset, folder / "training_curves.png"))
    scatter = plot_scatter_2d(runs, dataset, folder / "scatter_2d.png", split)
    if scatter is not None:
        written.append(scatter)
    return written
