"""Search specs and spaces, and the worker: exact budget, reproducible, resumable."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from pml_plugins.experiment import checkpoint, files
from pml_plugins.experiment.search import report, space, spec, worker

EXPERIMENT = {
    "dataset": {"name": "mnist_subset", "limit_per_class": 12},
    "model": {"trunk": {"SmallCNN": {"width": 4}}, "embedding_size": 8},
    "loss": {"ContrastiveLoss": {"pos_margin": 0, "neg_margin": 1}},
    "sampler": {"MPerClassSampler": {"m": 4}},
    "batch_size": 8,
    "epochs": 2,
    "iterations_per_epoch": 6,
    "device": "cpu",
    "evaluation": {"k_values": [1]},
}


def make_spec(out: Path, **changes) -> dict:
    raw = {
        "study": "test/Contrastive/8",
        "experiment": EXPERIMENT,
        "spaces": {"ContrastiveLoss": {"neg_margin": {"float": [0.3, 1.5]}}},
        "folds": 2,
        "trials": 2,
        "startup_trials": 1,
        "pruner": None,
        "output": str(out),
    }
    raw.update(changes)
    return raw


# ---------------------------------------------------------------- spaces and specs


@pytest.mark.parametrize(
    "spaces, fragment",
    [
        ({"NoSuchLoss": {"a": {"float": [0, 1]}}}, "search.spaces.NoSuchLoss"),
        ({"ContrastiveLoss": {"margin": {"float": [0, 1]}}}, "takes no argument 'margin'"),
        ({"ContrastiveLoss": {"neg_margin": [0, 1]}}, "is not a distribution"),
        ({"ContrastiveLoss": {"neg_margin": {"float": [1, 0]}}}, "low 1 must be below high 0"),
        (
            {"ContrastiveLoss": {"neg_margin": {"float": [0, 1], "log": True}}},
            "log scale needs low > 0",
        ),
        ({"ContrastiveLoss": {"neg_margin": {"int": [0.5, 2]}}}, "int needs whole numbers"),
        ({"ContrastiveLoss": {"neg_margin": {"choice": [1]}}}, "choice needs a list of 2"),
        ({"ContrastiveLoss": {"neg_margin": {"float": [0, 1], "int": [0, 1]}}}, "exactly one of"),
    ],
)
def test_a_bad_space_names_the_entry(spaces, fragment):
    with pytest.raises(space.SearchSpaceError, match=fragment.replace("(", r"\(")):
        space.check_spaces(spaces)


def test_the_space_is_the_components_entries_and_applies_to_the_config():
    spaces = space.check_spaces(
        {
            "MultiSimilarityLoss": {"alpha": {"float": [0.01, 100], "log": True}},
            "MultiSimilarityMiner": {"epsilon": {"float": [0, 1]}},
            "NRALoss": {"alpha": {"float": [1, 8]}},
        }
    )
    config = {
        "loss": {"MultiSimilarityLoss": {"alpha": 2, "beta": 50}},
        "miner": "MultiSimilarityMiner",
    }
    found = space.experiment_space(config, spaces)
    assert set(found) == {"loss.MultiSimilarityLoss.alpha", "miner.MultiSimilarityMiner.epsilon"}
    assert space.describe(found)["loss.MultiSimilarityLoss.alpha"] == "float [0.01, 100] log"
    tuned = space.apply(
        config, {"loss.MultiSimilarityLoss.alpha": 7.5, "miner.MultiSimilarityMiner.epsilon": 0.2}
    )
    assert tuned == {
        "loss": {"MultiSimilarityLoss": {"alpha": 7.5, "beta": 50}},
        "miner": {"MultiSimilarityMiner": {"epsilon": 0.2}},
    }
    assert config["loss"]["MultiSimilarityLoss"]["alpha"] == 2  # not changed in place


@pytest.mark.parametrize(
    "changes, fragment",
    [
        ({"trials": 0}, "trials: 0 is less than the minimum of 1"),
        ({"spaces": {"NRALoss": {"alpha": {"float": [1, 8]}}}}, "no entry for any component"),
        ({"startup_trials": 5}, "startup_trials: 5 random trials exceed the budget"),
        ({"experiment": {**EXPERIMENT, "loss": "NoSuchLoss"}}, "experiment: "),
        (
            {"experiment": {**EXPERIMENT, "dataset": {"name": "mnist_subset", "val_classes": 0.2}}},
            "leave out cross_validation and val_classes",
        ),
        ({"pruner": "hyperband"}, "pruner"),
    ],
)
def test_a_bad_spec_is_refused_before_any_work(tmp_path, changes, fragment):
    with pytest.raises(spec.SearchSpecError, match=fragment):
        spec.validate(make_spec(tmp_path / "s", **changes))
    assert not (tmp_path / "s").exists()


def test_the_cli_reports_a_bad_spec_in_one_line(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(make_spec(tmp_path / "s", trials=0)))
    cmd = [sys.executable, "-m", "pml_plugins.cli", "search", str(path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "trials: 0 is less than" in proc.stderr


# ---------------------------------------------------------------- the worker


def values(study: optuna.Study) -> list[tuple[dict, float]]:
    done = sorted(study.get_trials(states=(TrialState.COMPLETE,)), key=lambda t: t.number)
    return [(t.params, t.value) for t in done]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One uninterrupted search of the module's spec."""
    out = tmp_path_factory.mktemp("search") / "s"
    s = spec.validate(make_spec(out))
    assert worker.work(s) == 2
    return s, worker.open_study(s, create=False)


