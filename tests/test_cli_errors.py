"""Every bad input to ``pml-plugins`` ends in one line, ``pml-plugins: error: ...``, exit
status 2, no traceback and nothing written (docs/reliability.md, "Bad input").

Each case runs in this process through ``cli.main`` (an exception escaping it fails the
test, as a traceback would); the cases marked ``SUBPROCESS`` also run through
``python -m pml_plugins.cli`` in a child process, all at once, to check the real exit
status and stderr (and, for the entry-point clash, a separate interpreter whose
``sys.path`` holds the clashing package).
"""

from __future__ import annotations

import copy
import errno
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from pml_plugins import registry
from pml_plugins.cli import main

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = yaml.safe_load((ROOT / "examples" / "default.yaml").read_text())
PREFIX = "pml-plugins: error:"


@dataclass(frozen=True)
class Case:
    """One bad input: ``make(folder)`` writes what it needs into ``folder`` and returns
    the command line; ``expect`` is a fragment of the one error line."""

    id: str
    make: Callable[[Path], list[str]]
    expect: str


def _config(folder: Path, name: str = "bad.yaml", **changes: object) -> Path:
    """examples/default.yaml with ``changes`` (keys as dotted paths with ``__``)."""
    raw = copy.deepcopy(DEFAULT)
    for dotted, value in changes.items():
        node = raw
        *parents, last = dotted.split("__")
        for part in parents:
            node = node[part]
        node[last] = value
    path = folder / name
    path.write_text(yaml.safe_dump(raw))
    return path


def _train(**changes: object) -> Callable[[Path], list[str]]:
    def make(folder: Path) -> list[str]:
        return ["train", str(_config(folder, **changes)), "--out", str(folder / "out")]

    return make


def _train_set(*items: str) -> Callable[[Path], list[str]]:
    def make(folder: Path) -> list[str]:
        sets = [arg for item in items for arg in ("--set", item)]
        return ["train", str(_config(folder)), "--out", str(folder / "out"), *sets]

    return make


def _train_file(content: bytes, *extra: str) -> Callable[[Path], list[str]]:
    def make(folder: Path) -> list[str]:
        path = folder / "bad.yaml"
        path.write_bytes(content)
        return ["train", str(path), "--out", str(folder / "out"), *extra]

    return make


def _train_without_data(folder: Path) -> list[str]:
    config = _config(folder, dataset={"name": "cub200", "root": str(folder / "no data")})
    return ["train", str(config), "--out", str(folder / "out")]


def _train_folder(folder: Path) -> list[str]:
    (folder / "configs").mkdir()
    return ["train", str(folder / "configs"), "--out", str(folder / "out")]


def _finished_run(folder: Path, metrics: bytes) -> Path:
    """A run folder as ``train`` leaves it, with ``metrics`` as its metrics.json."""
    run = folder / "runs" / "mnist_subset" / "MultiSimilarityLoss" / "64" / "seed0"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(DEFAULT))
    (run / "metrics.json").write_bytes(metrics)
    return run


def _aggregate(metrics: bytes) -> Callable[[Path], list[str]]:
    def make(folder: Path) -> list[str]:
        _finished_run(folder, metrics)
        return ["aggregate", str(folder / "runs"), "--out", str(folder / "out")]

    return make


def _evaluate(metrics: bytes) -> Callable[[Path], list[str]]:
    def make(folder: Path) -> list[str]:
        return ["evaluate", str(_finished_run(folder, metrics))]

    return make


def _evaluate_file(folder: Path) -> list[str]:
    return ["evaluate", str(_config(folder))]


def _out_is_a_file(command: str) -> Callable[[Path], list[str]]:
    def make(folder: Path) -> list[str]:
        taken = folder / "taken.txt"
        taken.write_text("not a folder\n")
        if command == "train":
            return ["train", str(_config(folder, epochs=0)), "--out", str(taken)]
        _finished_run(folder, GOOD_METRICS)
        return ["aggregate", str(folder / "runs"), "--out", str(taken / "results")]

    return make


