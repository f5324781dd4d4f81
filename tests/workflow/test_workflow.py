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

from tests.workflow.forked_snakemake import Call, ForkedSnakemake

REPO = Path(__file__).resolve().parents[2]
SNAKEFILE = REPO / "workflow" / "Snakefile"
CONFIGS = sorted((REPO / "config").glob("*.yaml"))
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


@pytest.fixture(scope="module")
def snakemake():
    """Runs snakemake command lines in forks of one process that has imported torch and
    PML once (about five CPU seconds per call saved; see forked_snakemake)."""
    server = ForkedSnakemake(env(), cwd=REPO)
    yield server
    server.close()


def job_count(output: str, rule: str) -> int:
    match = re.search(rf"^{rule}\s+(\d+)\s*$", output, re.MULTILINE)
    return int(match.group(1)) if match else 0


def n_cells(grid: dict) -> int:
    """Training jobs: every cell, and with a search block every tuned loss's cells again
    (``<label>+tuned``)."""
    search = grid.get("search") or {}
    labels = len(grid["losses"]) + len(search.get("tune") or grid["losses"]) * bool(search)
    return len(grid["datasets"]) * labels * len(grid["embedding_sizes"]) * len(grid["seeds"])


def test_there_is_a_default_grid_and_paper_grids():
    names = [c.name for c in CONFIGS]
    assert "config.yaml" in names
    assert len(names) >= 2, names


@pytest.mark.slow
def test_dry_run_resolves_every_grid(snakemake, tmp_path):
    """`snakemake -n` at the repository root on the default grid (found without options:
    workflow/Snakefile, config/config.yaml) and on every paper grid, without data."""
    assert not (REPO / "Snakefile").exists(), "one Snakefile: workflow/Snakefile"
    calls = []
    for config in CONFIGS:
        args = ["-n", "--forceall", "--cores", "all", "--config", "check_data=false"]
        if config.name != "config.yaml":
            args += ["--configfile", config]
        calls.append(Call(args, REPO, tmp_path / f"{config.stem}.log"))
    for config, proc in zip(CONFIGS, snakemake.run_many(calls), strict=True):
        out = proc.stdout
        assert proc.returncode == 0, f"{config.name}:\n{out[-3000:]}"
        assert f"{config}" in out, f"{config.name} not loaded:\n{out[-3000:]}"
        grid = yaml.safe_load(config.read_text())
        assert job_count(out, "train") == n_cells(grid), f"{config.name}:\n{out[-3000:]}"
        assert job_count(out, "aggregate") == 1


def test_lint_is_clean(snakemake, tmp_path):
    args = ("--lint", "--cores", "1", "--config", "check_data=false")
    proc = snakemake.run(*args, cwd=REPO, log=tmp_path / "lint.log")
    out = proc.stdout
    assert "Lints for" not in out, out[-5000:]
    assert proc.returncode == 0, out[-3000:]


