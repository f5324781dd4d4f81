"""A search worker: asks the study for trials and trains their folds until the budget is met.

Any number of workers (processes, workflow jobs, machines sharing the run folders) can
work on one study at once. Each trial is the experiment with the trial's parameters,
trained on ``k - 1`` class-disjoint folds of the training classes and validated on the
held-out fold, for every fold in turn (each fold a run folder of its own, locked and
resumable like any run); its value is the mean validation metric. After each fold the
running mean is reported to the pruner, which stops trials below the median of earlier
ones at that fold.

The budget counts trials that ended complete or pruned, plus those running: a worker asks
for a new trial only while fewer than ``trials`` are counted, under the study's file lock,
so the budget is met exactly. The sampler (TPE) is reseeded before each trial from
``(seed, trials so far)``: with one worker the search is a function of the spec, resumed
or not.

A worker killed mid-trial leaves the trial ``RUNNING``. Each running trial holds a lock
file in its folder; the next worker to ask finds the lock free, marks the trial failed
and queues its parameters again, and the new trial continues the killed one's fold run
folders (``--resume``) instead of training them again. Failed trials do not count.
Nothing in the search reads the test split (:func:`..folds.search_only`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import filelock
import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from .. import folds
from .spec import SearchSpec, SearchSpecError

LOG = logging.getLogger("pml_plugins")
#: the trial attribute naming its run folders (below the spec's output)
FOLDER_ATTR = "folder"
COUNTED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)


def storage(spec: SearchSpec) -> optuna.storages.BaseStorage | str:
    """The spec's RDB URL, or Optuna's journal file ``<output>/study.journal``."""
    url = spec.storage_url()
    if url:
        return url
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    spec.output.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(str(spec.output / "study.journal")))


def open_study(spec: SearchSpec, create: bool = True) -> optuna.Study:
    """The spec's study: created on first use, else loaded and checked to be this search.

    A study made by another spec (other experiment, space, folds, budget or seeds) is
    refused: a resumed search continues only the same search."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    where = spec.storage_url() or str(spec.output / "study.journal")
    if not create:
        try:
            return optuna.load_study(study_name=spec.study, storage=storage(spec))
        except KeyError:
            raise SearchSpecError(
                f"no study {spec.study!r} in {where}; run `pml-plugins search` first"
            ) from None
    # workers starting together must not both create the storage's tables and the study
    spec.output.mkdir(parents=True, exist_ok=True)
    with filelock.FileLock(str(spec.output / ".study.lock")):
        study = optuna.create_study(
            study_name=spec.study, storage=storage(spec), direction="maximize", load_if_exists=True
        )
        made_by = study.user_attrs.get("spec_fingerprint")
        if made_by is None:
            study.set_user_attr("spec_fingerprint", spec.fingerprint())
            study.set_user_attr("spec", {k: v for k, v in spec.raw.items() if k != "experiment"})
    if made_by is not None and made_by != spec.fingerprint():
        raise SearchSpecError(
            f"study {spec.study!r} in {where} was made by another search spec (experiment, "
            f"spaces, folds, budget or seeds differ); a search resumes only the same search: "
            f"give this one another study name or storage, or delete that study"
        )
    return study


def _sampler(spec: SearchSpec, n: int) -> optuna.samplers.TPESampler:
    seed = int(np.random.SeedSequence([spec.raw["seed"], n]).generate_state(1)[0])
    return optuna.samplers.TPESampler(n_startup_trials=spec.raw["startup_trials"], seed=seed)


def _pruner(spec: SearchSpec) -> optuna.pruners.BasePruner:
    if spec.raw["pruner"] == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=spec.raw["pruner_startup_trials"], n_warmup_steps=0
        )
    return optuna.pruners.NopPruner()


def _trial_lock(spec: SearchSpec, folder: str) -> filelock.FileLock:
    path = spec.output / "trials" / folder
    path.mkdir(parents=True, exist_ok=True)
    return filelock.FileLock(str(path / ".trial.lock"))