GOOD_METRICS = json.dumps(
    {"untrained": {"test": {"precision_at_1": 0.5}}, "trained": {"test": {"precision_at_1": 0.9}}}
).encode()

CASES = [
    Case(
        "lr-nan",
        _train(optimizers__trunk={"Adam": {"lr": float("nan")}}),
        "optimizers.trunk.Adam.lr: nan is not a finite number",
    ),
    Case("lr-negative", _train(optimizers__embedder={"Adam": {"lr": -0.1}}), "rate: -0.1"),
    Case(
        "lr-yaml-string",
        _train(optimizers__trunk={"Adam": {"lr": "1e-3"}}),
        "optimizers.trunk.Adam.lr: '1e-3' is a str, not a number",
    ),
    Case("seed-2**32", _train(seed=2**32), "seed: 4294967296 is greater than the maximum"),
    Case(
        "kwarg-string-for-number",
        _train(loss={"MultiSimilarityLoss": {"alpha": "x"}}),
        "loss.MultiSimilarityLoss.alpha: 'x' is a str, not a number",
    ),
    Case(
        "kwarg-list-for-number",
        _train(miner={"MultiSimilarityMiner": {"epsilon": [0.1, 0.2]}}),
        "miner.MultiSimilarityMiner.epsilon: [0.1, 0.2] is a list, not a number",
    ),
    Case(
        "kwarg-string-for-flag",
        _train(loss={"TripletMarginLoss": {"swap": "yes"}}, miner=None),
        "loss.TripletMarginLoss.swap: 'yes' is not true or false",
    ),
    Case(
        "kwarg-rejected-by-constructor",
        _train(loss={"ArcFaceLoss": {"distance": "LpDistance"}}, miner=None),
        "loss: ArcFaceLoss cannot be built",
    ),
    Case(
        "lr-infinite",
        _train(optimizers__trunk={"Adam": {"lr": float("inf")}}),
        "optimizers.trunk.Adam.lr: inf is not a finite number",
    ),
    Case(
        "lr-nan-sgd",  # SGD's constructor, unlike Adam's, lets a NaN learning rate through
        _train(optimizers__trunk={"SGD": {"lr": float("nan")}}),
        "optimizers.trunk.SGD.lr: nan is not a finite number",
    ),
    Case(
        "betas-nan",
        _train(optimizers__trunk={"Adam": {"lr": 0.001, "betas": [0.9, float("nan")]}}),
        "optimizers.trunk.Adam.betas: [0.9, nan] holds nan",
    ),
    Case(
        "scheduler-kwarg-type",  # StepLR takes any step_size and fails at its first step
        _train(lr_schedulers={"trunk": {"StepLR": {"step_size": "x"}}}),
        "lr_schedulers.trunk: StepLR cannot be built from these arguments",
    ),
    Case(
        "loss-embedding-size-not-the-model's",
        _train(loss={"ProxyAnchorLoss": {"embedding_size": 32}}, miner=None),
        "loss.ProxyAnchorLoss.embedding_size: 32, but model.embedding_size is 64",
    ),
    Case(
        "loss-num-classes-too-few",
        _train(loss={"ProxyAnchorLoss": {"num_classes": 2}}, miner=None),
        "loss.ProxyAnchorLoss.num_classes: 2, but the training split has 5 classes",
    ),
    Case(
        "miner-names-a-loss",
        _train(miner="ContrastiveLoss"),
        "miner: unknown miner 'ContrastiveLoss' ('ContrastiveLoss' is registered, but as a loss)",
    ),
    Case("data-folder-missing", _train_without_data, "cub200: the data set was not found"),
    Case(
        "sampler-m-string",
        _train(sampler={"MPerClassSampler": {"m": "x"}}),
        "sampler.MPerClassSampler.m: 'x' is not allowed",
    ),
    Case("set-into-a-number", _train_set("epochs.x=1"), "epochs is 5, not a mapping"),
    Case("set-without-key", _train_set("=1"), "--set '=1': write key.path=value"),
    Case("set-without-value", _train_set("epochs"), "--set 'epochs': write key.path=value"),
    Case("set-empty-key-part", _train_set("model..size=1"), "write key.path=value"),
    Case("set-bad-yaml", _train_set("epochs=[1"), "the value '[1' is not valid YAML"),
    Case("binary-config", _train_file(bytes(range(256)) * 4), "not a text file"),
    Case("config-yaml-list", _train_file(b"- loss\n- epochs\n"), "holds a list"),
    Case(
        "config-yaml-list-with-set",
        _train_file(b"- loss\n", "--set", "epochs=1"),
        "holds a list",
    ),
    Case("config-yaml-scalar", _train_file(b"42\n"), "holds a number"),
    Case("config-is-a-folder", _train_folder, "is a folder; pass the path of an experiment"),
    Case("aggregate-truncated-metrics", _aggregate(GOOD_METRICS[:40]), "metrics.json is damaged"),
    Case("aggregate-empty-metrics", _aggregate(b""), "metrics.json is empty"),
    Case("aggregate-metrics-not-an-object", _aggregate(b"[1, 2]\n"), "does not hold a run's"),
    Case(
        "aggregate-metrics-split-not-a-mapping",
        _aggregate(b'{"trained": {"test": [1]}}'),
        "does not hold a run's metrics (trained.test is [1], not a mapping of metric names",
    ),
    Case(
        "aggregate-metric-not-a-number",
        _aggregate(b'{"trained": {"test": {"precision_at_1": "x"}}}'),
        "(trained.test.precision_at_1 is 'x', not a number)",
    ),
    Case("evaluate-truncated-metrics", _evaluate(GOOD_METRICS[:40]), "metrics.json is damaged"),
    Case("evaluate-metrics-without-trained", _evaluate(b"{}\n"), "does not hold a run's"),
    Case(
        "evaluate-metrics-without-untrained",
        _evaluate(b'{"trained": {"test": {"precision_at_1": 0.9}}}'),
        "does not hold a run's metrics (no 'untrained' block)",
    ),
    Case("evaluate-a-file", _evaluate_file, "is a file, not a run folder"),
    Case("train-out-is-a-file", _out_is_a_file("train"), "taken.txt: a file is in the way"),
    Case("aggregate-out-in-a-file", _out_is_a_file("aggregate"), "a file is in the way of a"),
]
#: cases also run in a child process (a few of each kind: config, --set, files)
SUBPROCESS = ("lr-nan", "set-bad-yaml", "binary-config", "aggregate-truncated-metrics")