def test_snakefmt_is_clean():
    """The workflow is formatted as the Snakemake catalog expects (snakefmt --check)."""
    proc = subprocess.run(
        [sys.executable, "-m", "snakefmt", "--check", str(REPO / "workflow")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]


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
def test_a_bad_grid_fails_at_load_time_naming_the_problem(snakemake, tmp_path, changes, fragments):
    config = write_grid(tmp_path / "grid.yaml", **changes)
    args = ("-n", "--snakefile", SNAKEFILE, "--cores", "1", "--configfile", config)
    proc = snakemake.run(*args, cwd=tmp_path, log=tmp_path / "snakemake.log")
    out = proc.stdout
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


def grid_state(root: Path) -> tuple[list[Path], list[Path]]:
    """Finished cells (metrics.json), and busy ones: a complete checkpoint (a state file,
    written last) and no metrics.json yet."""
    done, busy = [], []
    for cell in cells(root):
        if (cell / "metrics.json").exists():
            done.append(cell)
        elif list(cell.glob("checkpoints/state_*.pth")):
            busy.append(cell)
    return done, busy


def group_members(pgid: int) -> dict[int, str] | None:
    """pid -> scheduler state of every process in the process group (None without /proc)."""
    proc = Path("/proc")
    if not proc.is_dir():
        return None
    members = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # exited meanwhile
        if int(fields[2]) == pgid:
            members[int(entry.name)] = fields[0]
    return members


def freeze(pgid: int, timeout: float = 60) -> None:
    """SIGSTOP the process group and return once none of its processes runs. A signal is
    delivered asynchronously (a process in a system call stops when it returns), and a
    process forked meanwhile did not get it, so the signal is repeated until every member
    is stopped (T) or dead (Z, X)."""
    deadline = time.time() + timeout
    while True:
        os.killpg(pgid, signal.SIGSTOP)
        members = group_members(pgid)
        if members is None:  # no /proc: give the signal ample time
            time.sleep(1.0)
            return
        if all(state in "TtZX" for state in members.values()):
            return
        if time.time() > deadline:
            raise AssertionError(f"process group {pgid} did not stop: {members}")
        time.sleep(0.01)


@pytest.fixture(scope="module")
def finished_grid(tmp_path_factory, snakemake):
    """2 losses x 1 size (2, which has the scatter plot) x 1 seed, one job at a time;
    interrupted (Ctrl-C) while a run has written a checkpoint and not yet its metrics,
    after the other run finished; then resumed to the end. Then, side by side: a dry run
    of the grid with NRA's config edited, and the report. (Tables and plots over several
    sizes and seeds: tests/experiment/test_aggregate.py; the expansion of every grid:
    test_dry_run_resolves_every_grid.)

    One job at a time, a run with a checkpoint means that snakemake has seen the run
    before it finish. With two, a job whose metrics.json is written may still be exiting
    when the Ctrl-C comes; snakemake then counts it as failed and removes its outputs."""
    work = tmp_path_factory.mktemp("grid")
    config = write_grid(work / "grid.yaml", embedding_sizes=[2])
    args = ["--snakefile", SNAKEFILE, "--configfile", config, "--workflow-profile", LOCAL_PROFILE]
    log = open(work / "first.log", "w")
    first = subprocess.Popen(
        snakemake_cmd(*args, "--cores", "1"),
        cwd=work,
        env=env(),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: snakemake and its jobs
    )
    finished, interrupted = {}, None
    deadline = time.time() + 480
    try:
        # No timing: the run is interrupted at an observed state. Whenever the files show
        # a finished run and a busy one, snakemake and its jobs are frozen and the files
        # are read again, since a job seen busy a moment ago may have finished since (its
        # manifest would then say resumed_from_epoch 0). Only a frozen, still-busy run is
        # interrupted; otherwise all continue, and the next busy run is tried.
        while time.time() < deadline and first.poll() is None:
            done, busy = grid_state(work)
            if done and busy:
                freeze(first.pid)
                done, busy = grid_state(work)
                if done and busy:
                    os.killpg(first.pid, signal.SIGINT)  # Ctrl-C: snakemake and its jobs
                    os.killpg(first.pid, signal.SIGCONT)  # the pending SIGINT comes first
                    first.wait(timeout=120)
                    finished = {
                        c: (c / "metrics.json").stat().st_mtime_ns
                        for c in cells(work)
                        if (c / "metrics.json").exists()
                    }
                    interrupted = busy
                    break
                os.killpg(first.pid, signal.SIGCONT)
            time.sleep(0.05)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGCONT)
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()
        log.close()
    first_log = (work / "first.log").read_text()
    assert interrupted is not None, f"the run was not interrupted mid-way:\n{first_log[-3000:]}"
    second = snakemake.run(*args, "--cores", "2", cwd=work, log=work / "second.log")
    edited = yaml.safe_load((work / "grid.yaml").read_text())
    edited["losses"]["NRA"]["loss"] = {"NRALoss": {"alpha": 2}}
    (work / "edited.yaml").write_text(yaml.safe_dump(edited))
    dry_run, report = snakemake.run_many(
        [
            Call(
                ["-n", "--snakefile", SNAKEFILE, "--configfile", work / "edited.yaml"]
                + ["--cores", "1"],
                work,
                work / "edited.log",
            ),
            Call(
                ["--snakefile", SNAKEFILE, "--configfile", work / "grid.yaml", "--cores", "1"]
                + ["--report", work / "report.html"],
                work,
                work / "report.log",
            ),
        ]
    )
    return {
        "work": work,
        "finished": finished,
        "interrupted": interrupted,
        "first_log": first_log,
        "second": second,
        "edited_dry_run": dry_run,
        "report": report,
    }


@pytest.mark.slow
def test_resumed_grid_completes_without_redoing_finished_runs(finished_grid):
    second, work = finished_grid["second"], finished_grid["work"]
    assert second.returncode == 0, (second.stdout + second.stderr)[-4000:]
    runs = cells(work)
    assert len(runs) == 2
    for run in runs:
        for name in ("metrics.json", "manifest.json", "config.yaml", "train.log", "benchmark.tsv"):
            assert (run / name).is_file(), run / name
    assert finished_grid["finished"], "some run had finished before the interruption"
    for run, mtime in finished_grid["finished"].items():
        assert (run / "metrics.json").stat().st_mtime_ns == mtime, f"{run} was redone"
    # the interrupted runs continued from their checkpoints instead of starting over
    for run in finished_grid["interrupted"]:
        manifest = json.loads((run / "manifest.json").read_text())
        assert manifest["resumed_from_epoch"] >= 1, manifest
    # a later call reruns only the cells whose config changed in the grid
    dry_run = finished_grid["edited_dry_run"]
    out = dry_run.stdout
    assert dry_run.returncode == 0, out[-3000:]
    assert job_count(out, "train") == 1 and "Params have changed" in out, out[-3000:]


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_report(finished_grid):
    work, proc = finished_grid["work"], finished_grid["report"]
    assert proc.returncode == 0, proc.stdout[-3000:]
    html = (work / "report.html").read_text(errors="replace")
    for name in ("table.md", "recall_at_k.png", "scatter_2d.png", "runs.csv"):
        assert name in html, name


def test_pml_plugins_is_on_the_path():
    assert shutil.which("pml-plugins", path=env()["PATH"]), "pip install -e . first"
