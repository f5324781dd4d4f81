# Helpers: the grid's cells, validated once at load time (scripts/grid.py).

import json
import shlex
import sys

#: the workflow's own code (the grid, the search plan, the GPU pool)
SCRIPTS = os.path.join(workflow.basedir, "scripts")
sys.path.insert(0, SCRIPTS)

import grid as grid_mod


def script(name):
    """The path of one of the workflow's scripts (scripts/<name>)."""
    return os.path.join(SCRIPTS, name)


#: the launcher of a GPU job (a free GPU from the lock-file pool)
GPU_POOL = f"python {shlex.quote(script('gpu_pool.py'))}"

try:
    CELLS, STUDIES = grid_mod.cells_and_studies(config)
except grid_mod.GridError as exc:
    raise WorkflowError(f"invalid grid config: {exc}") from None

RUNS = config["runs_dir"].rstrip("/")
RESULTS = config["results_dir"].rstrip("/")
CONTAINER = config["container"]
SEARCH = config.get("search") or {}


wildcard_constraints:
    dataset="[A-Za-z0-9_]+",
    loss="[A-Za-z0-9][A-Za-z0-9_.+-]*",
    dim="[0-9]+",
    seed="[0-9]+",


def run_file(name):
    """A file of a cell's run folder, as a pattern: <runs_dir>/<dataset>/<loss>/<dim>/seed<k>/name."""
    return f"{RUNS}/{{dataset}}/{{loss}}/{{dim}}/seed{{seed}}/{name}"


def cell_of(wildcards):
    return CELLS[
        grid_mod.cell_path(
            wildcards.dataset, wildcards.loss, wildcards.dim, wildcards.seed
        )
    ]


def cell_json(wildcards):
    return json.dumps(cell_of(wildcards), sort_keys=True)


def gpus_of(wildcards):
    return 1 if grid_mod.uses_gpu(cell_of(wildcards)) else 0


def launcher(wildcards):
    """GPU cells take a free GPU from the lock-file pool (scripts/gpu_pool.py)."""
    return GPU_POOL if gpus_of(wildcards) else ""


def all_metrics():
    return [f"{RUNS}/{path}/metrics.json" for path in CELLS]


def all_run_files():
    """What aggregate reads of each run besides metrics.json (rules train and ensemble)."""
    out = []
    for path, cell in CELLS.items():
        names = ["config.yaml", "manifest.json"]
        if not (cell.get("tuning") or {}).get("ensemble"):
            names.append("test_embeddings.npz")
        out += [f"{RUNS}/{path}/{name}" for name in names]
    return out


def best_json(study):
    """A study's best.json (``study``: <dataset>/<label>/<dim>)."""
    dataset, label, dim = study.split("/")
    return f"{RESULTS}/{dataset}/search/{label}/{dim}/best.json"


def tuned_input(wildcards):
    """A tuned cell's training job needs its study's best parameters."""
    tuning = cell_of(wildcards).get("tuning")
    return {"best": best_json(tuning["from"])} if tuning else {}


def all_search_reports():
    return [best_json(study) for study in STUDIES]


def paper_numbers():
    return [config["paper_numbers"]] if config.get("paper_numbers") else []


def aggregate_outputs():
    """runs.csv, summary.csv and per data set the table and plots, each marked for the report."""
    out = {
        "csv": report(
            f"{RESULTS}/runs.csv", caption="../report/runs.rst", category="Tables"
        ),
        "summary": report(
            f"{RESULTS}/summary.csv", caption="../report/summary.rst", category="Tables"
        ),
        "comparisons": report(
            f"{RESULTS}/comparisons.csv",
            caption="../report/comparisons.rst",
            category="Tables",
        ),
    }
    files = {
        "table": ("table.md", "table.rst", "Tables"),
        "recall": ("recall_at_k.png", "recall_at_k.rst", "Recall@K"),
        "heatmap_map": ("heatmap_map_at_r.png", "heatmap.rst", "Heatmaps"),
        "heatmap_r1": ("heatmap_recall_at_1.png", "heatmap.rst", "Heatmaps"),
        "ranks": ("rank_map_at_r.png", "rank.rst", "Ranks"),
        "curves": ("training_curves.png", "training_curves.rst", "Training curves"),
    }
    if 2 in config["embedding_sizes"]:
        files["scatter"] = ("scatter_2d.png", "scatter_2d.rst", "2-D embeddings")
    for dataset in config["datasets"]:
        for key, (name, caption, category) in files.items():
            out[f"{key}_{dataset}"] = report(
                f"{RESULTS}/{dataset}/{name}",
                caption=f"../report/{caption}",
                category=category,
                subcategory=dataset,
            )
    return out


# ---------------------------------------------------------------- search (rules/search.smk)


def study_folder(name):
    return f"{RUNS}/{{dataset}}/{{loss}}/{{dim}}/search/{name}"


def report_file(name):
    return f"{RESULTS}/{{dataset}}/search/{{loss}}/{{dim}}/{name}"


def study_json(wildcards):
    return json.dumps(study_of(wildcards), sort_keys=True)


def study_of(wildcards):
    return STUDIES[f"{wildcards.dataset}/{wildcards.loss}/{wildcards.dim}"]


def study_gpus(wildcards):
    return 1 if grid_mod.uses_gpu(study_of(wildcards)["experiment"]) else 0


def study_launcher(wildcards):
    return GPU_POOL if study_gpus(wildcards) else ""


def ensemble_best(wildcards):
    """The best.json of an ensemble cell's study (the cell's size is k x the study's)."""
    label = f"{wildcards.loss}+ensemble"
    path = grid_mod.cell_path(wildcards.dataset, label, wildcards.dim, 0)
    return best_json(CELLS[path]["tuning"]["from"])