def _listing(folder: Path) -> dict[str, int]:
    return {
        str(p.relative_to(folder)): p.stat().st_size if p.is_file() else -1
        for p in sorted(folder.rglob("*"))
    }


def _check_one_error_line(err: str, expect: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(PREFIX), err
    assert expect in lines[0], err
    assert "Traceback" not in err


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_one_error_line_exit_2_nothing_written(case, tmp_path, capsys):
    argv = case.make(tmp_path)
    before = _listing(tmp_path)
    assert main(argv) == 2
    captured = capsys.readouterr()
    _check_one_error_line(captured.err, case.expect)
    assert not (tmp_path / "out").exists()
    assert _listing(tmp_path) == before


def _clashing_plugin(folder: Path) -> Path:
    """An installed distribution whose entry point is named like PML's ContrastiveLoss."""
    site = folder / "site"
    (site / "clash_dml-0.1.dist-info").mkdir(parents=True)
    (site / "clash_dml.py").write_text(
        textwrap.dedent(
            """
            from pytorch_metric_learning import losses

            class ContrastiveLoss(losses.ContrastiveLoss):
                pass
            """
        )
    )
    info = site / "clash_dml-0.1.dist-info"
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: clash-dml\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[pml_plugins]\nContrastiveLoss = clash_dml:ContrastiveLoss\n"
    )
    return site


def _child_env(site: Path | None = None) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    paths = [str(ROOT)] + ([str(site)] if site else [])
    env["PYTHONPATH"] = os.pathsep.join(paths + [env.get("PYTHONPATH", "")])
    return env


