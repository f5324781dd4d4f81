"""The README's command blocks, run as written (those that need no data, GPU or network).

Every fenced block of README.md is either run here or carries, right above it, a
``<!-- not run in tests: why -->`` marker; a new block without either fails
``test_every_block_is_run_or_marked``.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
BIN = Path(sys.executable).parent
MARKER = re.compile(r"<!-- not run in tests: (.+?) -->")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
#: setup steps of the install-and-run lines: the test environment is already installed
SETUP = re.compile(r"^(python3 -m venv \.venv|\. \.venv/bin/activate|pip install .*)$")


def blocks() -> list[dict]:
    text = README.read_text()
    out = []
    for m in FENCE.finditer(text):
        before = text[: m.start()].rstrip().splitlines()
        marker = MARKER.fullmatch(before[-1].strip()) if before else None
        out.append({"lang": m.group(1), "code": m.group(2), "marker": marker and marker.group(1)})
    return out


def env() -> dict[str, str]:
    out = dict(os.environ)
    out["PATH"] = f"{BIN}{os.pathsep}{out.get('PATH', '')}"
    out["OMP_NUM_THREADS"] = "1"
    return out


def commands(code: str) -> list[str]:
    """The block's commands, its setup steps (venv, activate, pip install) left out."""
    out = []
    for line in code.replace("\\\n", " ").splitlines():
        line = line.split("  #")[0].strip()
        if line:
            out.extend(p for p in (s.strip() for s in line.split(" && ")) if not SETUP.match(p))
    return out


def by_content(fragment: str, lang: str = "bash") -> dict:
    found = [b for b in blocks() if b["lang"] == lang and fragment in b["code"]]
    assert len(found) == 1, f"one {lang} block with {fragment!r} in README.md: {len(found)}"
    return found[0]


def scratch(tmp_path: Path) -> Path:
    """A copy of what the commands read (workflow/, examples/) to run them in."""
    for name in ("workflow", "examples"):
        shutil.copytree(REPO / name, tmp_path / name)
    return tmp_path


def run(cmd: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "-c", cmd], cwd=cwd, env=env(), capture_output=True, text=True, timeout=timeout
    )


RUN_HERE = {
    "snakemake --cores all": "test_main_job_plans_the_whole_grid",
    "python -m pytest": "test_ci_runs_the_readme_test_command",
    "pml-plugins train examples": "test_one_experiment",
    "from pml_plugins.losses": "test_python_blocks_run",
    "from pml_plugins import registry": "test_python_blocks_run",
    "[project.entry-points.pml_plugins]": "test_entry_point_block_is_valid_toml",
    "pml-plugins train CONFIG": "test_cli_synopsis",
    "diff results/": "test_compare_with_the_reference",
}


def test_every_block_is_run_or_marked():
    unhandled = [
        b["code"][:80]
        for b in blocks()
        if not b["marker"] and not any(key in b["code"] for key in RUN_HERE)
    ]
    assert not unhandled, f"README blocks neither run by a test nor marked: {unhandled}"
    assert len(blocks()) >= 8


def test_main_job_plans_the_whole_grid(tmp_path):
    """The main job's command, as a dry run (the real grid runs in tests/workflow): on a
    fresh copy it plans all 54 training jobs."""
    (cmd,) = commands(by_content("snakemake --cores all")["code"])
    assert cmd == "snakemake --cores all"
    proc = run(cmd.replace("snakemake", "snakemake -n", 1), scratch(tmp_path))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert re.search(r"^train\s+54\s*$", out, re.MULTILINE), out[-3000:]


def test_ci_runs_the_readme_test_command():
    (install, *test) = by_content("python -m pytest")["code"].strip().split(" && ", 3)[2:]
    assert install == 'pip install -e ".[dev,workflow]"'
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert install in ci
    assert test == [ci[-1]], f"README: {test}, .ci/run: {ci[-1]}"


def test_one_experiment(tmp_path):
    (cmd,) = commands(by_content("pml-plugins train examples")["code"])
    proc = run(cmd, scratch(tmp_path))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    out = tmp_path / shlex.split(cmd)[-1]
    assert (out / "metrics.json").is_file() and (out / "manifest.json").is_file()
    assert "mean_average_precision_at_r" in proc.stdout


def test_python_blocks_run(tmp_path):
    python = [b for b in blocks() if b["lang"] == "python"]
    assert len(python) >= 2
    for i, block in enumerate(python):
        script = tmp_path / f"block{i}.py"
        script.write_text(block["code"])
        proc = subprocess.run(
            [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True
        )
        assert proc.returncode == 0, f"{block['code']}\n{proc.stderr[-3000:]}"


def test_entry_point_block_is_valid_toml():
    group = tomllib.loads(by_content("[project.entry-points", "toml")["code"])
    points = group["project"]["entry-points"]["pml_plugins"]
    assert all(":" in target for target in points.values())


def test_cli_synopsis():
    """Every command of the synopsis exists and takes the options it shows."""
    for line in by_content("pml-plugins train CONFIG", "")["code"].splitlines():
        words = line.split("#")[0].split()
        command = words[1]
        proc = run(f"pml-plugins {command} --help", REPO, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        for option in (w.strip("[]") for w in words if w.strip("[]").startswith("--")):
            assert option in proc.stdout, (command, option)


def test_compare_with_the_reference():
    """The comparison names the reference tables that are committed."""
    (cmd,) = commands(by_content("diff results/")["code"])
    _, mine, reference = shlex.split(cmd)
    assert (REPO / reference).is_file(), reference
    assert mine == reference.replace("results/reference/", "results/", 1)


@pytest.mark.parametrize("block", [b for b in blocks() if b["marker"]], ids=lambda b: b["marker"])
def test_marked_blocks_say_why(block):
    assert len(block["marker"]) > 10
