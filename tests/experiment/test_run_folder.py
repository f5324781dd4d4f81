"""A run folder is one run: safe loads, atomic files, a lock, a config fingerprint,
non-finite losses caught, and an exact resume."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import types
from collections.abc import Iterator
from pathlib import Path

import grid
import pytest
import torch
import yaml

from pml_plugins.cli import main
from pml_plugins.experiment import run as run_mod
from pml_plugins.experiment import run_folder

ROOT = Path(__file__).resolve().parents[2]
DEFAULT = ROOT / "examples" / "default.yaml"
TINY = {
    "dataset.limit_per_class": 40,
    "batch_size": 32,
    "iterations_per_epoch": 3,
    "epochs": 2,
}


def sets(**extra) -> list[str]:
    args: list[str] = []
    for key, value in {**TINY, **extra}.items():
        args += ["--set", f"{key}={value}"]
    return args


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "finished"
    assert main(["train", str(DEFAULT), "--out", str(out), *sets()]) == 0
    return out


@pytest.fixture
def killed_run(finished_run, tmp_path) -> Path:
    """The folder of a run killed right after its last checkpoint (no metrics yet)."""
    out = tmp_path / "killed"
    shutil.copytree(finished_run, out)
    (out / "metrics.json").unlink()
    (out / "manifest.json").unlink()
    return out


class Payload:
    """Unpickling this creates ``marker``: code that a planted state file would run."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_planted_payload_in_state_file_does_not_run(killed_run, tmp_path, capsys):
    marker = tmp_path / "payload-ran"
    torch.save({"epoch": 2, "rng": Payload(marker)}, killed_run / "checkpoints" / "state_2.pth")
    assert main(["train", str(DEFAULT), "--out", str(killed_run), "--resume", *sets()]) == 2
    err = capsys.readouterr().err
    assert not marker.exists()
    assert err.startswith("pml-plugins: error: ") and err.count("\n") == 1
    assert "state_2.pth" in err and "cannot be loaded" in err


def test_empty_untrained_metrics_is_computed_again(killed_run):
    path = killed_run / "untrained_metrics.json"
    before = json.loads(path.read_text())
    path.write_bytes(b"")  # a kill during a non-atomic write
    assert main(["train", str(DEFAULT), "--out", str(killed_run), "--resume", *sets()]) == 0
    assert json.loads(path.read_text()) == before
    assert json.loads((killed_run / "metrics.json").read_text())["untrained"] == before


HOLDER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from pml_plugins.experiment import run_folder

    folder = Path(sys.argv[1])
    with run_folder.locked(folder):
        (folder.parent / "holding").write_text("")
        sys.stdin.read()  # until the test closes it
    """
)


@contextlib.contextmanager
def holding_lock(folder: Path) -> Iterator[subprocess.Popen]:
    """Another process that holds ``folder``'s lock until the block ends."""
    holding = folder.parent / "holding"
    holding.unlink(missing_ok=True)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(folder)], stdin=subprocess.PIPE, text=True
    )
    try:
        while not holding.exists():  # the holder writes it once it holds the lock
            assert holder.poll() is None, "the lock holder ended early"
            os.sched_yield()
        yield holder
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)


def test_second_writer_is_refused_while_the_first_holds_the_folder(killed_run, capsys):
    before = snapshot(killed_run)
    with holding_lock(killed_run) as holder:
        code = main(["train", str(DEFAULT), "--out", str(killed_run), "--resume", *sets()])
        err = capsys.readouterr().err
        during = snapshot(killed_run)
    assert code == 2 and err.count("\n") == 1
    assert str(killed_run) in err and f"pid {holder.pid}" in err and "being written" in err
    during.pop(run_folder.LOCK_INFO_NAME)
    assert {k: v for k, v in during.items() if k != run_folder.LOCK_NAME} == {
        k: v for k, v in before.items() if k != run_folder.LOCK_NAME
    }