def test_console_one_error_line_exit_2(tmp_path):
    """The subprocess cases and the entry-point clash, in child processes run at once."""
    jobs = {}
    for case in CASES:
        if case.id not in SUBPROCESS:
            continue
        folder = tmp_path / case.id
        folder.mkdir()
        jobs[case.id] = (folder, case.make(folder), case.expect, None)
    folder = tmp_path / "entry-point-clash"
    folder.mkdir()
    site = _clashing_plugin(folder)
    config = _config(folder, loss={"ContrastiveLoss": {}})
    jobs["entry-point-clash"] = (
        folder,
        ["validate", "--no-data", str(config)],
        "'ContrastiveLoss' names two components: pytorch_metric_learning.losses",
        site,
    )
    procs = {}
    for name, (folder, argv, _, site) in jobs.items():
        before = _listing(folder)
        proc = subprocess.Popen(
            [sys.executable, "-m", "pml_plugins.cli", *argv],
            cwd=folder,
            env=_child_env(site),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        procs[name] = (proc, before)
    for name, (proc, before) in procs.items():
        folder, _, expect, _ = jobs[name]
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 2, (name, err)
        _check_one_error_line(err, expect)
        assert "clash_dml" in err or name != "entry-point-clash", err
        assert not (folder / "out").exists()
        assert _listing(folder) == before, name


def test_entry_point_clash_is_an_error_naming_both(tmp_path, monkeypatch):
    site = _clashing_plugin(tmp_path)
    monkeypatch.syspath_prepend(str(site))
    registry.refresh()
    try:
        with pytest.raises(registry.NameClashError) as err:
            registry.get("ContrastiveLoss")
        message = str(err.value)
        assert "pytorch_metric_learning.losses" in message and "module clash_dml" in message
        assert "ContrastiveLoss" in registry.clashes()
        # other names are untouched
        assert registry.get("TripletMarginLoss").__module__.startswith("pytorch_metric_learning")
    finally:
        monkeypatch.delitem(sys.modules, "clash_dml", raising=False)
        monkeypatch.undo()
        registry.refresh()


def test_broken_entry_point_is_a_warning_and_skipped(tmp_path, monkeypatch, caplog):
    site = tmp_path / "site"
    info = site / "broken_dml-0.1.dist-info"
    info.mkdir(parents=True)
    (site / "broken_dml.py").write_text("import a_module_that_is_not_installed\n")
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-dml\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[pml_plugins]\nBrokenLoss = broken_dml:BrokenLoss\n")
    monkeypatch.syspath_prepend(str(site))
    registry.refresh()
    try:
        with caplog.at_level("WARNING", logger="pml_plugins"):
            assert main(["validate", "--no-data", str(ROOT / "examples" / "default.yaml")]) == 0
        warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert any("'BrokenLoss'" in w and "broken_dml:BrokenLoss" in w for w in warnings)
        with pytest.raises(registry.UnknownComponentError):
            registry.get("BrokenLoss")
    finally:
        monkeypatch.undo()
        registry.refresh()


def test_a_message_over_several_lines_is_printed_as_one(tmp_path, monkeypatch, capsys):
    from pml_plugins import cli
    from pml_plugins.experiment.config import ConfigError

    def fails(args: object) -> int:
        raise ConfigError("first line\n  second line,\nthird")

    monkeypatch.setattr(cli, "cmd_validate", fails)
    assert main(["validate", str(tmp_path / "any.yaml")]) == 2
    assert capsys.readouterr().err == f"{PREFIX} first line second line, third\n"


def test_full_disk_is_one_error_line(tmp_path, monkeypatch, capsys):
    """A write that runs out of space (here: every fsync) is one line, not a traceback,
    and leaves no partial file."""

    def no_space(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    config = _config(tmp_path, epochs=1, dataset__limit_per_class=20, batch_size=32)
    monkeypatch.setattr(os, "fsync", no_space)
    assert main(["train", str(config), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    _check_one_error_line(err, "no space left")
    # the run folder's lock file stays (removing it would race with another writer)
    written = [p for p in (tmp_path / "out").rglob("*") if p.is_file() and p.name != ".lock"]
    assert written == [], written
