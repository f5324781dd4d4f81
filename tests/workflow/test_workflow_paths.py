"""Where the workflow reads and writes: committed tables never stand in for training,
the papers' numbers are an input outside the output tree, git ignores what the main job
writes, and grid values with spaces or shell syntax reach the shell quoted."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml

from tests.workflow.test_workflow import REPO, SNAKEFILE, job_count, run_snakemake, write_grid

REFERENCE = REPO / "results" / "reference"


def test_committed_tables_do_not_make_a_fresh_clone_skip_training(tmp_path):
    """A clone with tables in results/ (newer than everything) and no runs/ still plans
    every training job: the targets are the run folders too."""
    shutil.copytree(REPO / "workflow", tmp_path / "workflow")
    shutil.copytree(REPO / "config", tmp_path / "config")
    shutil.copytree(REFERENCE, tmp_path / "results")
    for path in (tmp_path / "results").rglob("*"):
        path.touch()
    proc = run_snakemake("-n", "--cores", "all", cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    grid = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    cells = len(grid["losses"]) * len(grid["embedding_sizes"]) * len(grid["seeds"])
    assert job_count(out, "train") == cells, out[-3000:]
    # the committed reference holds a run of every cell of today's grid
    assert len(list((REFERENCE / "mnist_subset" / "runs").glob("*/*/seed*/manifest.json"))) == cells
    assert job_count(out, "aggregate") == 1, out[-3000:]


def test_reference_results_and_paper_numbers_are_outside_the_output_tree():
    grid = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    out = REPO / grid["results_dir"]
    assert REFERENCE.is_relative_to(out) and REFERENCE != out
    # the default grid writes <results_dir>/<dataset>/..., never into reference/
    assert "reference" not in grid["datasets"]
    assert (REFERENCE / "mnist_subset" / "table.md").is_file()
    for config in (REPO / "config").glob("*.yaml"):
        paper = yaml.safe_load(config.read_text()).get("paper_numbers")
        if paper:
            path = REPO / paper
            assert path.is_file(), (config.name, paper)
            assert not path.is_relative_to(out), f"{config.name}: {paper} lies in the output"


def test_git_ignores_what_the_main_job_writes_and_keeps_the_reference():
    def ignored(*paths: str) -> set[str]:
        proc = subprocess.run(
            ["git", "check-ignore", "--no-index", *paths],
            cwd=REPO,
            capture_output=True,
            text=True,
        )
        assert proc.returncode in (0, 1), proc.stderr
        return set(proc.stdout.split())

    written = [
        "runs/mnist_subset/NRA/64/seed0/metrics.json",
        "results/runs.csv",
        "results/summary.csv",
        "results/mnist_subset/table.md",
        "results/mnist_subset/recall_at_k.png",
        "results/mnist_subset/runs/NRA/64/seed0/manifest.json",
        ".snakemake/log/x.log",
    ]
    kept = [
        "results/README.md",
        "results/reference/runs.csv",
        "results/reference/mnist_subset/table.md",
        "workflow/resources/paper_numbers.csv",
    ]
    assert ignored(*written) == set(written)
    assert not ignored(*kept)


@pytest.mark.slow
def test_grid_paths_with_spaces_and_shell_syntax_are_quoted(tmp_path):
    """A real one-cell grid whose runs_dir holds a space and `$(...)`: the run lands in the
    folder of that literal name, and the command substitution never runs."""
    runs = "my runs $(touch INJECTED)"
    config = write_grid(
        tmp_path / "grid.yaml",
        runs_dir=runs,
        results_dir="my results",
        losses={"NRA": {"loss": {"NRALoss": {"alpha": 4}}}},
        embedding_sizes=[2],
    )
    grid = yaml.safe_load(config.read_text())
    grid["base"].update(epochs=1, iterations_per_epoch=5)
    grid["base"]["dataset"]["limit_per_class"] = 10
    config.write_text(yaml.safe_dump(grid))
    proc = run_snakemake(
        "--snakefile", SNAKEFILE, "--configfile", config, "--cores", "1", cwd=tmp_path
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert not (tmp_path / "INJECTED").exists(), "the shell ran a value of the grid"
    run = tmp_path / runs / "mnist_subset" / "NRA" / "2" / "seed0"
    assert (run / "metrics.json").is_file(), sorted(p.name for p in tmp_path.iterdir())
    assert (tmp_path / "my results" / "mnist_subset" / "table.md").is_file()
    assert {p.name for p in tmp_path.iterdir() if p.name.startswith("my")} == {"my results", runs}


def test_paper_numbers_path_with_a_space_is_quoted(tmp_path):
    paper = tmp_path / "paper numbers.csv"
    shutil.copy(REPO / "workflow" / "resources" / "paper_numbers.csv", paper)
    config = write_grid(tmp_path / "grid.yaml", paper_numbers=str(paper))
    proc = run_snakemake(
        "-n",
        "-p",
        "--snakefile",
        SNAKEFILE,
        "--configfile",
        config,
        "--cores",
        "1",
        "--forceall",
        cwd=tmp_path,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert f"--paper-numbers '{paper}'" in out, out[-3000:]