def recover_stale(spec: SearchSpec, study: optuna.Study) -> None:
    """Fail every running trial whose worker is gone (its lock is free) and queue its
    parameters again."""
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        folder = trial.user_attrs.get(FOLDER_ATTR)
        if folder is not None:
            lock = _trial_lock(spec, folder)
            try:
                lock.acquire(timeout=0)
            except filelock.Timeout:
                continue  # its worker is alive
            lock.release()
        study.tell(trial.number, state=TrialState.FAIL)
        if trial.params:
            study.enqueue_trial(trial.params, user_attrs={FOLDER_ATTR: folder})
        LOG.warning("trial %d of %s: its worker stopped; queued again", trial.number, spec.study)


def _ask(spec: SearchSpec, study: optuna.Study) -> tuple[optuna.Trial, filelock.FileLock] | None:
    """The next trial and its held lock, or None when the budget is met."""
    with filelock.FileLock(str(spec.output / ".study.lock")):
        recover_stale(spec, study)
        trials = study.get_trials(deepcopy=False)
        counted = sum(t.state in COUNTED for t in trials)
        if counted >= spec.trials:
            return None
        study.sampler = _sampler(spec, counted)
        trial = study.ask(fixed_distributions=spec.space)
        folder = trial.user_attrs.get(FOLDER_ATTR) or f"trial{trial.number}"
        trial.set_user_attr(FOLDER_ATTR, folder)
        lock = _trial_lock(spec, folder)
        lock.acquire(timeout=0)
        return trial, lock


def fold_value(spec: SearchSpec, params: dict[str, Any], fold: int, folder: Path) -> float:
    """Train one fold of a trial (continuing its run folder) and return its validation metric."""
    from .. import run as run_mod

    config = spec.fold_config(params, fold, folder)
    prep = run_mod.prepare(config, resume=True)
    metrics = (
        run_mod.finished_metrics(prep.out) if prep.finished else run_mod.train_and_evaluate(prep)
    )
    value = metrics["trained"]["val"].get(spec.raw["metric"])
    if value is None:
        raise SearchSpecError(
            f"metric: {spec.raw['metric']!r} is not a validation metric of the runs; use one "
            f"of {', '.join(sorted(metrics['trained']['val']))}"
        )
    return float(value)


def run_trial(spec: SearchSpec, study: optuna.Study, trial: optuna.Trial) -> FrozenTrial:
    """Every fold of ``trial`` (stopping early where the pruner says so); tells the study
    and returns the finished trial."""
    from ..run import NonFiniteError

    folder = spec.output / "trials" / trial.user_attrs[FOLDER_ATTR]
    values: list[float] = []
    for fold in range(spec.folds):
        try:
            values.append(fold_value(spec, trial.params, fold, folder))
        except NonFiniteError as exc:  # a diverging configuration is a bad trial
            LOG.warning("trial %d fold %d diverged: %s", trial.number, fold, exc)
            trial.set_user_attr("diverged", f"fold {fold}: {exc}")
            return study.tell(trial, state=TrialState.PRUNED)
        trial.set_user_attr(f"fold{fold}", values[-1])
        if fold < spec.folds - 1:
            trial.report(float(np.mean(values)), step=fold)
            if trial.should_prune():
                return study.tell(trial, state=TrialState.PRUNED)
    return study.tell(trial, float(np.mean(values)))


def work(spec: SearchSpec, max_trials: int | None = None) -> int:
    """Run trials of ``spec``'s study until its budget is met (or ``max_trials`` ran);
    returns how many this worker finished."""
    study = open_study(spec)
    study.pruner = _pruner(spec)
    done = 0
    with folds.search_only():
        while max_trials is None or done < max_trials:
            asked = _ask(spec, study)
            if asked is None:
                break
            trial, lock = asked
            try:
                ended = run_trial(spec, study, trial)
            finally:
                lock.release()
            LOG.info(
                "%s trial %d: %s%s",
                spec.study,
                trial.number,
                ended.state.name.lower(),
                "" if ended.value is None else f" {ended.value:.4f}",
            )
            done += 1
    return done
