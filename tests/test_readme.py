"""The README's command blocks, run as written (those that need no data, GPU or network).

The fenced blocks are parsed out of README.md as it stands. Every block is either run by a
test here (``RUN_HERE`` maps a fragment of the block to the test that runs it) or carries,
on the line right above it, a ``<!-- not run in tests: why -->`` marker;
``test_every_block_is_run_or_marked`` fails on a block with neither. Commands run in a
subprocess (``bash -c``) with this interpreter's environment first on PATH; the setup steps
of the install-and-run lines (``python3 -m venv``, activating it, ``pip install``) are left
out, because the environment running the tests is already that environment.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

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
#: the Markdown files whose relative links must resolve
LINKED = [README, REPO / "results" / "README.md", *sorted((REPO / "docs" / "methods").glob("*.md"))]
#: "a newcomer reads it in five minutes"
README_MAX_BYTES = 10_240


def blocks() -> list[dict]:
    """Every fenced block of README.md: its language, code and marker (or None)."""
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
    assert len(found) == 1, f"one {lang or 'plain'} block with {fragment!r} in README.md: {found}"
    return found[0]


def scratch(tmp_path: Path) -> Path:
    """A copy of what the commands read (workflow/, config/, examples/) to run them in."""
    for name in ("workflow", "config", "examples"):
        shutil.copytree(REPO / name, tmp_path / name)
    return tmp_path


def run(cmd: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "-c", cmd], cwd=cwd, env=env(), capture_output=True, text=True, timeout=timeout
    )


#: a fragment of each block that a test runs -> that test
RUN_HERE = {
    "snakemake --cores all": "test_main_job_plans_the_whole_grid",
    "snakemake -n --configfile": "test_paper_grid_is_planned_without_its_data",
    "config/tuned.yaml": "test_tuned_grid_is_planned",
    "python -m pytest": "test_ci_runs_the_readme_test_command",
    "from pml_plugins.losses": "test_python_blocks_run",
    "from pml_plugins import registry": "test_python_blocks_run",
    "[project.entry-points.pml_plugins]": "test_entry_point_block",
    "pml-plugins train examples": "test_one_experiment",
    "pml-plugins train CONFIG": "test_cli_synopsis",
}
#: a fragment of a block marked as not run whose content a test still checks -> that test
CHECKED = {
    "diff results/": "test_compare_with_the_reference",
}


def test_every_block_is_run_or_marked():
    found = blocks()
    assert len(found) >= len(RUN_HERE), f"README.md has {len(found)} fenced blocks"
    for block in found:
        keys = [key for key in RUN_HERE if key in block["code"]]
        if block["marker"]:
            assert not keys, f"a block marked as not run is run by {keys}:\n{block['code']}"
        else:
            assert len(keys) == 1, f"README block run by {keys or 'no test'}:\n{block['code']}"
    for key, test in RUN_HERE.items():
        assert callable(globals().get(test)), f"RUN_HERE names {test}, which does not exist"
        assert any(key in b["code"] for b in found), f"no README block holds {key!r} any more"
    for key, test in CHECKED.items():
        assert callable(globals().get(test)), f"CHECKED names {test}, which does not exist"
        marked = [b for b in found if key in b["code"] and b["marker"]]
        assert len(marked) == 1, f"one block marked as not run holds {key!r}: {marked}"


@pytest.mark.parametrize("block", [b for b in blocks() if b["marker"]], ids=lambda b: b["marker"])
def test_marked_blocks_say_why(block):
    assert len(block["marker"].split()) >= 2, block["marker"]


def test_main_job_plans_the_whole_grid(tmp_path):
    """The main job's command as a dry run (the grid itself runs in tests/workflow): in a
    fresh copy of the workflow, without run folders, it plans one training job per cell of
    the default grid (losses x embedding sizes x seeds), the number the README states, and
    the aggregation."""
    grid = yaml.safe_load((REPO / "config/config.yaml").read_text())
    cells = len(grid["losses"]) * len(grid["embedding_sizes"]) * len(grid["seeds"])
    assert f"all {cells} runs of the default grid" in README.read_text()
    (cmd,) = commands(by_content("snakemake --cores all")["code"])
    assert cmd == "snakemake --cores all"
    proc = run(cmd.replace("snakemake", "snakemake -n", 1), scratch(tmp_path))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert re.search(rf"^train\s+{cells}\s*$", out, re.MULTILINE), out[-3000:]
    assert re.search(r"^aggregate\s+1\s*$", out, re.MULTILINE), out[-3000:]


def test_paper_grid_is_planned_without_its_data(tmp_path):
    """The dry run of a paper grid, as written, in a fresh copy of the workflow: without the
    data it plans every cell of that grid (data sets x losses x sizes x seeds)."""
    import yaml

    (cmd,) = commands(by_content("snakemake -n --configfile")["code"])
    assert " -n " in f" {cmd} ", cmd
    configfile = shlex.split(cmd)[shlex.split(cmd).index("--configfile") + 1]
    grid = yaml.safe_load((REPO / configfile).read_text())
    cells = 1
    for key in ("datasets", "losses", "embedding_sizes", "seeds"):
        cells *= len(grid[key])
    proc = run(cmd, scratch(tmp_path))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert re.search(rf"^train\s+{cells}\s*$", out, re.MULTILINE), (cells, out[-3000:])
    assert not (tmp_path / "runs").exists() and not (tmp_path / "results").exists()


def test_tuned_grid_is_planned(tmp_path):
    """The fair comparison's command as a dry run in a fresh copy of the workflow: one
    study per tuned loss (search, report, fold ensemble), the untuned and the tuned cells
    (the whole protocol runs, tiny, in tests/workflow/test_search_workflow.py)."""
    (cmd,) = commands(by_content("config/tuned.yaml")["code"])
    configfile = shlex.split(cmd)[shlex.split(cmd).index("--configfile") + 1]
    grid = yaml.safe_load((REPO / configfile).read_text())
    studies = len(grid["search"].get("tune") or grid["losses"])
    runs = len(grid["embedding_sizes"]) * len(grid["seeds"])
    proc = run(cmd.replace("snakemake", "snakemake -n", 1), scratch(tmp_path))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    expected = {
        "train": (len(grid["losses"]) + studies) * runs,
        "search": studies * grid["search"]["workers"],
        "search_report": studies,
        "ensemble": studies,
        "aggregate": 1,
    }
    for rule, n in expected.items():
        assert re.search(rf"^{rule}\s+{n}\s*$", out, re.MULTILINE), (rule, n, out[-3000:])


def test_ci_runs_the_readme_test_command():
    """.ci/run installs what the README's test command installs and ends with the rest of
    that command, verbatim."""
    code = by_content("python -m pytest")["code"].strip()
    assert "\n" not in code, "the test command is one line"
    venv, activate, install, *test = code.split(" && ")
    assert (venv, activate) == ("python3 -m venv .venv", ". .venv/bin/activate")
    assert install == 'pip install -e ".[dev,workflow]"'
    assert test[:3] == ["ruff check .", "ruff format --check .", "python -m pytest"], test
    ci = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    for step in (venv, activate, install):
        assert step in ci, f".ci/run lacks {step!r}"
    assert ci.index(venv) < ci.index(activate) < ci.index(install)
    assert ci[-1] == " && ".join(test), f"README: {' && '.join(test)!r}, .ci/run: {ci[-1]!r}"


def test_install_lines_name_existing_extras():
    """Every ``pip install -e ".[...]"`` of the README, run or not, names extras that
    pyproject.toml defines."""
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    named = re.findall(r'pip install -e "\.\[([\w,-]+)\]"', README.read_text())
    assert len(named) >= 3, named
    for group in named:
        for extra in group.split(","):
            assert extra in extras, f"README installs the extra [{extra}], pyproject has {extras}"


def test_compare_with_the_reference():
    """Not run (it needs the main job's output), but checked: the comparison's reference is
    committed; the file compared with it is where the main job writes it, ignored by git
    like the run folders."""
    (cmd,) = commands(by_content("diff results/")["code"])
    diff, mine, reference = shlex.split(cmd)
    assert diff == "diff"
    assert (REPO / reference).is_file(), reference
    assert mine == reference.replace("results/reference/", "results/", 1)
    tracked = subprocess.run(
        ["git", "ls-files", "--error-unmatch", reference], cwd=REPO, capture_output=True
    )
    assert tracked.returncode == 0, f"{reference} is not committed"
    ignored = subprocess.run(
        ["git", "check-ignore", "--no-index", mine, "results/runs.csv", "runs/default/x"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert ignored.stdout.split() == [mine, "results/runs.csv", "runs/default/x"], ignored
    kept = subprocess.run(
        ["git", "check-ignore", "--no-index", reference, "results/README.md"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert kept.returncode == 1 and not kept.stdout, f"ignored by git: {kept.stdout}"


def test_python_blocks_run(tmp_path):
    """Every python block compiles; the unmarked ones run, each in a namespace of its own
    (one interpreter for all of them, so torch is imported once)."""
    python = [b for b in blocks() if b["lang"] == "python"]
    assert len(python) >= 2
    for i, block in enumerate(python):
        compile(block["code"], f"README python block {i}", "exec")
    runner = tmp_path / "run_blocks.py"
    runner.write_text(
        textwrap.dedent(
            """
            import sys
            for path in sys.argv[1:]:
                print("block", path, flush=True)
                code = open(path).read()
                exec(compile(code, path, "exec"), {"__name__": "__main__"})
            """
        )
    )
    paths = []
    for i, block in enumerate(b for b in python if not b["marker"]):
        path = tmp_path / f"block{i}.py"
        path.write_text(block["code"])
        paths.append(str(path))
    proc = subprocess.run(
        [sys.executable, str(runner), *paths],
        cwd=tmp_path,
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]


def test_entry_point_block():
    """The entry-point example is valid TOML in the group the registry reads, with
    ``module:attribute`` targets and names that are ``Name`` or ``kind.Name``."""
    from pml_plugins import registry

    table = tomllib.loads(by_content("[project.entry-points", "toml")["code"])
    points = table["project"]["entry-points"][registry.ENTRY_POINT_GROUP]
    assert points
    for name, target in points.items():
        assert re.fullmatch(r"[\w.]+:\w+", target), target
        kind, _, _ = name.rpartition(".")
        assert not kind or kind in registry.KINDS, name


def test_one_experiment(tmp_path):
    """The one-experiment command, as written, in a copy of examples/: a finished run
    folder where it says, and the metrics printed."""
    (cmd,) = commands(by_content("pml-plugins train examples")["code"])
    proc = run(cmd, scratch(tmp_path))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    out = tmp_path / shlex.split(cmd)[-1]
    assert (out / "metrics.json").is_file() and (out / "manifest.json").is_file()
    assert "mean_average_precision_at_r" in proc.stdout


def test_cli_synopsis():
    """Every command of the synopsis exists and takes the options it shows."""
    lines = by_content("pml-plugins train CONFIG", "")["code"].splitlines()
    assert len(lines) >= 5
    for line in lines:
        words = line.split("#")[0].split()
        assert words[0] == "pml-plugins", line
        proc = run(f"pml-plugins {words[1]} --help", REPO, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        for option in (w.strip("[]") for w in words if w.strip("[]").startswith("--")):
            assert option in proc.stdout, (words[1], option)


@pytest.mark.parametrize("page", LINKED, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(page):
    """The README's links (and those of the pages it sends a newcomer to) point at files
    of the repository."""
    links = re.findall(r"\]\(([^)\s]+)\)", page.read_text())
    local = [link.split("#")[0] for link in links if not re.match(r"[a-z]+:", link)]
    assert local or page != README
    for link in local:
        assert (page.parent / link).exists(), f"{page.relative_to(REPO)} links to {link}"


def test_readme_is_short():
    size = len(README.read_bytes())
    assert size <= README_MAX_BYTES, f"README.md is {size} bytes: move detail to docs/"
    for page in ("docs/methods/README.md", "docs/workflow.md", "docs/reliability.md"):
        assert page in README.read_text(), f"README.md does not link {page}"