#: holds the run folder's lock, writes its info, and dies by SIGKILL while holding it
DIES_HOLDING = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    from pml_plugins.experiment import run_folder

    with run_folder.locked(Path(sys.argv[1])):
        os.kill(os.getpid(), signal.SIGKILL)
    """
)


def test_stale_lock_of_a_dead_process_is_named_and_taken_over(killed_run, caplog):
    dead = subprocess.run([sys.executable, "-c", DIES_HOLDING, str(killed_run)], timeout=120)
    assert dead.returncode == -signal.SIGKILL
    info = json.loads((killed_run / run_folder.LOCK_INFO_NAME).read_text())
    with caplog.at_level("WARNING", logger="pml_plugins"):
        assert main(["train", str(DEFAULT), "--out", str(killed_run), "--resume", *sets()]) == 0
    assert f"stale lock of a process that no longer runs (pid {info['pid']}" in caplog.text
    assert not (killed_run / run_folder.LOCK_INFO_NAME).exists()
    assert json.loads((killed_run / "run.json").read_text())["status"] == "finished"


def test_workflow_does_not_clear_a_run_folder_that_a_run_holds(killed_run, capsys):
    """The workflow's first step clears a run folder of another config, but not while a
    (possibly orphaned) run still writes it."""
    config = yaml.safe_load((killed_run / "config.yaml").read_text())
    cell = {**config, "seed": config["seed"] + 1, "output": str(killed_run)}
    before = snapshot(killed_run)
    with holding_lock(killed_run):
        code = grid.main([str(killed_run / "cell.yaml"), json.dumps(cell)])
        err = capsys.readouterr().err
    assert code == 2 and err.startswith("pml-plugins: error: ") and "being written" in err
    after = snapshot(killed_run)
    assert {k: v for k, v in after.items() if not k.startswith(".lock")} == {
        k: v for k, v in before.items() if not k.startswith(".lock")
    }
    assert grid.write_cell(cell, killed_run / "cell.yaml") is True  # released: cleared
    assert not (killed_run / "checkpoints").exists()
    assert not (killed_run / run_folder.RECORD_NAME).exists()


@pytest.mark.parametrize(
    "change",
    [
        {"loss": "ContrastiveLoss", "miner": "null"},
        {"optimizers.trunk.Adam.lr": 0.01},
        {"seed": 1},
        {"model.embedding_size": 32},
    ],
    ids=["loss", "lr", "seed", "embedding_size"],
)
def test_resume_of_a_killed_run_with_another_config_is_refused(killed_run, change, capsys):
    before = snapshot(killed_run)
    args = ["train", str(DEFAULT), "--out", str(killed_run), "--resume", *sets(**change)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "another --out" in err
    first = next(iter(change)).split(".")[0]
    assert f"{first}" in err and "->" in err
    assert snapshot(killed_run) == before


def test_resume_may_change_device_and_num_workers(killed_run):
    args = ["train", str(DEFAULT), "--out", str(killed_run), "--resume"]
    assert main([*args, *sets(device="cpu", num_workers=0)]) == 0
    assert json.loads((killed_run / "run.json").read_text())["status"] == "finished"


def test_more_epochs_on_a_finished_run_is_refused(finished_run, capsys):
    before = snapshot(finished_run)
    args = ["train", str(DEFAULT), "--out", str(finished_run), "--resume", *sets(epochs=3)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "epochs: 2 -> 3" in err and "new run folder" in err
    assert snapshot(finished_run) == before


def test_resume_of_a_finished_run_keeps_its_metrics(finished_run, capsys):
    before = snapshot(finished_run)
    mtime = (finished_run / "metrics.json").stat().st_mtime_ns
    args = ["train", str(DEFAULT), "--out", str(finished_run), "--resume", *sets()]
    assert main(args) == 0
    assert "the run is finished" in capsys.readouterr().out
    assert snapshot(finished_run) == before
    assert (finished_run / "metrics.json").stat().st_mtime_ns == mtime


def test_non_finite_loss_stops_the_run(tmp_path, capsys):
    out = tmp_path / "nan"
    lr = {"optimizers.trunk.Adam.lr": "1.0e+30", "optimizers.embedder.Adam.lr": "1.0e+30"}
    assert main(["train", str(DEFAULT), "--out", str(out), *sets(**lr)]) == 2
    err = capsys.readouterr().err  # tqdm's progress bars, then the error line
    assert err.count("pml-plugins: error:") == 1 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("pml-plugins: error: epoch 1, iteration ")
    assert "learning rate too high" in err and "fp16" in err
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "failed" and "iteration" in record["reason"]
    assert not list((out / "checkpoints").glob("*.pth"))
    assert not (out / "metrics.json").exists()


def test_non_finite_weights_are_never_checkpointed(tmp_path):
    model = torch.nn.Linear(2, 2)
    with torch.no_grad():
        model.weight[0, 1] = float("inf")
    trainer = types.SimpleNamespace(
        models={"trunk": model}, loss_funcs={}, optimizers={}, epoch=3, iteration=7
    )
    hooks = types.SimpleNamespace(saveable_trainer_objects=["models", "optimizers"])
    with pytest.raises(run_mod.NonFiniteError, match=r"epoch 3: the weight trunk\.weight"):
        run_mod.save_checkpoint(trainer, hooks, tmp_path, 3, None)
    assert list(tmp_path.iterdir()) == []


def test_a_run_that_fails_says_so_in_run_json(tmp_path, monkeypatch):
    def broken_tester(*args, **kwargs):
        raise ValueError("a tester that breaks")

    monkeypatch.setattr(run_mod, "make_tester", broken_tester)
    out = tmp_path / "broken"
    with pytest.raises(ValueError, match="a tester that breaks"):
        run_mod.run(DEFAULT, out=out, overrides=TINY)
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "failed"
    assert record["reason"] == "ValueError: a tester that breaks"
