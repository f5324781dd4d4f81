"""The Snakemake workflow: dry runs of every grid, lint, validation errors, a real tiny grid
that is interrupted and resumed, and the report."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
SNAKEFILE = REPO / "workflow" / "Snakefile"
CONFIGS = sorted((REPO / "workflow" / "config").glob("*.yaml"))
LOCAL_PROFILE = REPO / "workflow" / "profiles" / "local"
BIN = Path(sys.executable).parent


def env() -> dict[str, str]:
    out = dict(os.environ)
    out["PATH"] = f"{BIN}{os.pathsep}{out.get('PATH', '')}"
    out["PYTHONPATH"] = f"{REPO}{os.pathsep}{out.get('PYTHONPATH', '')}".rstrip(os.pathsep)
    out["OMP_NUM_THREADS"] = "1"
    return out


def snakemake_cmd(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "snakemake", *map(str, args)]


def run_snakemake(*args: str | Path, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        snakemake_cmd(*args), cwd=cwd, env=env(), capture_output=True, text=True, timeout=timeout
    )


def job_count(output: str, rule: str) -> int:
    match = re.search(rf"^{rule}\s+(\d+)\s*$", output, re.MULTILINE)
    return int(match.group(1)) if match else 0


def n_cells(grid: dict) -> int:
    return (
        len(grid["datasets"])
        * len(grid["losses"])
        * len(grid["embedding_sizes"])
        * len(grid["seeds"])
    )


def test_there_is_a_default_grid_and_paper_grids():
    names = [c.name for c in CONFIGS]
    assert "config.yaml" in names
    assert len(names) >= 2, names


def test_dry_run_resolves_every_grid():
    """`snakemake -n` at the repository root on the default grid (found without options:
    workflow/Snakefile, workflow/config/config.yaml) and on every paper grid, without data."""
    assert not (REPO / "Snakefile").exists(), "one Snakefile: workflow/Snakefile"

    def start(config: Path) -> subprocess.Popen:
        args = ["-n", "--forceall", "--cores", "all", "--config", "check_data=false"]
        if config.name != "config.yaml":
            args += ["--configfile", config]
        return subprocess.Popen(
            snakemake_cmd(*args),
            cwd=REPO,
            env=env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    outputs = {}
    for i in range(0, len(CONFIGS), 3):  # three at a time
        batch = {config: start(config) for config in CONFIGS[i : i + 3]}
        for config, proc in batch.items():
            outputs[config] = (proc.communicate(timeout=600)[0], proc.returncode)
    for config, (out, returncode) in outputs.items():
        assert returncode == 0, f"{config.name}:\n{out[-3000:]}"
        assert f"{config}" in out, f"{config.name} not loaded:\n{out[-3000:]}"
        grid = yaml.safe_load(config.read_text())
        assert job_count(out, "train") == n_cells(grid), f"{config.name}:\n{out[-3000:]}"
        assert job_count(out, "aggregate") == 1


def test_lint_is_clean():
    proc = run_snakemake("--lint", "--cores", "1", "--config", "check_data=false", cwd=REPO)
    out = proc.stdout + proc.stderr
    assert "Lints for" not in out, out[-5000:]
    assert proc.returncode == 0, out[-3000:]


def write_grid(path: Path, **changes) -> Path:
    grid = {
        "runs_dir": "runs",
        "results_dir": "results",
        "threads": 1,
        "base": {
            "model": {"trunk": {"SmallCNN": {"width": 8}}},
            "sampler": {"MPerClassSampler": {"m": 4}},
            "batch_size": 20,
            "epochs": 2,
            "iterations_per_epoch": 40,
            "device": "cpu",
            "dataset": {"limit_per_class": 20},
            "evaluation": {"k_values": [1, 2, 4]},
        },
        "datasets": {"mnist_subset": {}},
        "losses": {
            "MultiSimilarity": {"loss": "MultiSimilarityLoss", "miner": "MultiSimilarityMiner"},
            "NRA": {"loss": {"NRALoss": {"alpha": 4}}},
        },
        "embedding_sizes": [2, 8],
        "seeds": [0],
    }
    grid.update(changes)
    path.write_text(yaml.safe_dump(grid))
    return path


@pytest.mark.parametrize(
    "changes, fragments",
    [
        (
            {"losses": {"Typo": {"loss": {"NRALos": {"alpha": 4}}}}},
            ["losses.Typo", "'NRALos'", "Did you mean", "'NRALoss'"],
        ),
        (
            {"datasets": {"cub200": {"root": "data/not_here"}}},
            ["datasets.cub200", "data/not_here", "check_data=false"],
        ),
        ({"embedding_sizes": 64}, ["embedding_sizes", "not of type 'array'"]),
    ],
    ids=["unknown-loss", "missing-data-root", "malformed"],
)
def test_a_bad_grid_fails_at_load_time_naming_the_problem(tmp_path, changes, fragments):
    config = write_grid(tmp_path / "grid.yaml", **changes)
    proc = run_snakemake(
        "-n", "--snakefile", SNAKEFILE, "--cores", "1", "--configfile", config, cwd=tmp_path
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    for fragment in fragments:
        assert fragment in out, f"{fragment!r} not in:\n{out[-3000:]}"
    assert not (tmp_path / "runs").exists()


def test_profiles():
    local = yaml.safe_load((LOCAL_PROFILE / "config.yaml").read_text())
    assert local["keep-going"] is True and local["rerun-incomplete"] is True
    slurm = yaml.safe_load((REPO / "workflow" / "profiles" / "slurm" / "config.yaml").read_text())
    assert slurm["executor"] == "slurm"
    assert slurm["software-deployment-method"] == "apptainer"
    assert slurm["apptainer-args"] == "--nv"
    assert slurm["keep-going"] is True and slurm["retries"] >= 1
    train = slurm["set-resources"]["train"]
    assert "attempt" in str(train["runtime"]) and {"mem_mb", "cpus_per_task"} <= set(train)
    # every profile key is a snakemake option
    help_text = run_snakemake("--help", cwd=REPO).stdout
    for key in [*local, *slurm]:
        assert f"--{key}" in help_text, key


# ---------------------------------------------------------------- a real tiny grid


def cells(root: Path) -> list[Path]:
    return sorted(p.parent for p in (root / "runs").rglob("cell.yaml"))


@pytest.fixture(scope="module")
def finished_grid(tmp_path_factory):
    """2 losses x 2 sizes x 1 seed, interrupted (Ctrl-C) during the second run, then resumed."""
    work = tmp_path_factory.mktemp("grid")
    config = write_grid(work / "grid.yaml")
    args = ["--snakefile", SNAKEFILE, "--configfile", config, "--workflow-profile", LOCAL_PROFILE]
    log = open(work / "first.log", "w")
    first = subprocess.Popen(
        snakemake_cmd(*args, "--cores", "1"),
        cwd=work,
        env=env(),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    finished, interrupted = {}, None
    deadline = time.time() + 480

    def state() -> tuple[list[Path], list[Path]]:
        """Finished cells, and cells with a checkpoint but no metrics.json yet."""
        done = [c for c in cells(work) if (c / "metrics.json").exists()]
        busy = [
            c
            for c in cells(work)
            if not (c / "metrics.json").exists() and list(c.glob("checkpoints/state_*.pth"))
        ]
        return done, busy

    try:
        while time.time() < deadline and first.poll() is None:
            done, busy = state()
            if done and busy:
                # Freeze snakemake and its job, and look again: a job seen busy a moment
                # ago may have finished since. Only a frozen, still-busy job is interrupted.
                os.killpg(first.pid, signal.SIGSTOP)
                done, busy = state()
                if not (done and busy):
                    os.killpg(first.pid, signal.SIGCONT)
                    continue
                os.killpg(first.pid, signal.SIGINT)  # Ctrl-C: snakemake and its job
                os.killpg(first.pid, signal.SIGCONT)  # the pending SIGINT comes first
                first.wait(timeout=120)
                finished = {
                    c: (c / "metrics.json").stat().st_mtime_ns
                    for c in cells(work)
                    if (c / "metrics.json").exists()
                }
                interrupted = busy[0]
                break
            time.sleep(0.1)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()
        log.close()
    first_log = (work / "first.log").read_text()
    assert interrupted is not None, f"the run was not interrupted mid-way:\n{first_log[-3000:]}"
    second = run_snakemake(*args, "--cores", "2", cwd=work)
    return {
        "work": work,
        "finished": finished,
        "interrupted": interrupted,
        "first_log": first_log,
        "second": second,
    }


def test_resumed_grid_completes_without_redoing_finished_runs(finished_grid):
    second, work = finished_grid["second"], finished_grid["work"]
    assert second.returncode == 0, (second.stdout + second.stderr)[-4000:]
    runs = cells(work)
    assert len(runs) == 4
    for run in runs:
        for name in ("metrics.json", "manifest.json", "config.yaml", "train.log", "benchmark.tsv"):
            assert (run / name).is_file(), run / name
    assert finished_grid["finished"], "some run had finished before the interruption"
    for run, mtime in finished_grid["finished"].items():
        assert (run / "metrics.json").stat().st_mtime_ns == mtime, f"{run} was redone"
    # the interrupted run continued from its checkpoint instead of starting over
    manifest = json.loads((finished_grid["interrupted"] / "manifest.json").read_text())
    assert manifest["resumed_from_epoch"] >= 1, manifest
    # a later call reruns only the cells whose config changed in the grid
    grid = yaml.safe_load((work / "grid.yaml").read_text())
    grid["losses"]["NRA"]["loss"] = {"NRALoss": {"alpha": 2}}
    (work / "edited.yaml").write_text(yaml.safe_dump(grid))
    fourth = run_snakemake(
        "-n",
        "--snakefile",
        SNAKEFILE,
        "--configfile",
        work / "edited.yaml",
        "--cores",
        "1",
        cwd=work,
    )
    out = fourth.stdout + fourth.stderr
    assert fourth.returncode == 0, out[-3000:]
    assert job_count(out, "train") == 2 and "Params have changed" in out, out[-3000:]


def test_results_hold_the_runs_own_numbers(finished_grid):
    work = finished_grid["work"]
    results = work / "results"
    rows = (results / "runs.csv").read_text().splitlines()
    assert rows[0] == "dataset,loss,embedding_size,seed,split,stage,metric,value"
    table = (results / "mnist_subset" / "table.md").read_text()
    for run in cells(work):
        label, dim = run.parent.parent.name, run.parent.name
        metrics = json.loads((run / "metrics.json").read_text())
        for metric, value in metrics["trained"]["test"].items():
            line = f"mnist_subset,{label},{dim},0,test,trained,{metric},"
            (row,) = [r for r in rows if r.startswith(line)]
            assert float(row.rsplit(",", 1)[1]) == pytest.approx(value)
        # one seed: the table shows the value itself, in %
        section = table.split(f"## test split, embedding size {dim}")[1].split("##")[0]
        (line,) = [x for x in section.splitlines() if x.startswith(f"| {label} |")]
        r1 = f"{100 * metrics['trained']['test']['recall_at_1']:.2f}"
        mapr = f"{100 * metrics['trained']['test']['mean_average_precision_at_r']:.2f}"
        assert r1 in line and mapr in line, (line, r1, mapr)
        assert "| untrained network |" in section


def test_plots_are_valid_images(finished_grid):
    folder = finished_grid["work"] / "results" / "mnist_subset"
    for name in (
        "recall_at_k",
        "heatmap_map_at_r",
        "heatmap_recall_at_1",
        "training_curves",
        "scatter_2d",
    ):
        path = folder / f"{name}.png"
        with Image.open(path) as img:
            img.verify()
        with Image.open(path) as img:
            assert img.format == "PNG" and img.size[0] >= 300 and img.size[1] >= 150
            assert len(np.unique(np.asarray(img.convert("L")))) > 10, f"{name} is blank"
        assert path.stat().st_size > 5000


def test_report(finished_grid):
    work = finished_grid["work"]
    proc = run_snakemake(
        "--snakefile",
        SNAKEFILE,
        "--configfile",
        work / "grid.yaml",
        "--cores",
        "1",
        "--report",
        work / "report.html",
        cwd=work,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    html = (work / "report.html").read_text(errors="replace")
    for name in ("table.md", "recall_at_k.png", "scatter_2d.png", "runs.csv"):
        assert name in html, name


def test_pml_plugins_is_on_the_path():
    assert shutil.which("pml-plugins", path=env()["PATH"]), "pip install -e . first"