def test_a_search_meets_its_budget_exactly_and_never_reads_the_test_split(finished):
    s, study = finished
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
    assert worker.work(s) == 0  # the budget is met: another worker has nothing to do
    for t in trials:
        folds_ = [t.user_attrs[f"fold{i}"] for i in range(2)]
        assert t.value == pytest.approx(sum(folds_) / 2, rel=1e-12)
        for i in range(2):
            run = s.output / "trials" / t.user_attrs["folder"] / f"fold{i}"
            manifest = files.read_json(run / "manifest.json", "")
            assert set(manifest["data_sizes"]) == {"train", "val"}
            cfg = yaml.safe_load((run / "config.yaml").read_text())
            assert cfg["dataset"]["cross_validation"] == {"folds": 2, "fold": i, "seed": 0}
            assert (
                cfg["loss"]["ContrastiveLoss"]["neg_margin"]
                == t.params["loss.ContrastiveLoss.neg_margin"]
            )


def test_a_search_is_a_function_of_its_spec(finished, tmp_path):
    s, study = finished
    again = spec.validate(make_spec(tmp_path / "again"))
    worker.work(again)
    assert values(worker.open_study(again, create=False)) == values(study)


def test_a_changed_spec_does_not_continue_the_study(finished):
    s, _ = finished
    changed = spec.validate({**s.raw, "trials": 3})
    with pytest.raises(spec.SearchSpecError, match="made by another search spec"):
        worker.open_study(changed)


def test_a_killed_search_resumes_its_study_and_ends_as_the_uninterrupted_one(finished, tmp_path):
    """A worker is killed inside trial 1, fold 0, after a checkpoint; the next worker
    fails that trial, queues its parameters again into the same fold run folders (the fold
    continues from its checkpoint), and the study ends with the uninterrupted values."""
    _, reference = finished
    s = spec.validate(make_spec(tmp_path / "s"))
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(s.raw))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "pml_plugins.cli", "search", str(path)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = s.output / "trials" / "trial1" / "fold0" / "checkpoints"
    deadline = time.time() + 600
    while not (ckpt.is_dir() and checkpoint.latest(ckpt) >= 1):
        assert proc.poll() is None, "the worker ended before it was killed"
        assert time.time() < deadline
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGSTOP)  # frozen at once, whatever the load
    stopped_at = checkpoint.latest(ckpt)  # epoch 1, or 2 where the worker ran ahead
    fold0_done = (ckpt.parent / "metrics.json").exists()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()

    study = worker.open_study(s, create=False)
    assert [t.state for t in study.get_trials()] == [TrialState.COMPLETE, TrialState.RUNNING]
    assert worker.work(s) == 1
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE]
    assert trials[2].params == trials[1].params
    assert trials[2].user_attrs["folder"] == "trial1"
    if not fold0_done:
        manifest = files.read_json(ckpt.parent / "manifest.json", "")
        assert manifest["resumed_from_epoch"] == stopped_at >= 1
    assert values(study) == values(reference)


def test_the_report_picks_the_best_trial_of_the_budget(finished, tmp_path):
    s, study = finished
    best = report.write_report(s, tmp_path / "report")
    top = max(study.get_trials(states=(TrialState.COMPLETE,)), key=lambda t: t.value)
    assert best["value"] == top.value and best["params"] == top.params
    assert best["fold_classes"] == [[2, 3, 4], [0, 1]]
    assert best["space"] == {"loss.ContrastiveLoss.neg_margin": "float [0.3, 1.5]"}
    assert (tmp_path / "report" / "trials.csv").read_text().count("\n") == 3
    cell = {**EXPERIMENT, "seed": 3}
    tuned = report.tuned_config(cell, tmp_path / "report" / "best.json")
    assert (
        tuned["loss"]["ContrastiveLoss"]["neg_margin"]
        == top.params["loss.ContrastiveLoss.neg_margin"]
    )
    assert tuned["tuning"]["budget"] == 2 and tuned["seed"] == 3


def test_a_report_of_an_unfinished_study_says_so(tmp_path):
    s = spec.validate(make_spec(tmp_path / "s"))
    worker.work(s, max_trials=1)
    with pytest.raises(spec.SearchSpecError, match="1 of its 2 trials ended"):
        report.write_report(s, tmp_path / "report")


def test_workers_sharing_a_database_meet_the_budget_exactly(tmp_path):
    """Two worker processes on one study in an RDB storage (SQLite here, PostgreSQL on a
    cluster): every trial runs once, and together they run exactly the budget."""
    raw = make_spec(tmp_path / "s", trials=3, storage=f"sqlite:///{tmp_path / 'study.db'}")
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "pml_plugins.cli", "search", str(path)]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    ran = [int(out.split(": ")[1].split()[0]) for out in outs]
    assert sum(ran) == 3, outs
    study = worker.open_study(spec.validate(raw), create=False)
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3
    assert len({t.user_attrs["folder"] for t in trials}) == 3
