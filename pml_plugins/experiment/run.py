"""Build everything from a validated config, train with a PML trainer, test, write the run folder.

Run folder (``config["output"]``)::

    config.yaml     the merged config (defaults filled in)
    run.json        the config's fingerprint and the run's status (:mod:`.run_folder`)
    untrained_metrics.json  the untrained model's metrics, computed once
    metrics.json    {"untrained": {split: {metric: value}}, "trained": {...}, ...}
    manifest.json   versions, git revision, seed, device, wall time, data fingerprint
    test_embeddings.npz  the trained model's embeddings of up to 3000 query images (figures)
    logs/           record-keeper CSVs and logs.db (SQLite)
    checkpoints/    models, optimizers, RNG and plugin state of the last finished epoch

Everything that can fail on bad input (config, data folder, sampler vs data, a run folder
holding another experiment) fails in ``prepare`` before anything is written. The run
folder is locked while a run writes it, every file is written atomically
(:mod:`.files`), and ``--resume`` continues only the same experiment (:mod:`.run_folder`
lists the keys that may differ). A run killed mid-way continues from its last finished
epoch with ``resume=True``; on the CPU the result is bit for bit that of the
uninterrupted run (:mod:`.checkpoint`). A non-finite loss or weight stops the run at once
(:class:`NonFiniteError`): no non-finite checkpoint is written and ``run.json`` says the
run failed and why.
"""

from __future__ import annotations

import logging
import math
import os
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pytorch_metric_learning.utils import common_functions as c_f

from .. import registry
from ..models.embedder import Embedder
from . import checkpoint, distributed, figure_points, files, run_folder
from . import config as cfg_mod
from . import data as data_mod
from .amp import with_amp
from .checkpoint import seed_everything
from .evaluate import Calculator

LOG = logging.getLogger("pml_plugins")
CLUSTERING_MAX_CLASSES = 5000
#: record-keeper logs losses and component stats every LOG_FREQ iterations
LOG_FREQ = 5


class RunError(RuntimeError):
    """A run that cannot start or continue; the message says why and what to do."""


class NonFiniteError(RunError):
    """A loss or a weight became NaN or infinite; the run stopped."""


@dataclass
class Prepared:
    """A config checked against its data, with nothing written yet."""

    config: dict[str, Any]
    splits: dict[str, Any]
    out: Path
    device: torch.device
    resume_epoch: int = 0
    finished: bool = False
    reuse_untrained: bool = False
    resume: bool = False


def default_output(config: Mapping[str, Any]) -> Path:
    name, _ = registry.parse_spec(config["loss"])
    return (
        Path("runs")
        / config["dataset"]["name"]
        / name
        / str(config["model"]["embedding_size"])
        / f"seed{config['seed']}"
    )


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RunError(
            f"device: {spec!r} asked for, but CUDA is not available; use 'cpu' or 'auto'"
        )
    return device


#: the last epoch whose checkpoint was completely written (0 if none)
latest_checkpoint = checkpoint.latest


def prepare(
    config: Mapping[str, Any], out: str | Path | None = None, resume: bool = False
) -> Prepared:
    """Everything that can fail on bad input, before anything is written."""
    config = dict(config)
    out = Path(out or config.get("output") or default_output(config))
    config["output"] = str(out)
    device = resolve_device(config["device"])
    if config["amp"] == "fp16" and device.type != "cuda":
        raise cfg_mod.ConfigError("amp: 'fp16' needs a CUDA device; use 'bf16' or 'off' on the CPU")
    resume_epoch, finished, same = check_folder(config, out, resume)
    try:
        splits = data_mod.load_splits(config["dataset"])
    except FileNotFoundError as exc:
        raise cfg_mod.ConfigError(f"dataset.root: {exc}") from None
    cfg_mod.check_sampler(config, data_mod.labels_of(splits["train"]))
    return Prepared(config, splits, out, device, resume_epoch, finished, same, resume=resume)


def check_folder(config: Mapping[str, Any], out: Path, resume: bool) -> tuple[int, bool, bool]:
    """What ``out`` holds, checked against ``config`` and ``resume`` before anything is
    written (and again once the folder is locked): ``(last checkpoint epoch, finished, the
    folder's record is of this config)``. Refuses a finished or started run without
    ``resume``, and with ``resume`` a run of another experiment."""
    ckpt = out / "checkpoints"
    resume_epoch = latest_checkpoint(ckpt) if ckpt.is_dir() else 0
    finished = (out / "metrics.json").exists()
    if finished and not resume:
        raise RunError(
            f"{out} already holds a finished run (metrics.json); pass --resume to keep it, "
            f"or choose another --out"
        )
    if resume_epoch and not resume:
        raise RunError(
            f"{out} holds checkpoints up to epoch {resume_epoch}; pass --resume to continue "
            f"that run, or choose another --out"
        )
    record = run_folder.read_record(out) if out.is_dir() else None
    if record is None:
        return resume_epoch, finished, False
    changed = run_folder.differences(record["config"], config)
    started = resume_epoch > 0 or finished or (out / "untrained_metrics.json").exists()
    if changed and resume and started:
        what = "a finished run" if finished else f"a run stopped after epoch {resume_epoch}"
        hint = (
            "extending the epochs of a finished run is not supported: start a new run "
            "folder with another --out"
            if finished and any(c.startswith("epochs:") for c in changed)
            else "train this config into another --out"
        )
        raise RunError(
            f"{out} holds {what} of another config; --resume continues only the same "
            f"experiment (only {', '.join(run_folder.ALLOWED_TO_DIFFER)} may differ), but "
            f"these keys differ (run's -> now): {'; '.join(changed)}; {hint}"
        )
    return resume_epoch, finished, not changed


# ---------------------------------------------------------------- building


def build_models(config: Mapping[str, Any], sample: torch.Tensor) -> dict[str, torch.nn.Module]:
    mcfg = config["model"]
    trunk = registry.build_accepting(
        mcfg["trunk"], "models", in_channels=int(sample.shape[0]), image_size=sample.shape[-1]
    )
    in_features = getattr(trunk, "output_size", None)
    if in_features is None:
        with torch.no_grad():
            in_features = trunk.eval()(sample[None]).shape[1]
    embedder = Embedder(in_features, mcfg["embedding_size"], mcfg["embedder"])
    return {"trunk": trunk, "embedder": embedder}


def build_components(config: Mapping[str, Any], splits: Mapping[str, Any]) -> dict[str, Any]:
    labels = data_mod.labels_of(splits["train"])
    n_classes = len(np.unique(labels))
    emb = config["model"]["embedding_size"]
    loss = registry.build_accepting(
        config["loss"], "losses", num_classes=n_classes, embedding_size=emb
    )
    miner = registry.build(config["miner"], "miners") if config.get("miner") else None
    sampler = None
    if config.get("sampler"):
        sampler = registry.build_accepting(
            config["sampler"],
            "samplers",
            labels=labels,
            length_before_new_iter=len(labels),
            batch_size=config["batch_size"],
        )
    return {"loss": loss, "miner": miner, "sampler": sampler}


def build_optimizers(config: Mapping[str, Any], models: Mapping, loss: torch.nn.Module) -> dict:
    specs = dict(config.get("optimizers") or {})
    default = {"Adam": {"lr": 1e-3, "weight_decay": 1e-4}}
    optimizers = {}
    for part in ("trunk", "embedder"):
        params = [p for p in models[part].parameters() if p.requires_grad]
        if params:
            optimizers[f"{part}_optimizer"] = registry.build(
                specs.get(part, default), "optimizers", params=params
            )
    loss_params = [p for p in loss.parameters() if p.requires_grad]
    if loss_params:
        optimizers["metric_loss_optimizer"] = registry.build(
            specs.get("loss", {"Adam": {"lr": 1e-2}}), "optimizers", params=loss_params
        )
    elif "loss" in specs:
        raise cfg_mod.ConfigError("optimizers.loss: the loss has no learnable parameters")
    return optimizers


def build_schedulers(config: Mapping[str, Any], optimizers: Mapping) -> dict | None:
    specs = config.get("lr_schedulers") or {}
    out = {}
    for part, spec in specs.items():
        key = "metric_loss" if part == "loss" else part
        opt = optimizers.get(f"{key}_optimizer")
        if opt is not None:
            out[f"{key}_scheduler_by_epoch"] = registry.build(spec, "lr_schedulers", optimizer=opt)
    return out or None


def make_record_keeper(log_dir: Path, resume: bool):
    """record-keeper with CSV + SQLite (tensorboard only where installed).

    PML's ``get_record_keeper`` silently turns off all logging and saving when
    tensorboard is missing; this builds the writer directly and fails loudly.
    """
    import record_keeper

    writer = record_keeper.RecordWriter(folder=str(log_dir), is_new_experiment=not resume)
    tb = None
    try:
        from torch.utils.tensorboard import SummaryWriter

        tb = SummaryWriter(log_dir=str(log_dir / "tensorboard"))
    except ImportError:
        pass
    return record_keeper.RecordKeeper(
        tensorboard_writer=tb,
        record_writer=writer,
        attributes_to_search_for=c_f.list_of_recordable_attributes_list_names(),
    )


def make_tester(config: Mapping[str, Any], splits: Mapping, device: torch.device, hook=None):
    from pytorch_metric_learning.testers import GlobalEmbeddingSpaceTester

    ecfg = config["evaluation"]
    n_classes = max(len(np.unique(data_mod.labels_of(ds))) for ds in splits.values())
    clustering = ecfg["clustering"]
    if clustering == "auto":
        clustering = n_classes <= CLUSTERING_MAX_CLASSES
    calc = Calculator(k_values=ecfg["k_values"], clustering=bool(clustering), device=device)
    return GlobalEmbeddingSpaceTester(
        batch_size=ecfg["batch_size"],
        dataloader_num_workers=config["num_workers"],
        data_device=device,
        accuracy_calculator=calc,
        end_of_testing_hook=hook,
    )


def clean_metrics(all_accuracies: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    return {
        split: {
            k.removesuffix("_level0"): float(v)
            for k, v in accs.items()
            if k != "epoch" and isinstance(v, (int, float, np.floating))
        }
        for split, accs in all_accuracies.items()
    }


# ---------------------------------------------------------------- checkpoints


def _plugin_states(trainer, sampler) -> dict[str, Any]:
    states = {}
    for name, obj in (("trainer", trainer), ("sampler", sampler)):
        if obj is not None and callable(getattr(obj, "state_dict", None)):
            states[name] = obj.state_dict()
    return states


def _saveable(trainer, hooks) -> dict[str, dict[str, Any]]:
    return {x: dict(getattr(trainer, x, None) or {}) for x in hooks.saveable_trainer_objects}


def check_finite_weights(trainer) -> None:
    """Raise :class:`NonFiniteError` where a model or loss parameter is NaN or infinite."""
    groups = {**trainer.models, **trainer.loss_funcs}
    for part, module in groups.items():
        for name, param in module.named_parameters():
            if not torch.isfinite(param).all():
                raise NonFiniteError(
                    f"epoch {trainer.epoch}: the weight {part}.{name} is not finite after "
                    f"iteration {trainer.iteration}; {NON_FINITE_CAUSES}"
                )


def check_finite_losses(trainer) -> None:
    """Raise :class:`NonFiniteError` where a loss of the last iteration is NaN or infinite."""
    for name, value in trainer.losses.items():
        number = float(value.detach()) if torch.is_tensor(value) else float(value)
        if not math.isfinite(number):
            raise NonFiniteError(
                f"epoch {trainer.epoch}, iteration {trainer.iteration}: the loss {name} is "
                f"{number}; {NON_FINITE_CAUSES}"
            )


NON_FINITE_CAUSES = (
    "likely causes: a learning rate too high (optimizers: ... lr), or with amp: fp16 an "
    "fp16 overflow (use bf16 or off); the run stopped, no checkpoint of it was written and "
    "run.json says it failed; fix the config and train into another --out"
)


def save_checkpoint(trainer, hooks, folder: Path, epoch: int, sampler) -> None:
    """Models, optimizers, ... of ``epoch``, then the state file that marks it complete;
    weights that are not finite are refused (:class:`NonFiniteError`)."""
    check_finite_weights(trainer)
    state = {
        "epoch": epoch,
        "rng": checkpoint.rng_state(),
        "plugins": _plugin_states(trainer, sampler),
    }
    checkpoint.save(_saveable(trainer, hooks), folder, epoch, state)


def load_checkpoint(trainer, hooks, folder: Path, epoch: int, device, sampler) -> None:
    """Load ``epoch``'s checkpoint (``torch.load(weights_only=True)``, nothing unpickled)."""
    state = checkpoint.load(_saveable(trainer, hooks), folder, epoch, device)
    checkpoint.set_rng_state(state["rng"])
    plugins = state.get("plugins", {})
    for name, obj in (("trainer", trainer), ("sampler", sampler)):
        if name in plugins:
            obj.load_state_dict(plugins[name])


# ---------------------------------------------------------------- manifest


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def git_revision() -> dict[str, Any] | None:
    root = Path(__file__).resolve().parents[2]

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)

    try:
        rev = git("rev-parse", "HEAD")
        if rev.returncode != 0:
            return None
        dirty = git("status", "--porcelain", "--untracked-files=no")
        return {"commit": rev.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return None


def manifest(prep: Prepared, wall_time: float, epochs_run: int) -> dict[str, Any]:
    device = prep.device
    return {
        "pml_plugins": _version("pml-plugins"),
        "python": sys.version.split()[0],
        "packages": {
            d: v
            for d in (
                "torch",
                "torchvision",
                "pytorch-metric-learning",
                "record-keeper",
                "faiss-cpu",
                "faiss-gpu-cu12",
                "numpy",
            )
            if (v := _version(d))
        },
        "git": git_revision(),
        "container_image": os.environ.get("PML_PLUGINS_IMAGE"),
        "seed": prep.config["seed"],
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "wall_time_s": round(wall_time, 3),
        "epochs": prep.config["epochs"],
        "epochs_run_this_call": epochs_run,
        "resumed_from_epoch": prep.resume_epoch,
        "data_fingerprint": data_mod.fingerprint(prep.splits),
        "data_sizes": {k: len(v) for k, v in prep.splits.items()},
    }


# ---------------------------------------------------------------- the run


def train_and_evaluate(prep: Prepared) -> dict[str, Any]:
    """Train from a prepared config and write the run folder; returns metrics.json's content.

    The main process locks the run folder for the whole run (:func:`.run_folder.locked`),
    checks it again under the lock (another process may have written it since
    :func:`prepare`), and keeps ``run.json``'s status: running, then failed (with the
    reason) or finished. A run killed outright stays ``running``; its checkpoints resume it.
    """
    if prep.config["distributed"] and int(os.environ.get("RANK", "0")) != 0:
        return _train_and_evaluate(prep)
    prep.out.mkdir(parents=True, exist_ok=True)
    with run_folder.locked(prep.out):
        resume_epoch, finished, same = check_folder(prep.config, prep.out, prep.resume)
        prep.resume_epoch, prep.finished, prep.reuse_untrained = resume_epoch, finished, same
        if finished:
            return finished_metrics(prep.out)
        cfg_mod.dump(prep.config, prep.out / "config.yaml")
        run_folder.write_record(prep.out, prep.config, run_folder.RUNNING)
        try:
            metrics = _train_and_evaluate(prep)
        except Exception as exc:
            reason = str(exc) if isinstance(exc, RunError) else f"{type(exc).__name__}: {exc}"
            run_folder.write_record(prep.out, prep.config, run_folder.FAILED, reason=reason)
            raise
        run_folder.write_record(prep.out, prep.config, run_folder.FINISHED)
        return metrics


def finished_metrics(out: Path) -> dict[str, Any]:
    """``metrics.json`` of a finished run folder, left as it is."""
    metrics = files.read_json(
        out / "metrics.json",
        "remove it and train again with --resume (the last checkpoint is reloaded)",
    )
    print(f"{out}: the run is finished; metrics.json is kept as it is")
    return metrics


def untrained_metrics(prep: Prepared, test) -> dict[str, Any]:
    """``untrained_metrics.json`` where it is of this config and readable, else ``test()``
    (the untrained model's metrics), written atomically."""
    path = prep.out / "untrained_metrics.json"
    if prep.reuse_untrained and path.exists():
        try:
            return files.read_json(path, "it is computed again")
        except files.RunFileError as exc:
            LOG.warning("%s", exc)
    untrained = test()
    files.write_json(path, untrained)
    return untrained


def _train_and_evaluate(prep: Prepared) -> dict[str, Any]:
    t0 = time.time()
    config, splits, out, device = prep.config, prep.splits, prep.out, prep.device
    # distributed: join torchrun's process group; only rank 0 (`main`) writes and evaluates
    ctx = distributed.Context(device=device)
    if config["distributed"]:
        ctx = distributed.init_from_env(device)
        device = prep.device = ctx.device
    main = ctx.is_main
    ckpt_dir, log_dir = out / "checkpoints", out / "logs"
    if main:
        ckpt_dir.mkdir(exist_ok=True)

    seed_everything(config["seed"])
    models = build_models(config, splits["train"][0][0])
    parts = build_components(config, splits)
    loss, miner, sampler = parts["loss"], parts["miner"], parts["sampler"]
    if not config["distributed"]:
        sampler = checkpoint.make_resumable(sampler, splits["train"], config["batch_size"])
    models = {k: m.to(device) for k, m in models.items()}
    if config["channels_last"]:
        models["trunk"] = models["trunk"].to(memory_format=torch.channels_last)
    loss = loss.to(device)
    optimizers = build_optimizers(config, models, loss)
    schedulers = build_schedulers(config, optimizers)

    from pytorch_metric_learning.utils import logging_presets

    record_keeper = make_record_keeper(log_dir, resume=prep.resume_epoch > 0) if main else None
    hooks = logging_presets.HookContainer(
        record_keeper,
        primary_metric="mean_average_precision_at_r",
        validation_split_name="val",
        log_freq=LOG_FREQ,
    )
    tester = make_tester(config, splits, device, hook=hooks.end_of_testing_hook) if main else None
    plan = data_mod.eval_plan(config["dataset"]["name"], splits)
    eval_splits = {k: v for k, v in splits.items() if k != "train"}

    def test_untrained() -> dict[str, Any]:
        tester.test(eval_splits, 0, models["trunk"], models["embedder"], plan)
        return clean_metrics(tester.all_accuracies)

    untrained = untrained_metrics(prep, test_untrained) if main else {}

    trainer_name, trainer_kwargs = registry.parse_spec(config["trainer"])
    epochs = config["epochs"]
    interval = config["evaluation"]["interval"]

    def end_of_iteration(trainer) -> None:
        check_finite_losses(trainer)
        if isinstance(sampler, checkpoint.ResumableSampler):
            sampler.batch_done()
        if main:
            hooks.end_of_iteration_hook(trainer)

    def end_of_epoch(trainer) -> bool:
        if not main:
            check_finite_weights(trainer)
            return True
        if interval and "val" in splits and trainer.epoch % interval == 0:
            tester.test(
                {"val": splits["val"]},
                trainer.epoch,
                models["trunk"],
                models["embedder"],
                [("val", ["val"])],
            )
        record_keeper.save_records()
        save_checkpoint(trainer, hooks, ckpt_dir, trainer.epoch, sampler)
        return True

    trainer_class = distributed.with_ddp(
        with_amp(registry.get(trainer_name, "trainers"), config["amp"]), ctx
    )
    # as registry.build: the runner's values take precedence over the config's
    trainer = trainer_class(
        **trainer_kwargs
        | dict(
            models=models,
            optimizers=optimizers,
            batch_size=config["batch_size"],
            loss_funcs={"metric_loss": loss},
            mining_funcs={"tuple_miner": miner} if miner is not None else {},
            dataset=splits["train"],
            sampler=sampler,
            iterations_per_epoch=config.get("iterations_per_epoch"),
            dataloader_num_workers=config["num_workers"],
            data_device=device,
            lr_schedulers=schedulers,
            freeze_trunk_batchnorm=config["model"]["freeze_bn"],
            end_of_iteration_hook=end_of_iteration,
            end_of_epoch_hook=end_of_epoch,
        )
    )
    start_epoch = prep.resume_epoch + 1
    if prep.resume_epoch:
        load_checkpoint(trainer, hooks, ckpt_dir, prep.resume_epoch, device, sampler)
        LOG.info("resuming %s from epoch %d", out, prep.resume_epoch)
    distributed.wrap_trainer(trainer, ctx, seed=config["seed"], epoch=prep.resume_epoch)
    if start_epoch <= epochs:
        trainer.train(start_epoch=start_epoch, num_epochs=epochs)
    if not main:
        distributed.finish()
        return {}
    record_keeper.save_records()

    tester.test(eval_splits, epochs, models["trunk"], models["embedder"], plan)
    trained = clean_metrics(tester.all_accuracies)
    query = figure_points.query_split(config, splits)
    figure_points.write(out, *figure_points.embed(models, splits[query], device), query)
    metrics = {
        "untrained": untrained,
        "trained": trained,
        "epochs": epochs,
        "eval_plan": [[q, refs] for q, refs in plan],
    }
    info = manifest(prep, time.time() - t0, max(0, epochs - prep.resume_epoch))
    info["world_size"] = ctx.world_size
    files.write_json(out / "manifest.json", info)
    files.write_json(out / "metrics.json", metrics)  # last: it marks the run finished
    if config["distributed"]:
        distributed.finish()
    return metrics


def run(
    config_path: str | Path,
    out: str | Path | None = None,
    resume: bool = False,
    overrides: Mapping[str, Any] | None = None,
) -> tuple[Path, dict[str, Any]]:
    """Load, validate, prepare, train, evaluate: ``pml-plugins train``."""
    config = cfg_mod.load(config_path, overrides=overrides)
    prep = prepare(config, out=out, resume=resume)
    if prep.finished:
        return prep.out, finished_metrics(prep.out)
    return prep.out, train_and_evaluate(prep)


def format_metrics(metrics: Mapping[str, Any]) -> str:
    """A plain-text table: one row per metric, untrained vs trained, per evaluated split."""
    lines = []
    for split, trained in metrics.get("trained", {}).items():
        untrained = metrics["untrained"].get(split, {})
        lines.append(f"{split:<34} {'untrained':>10} {'trained':>10}")
        for name in sorted(trained):
            before = untrained.get(name, float("nan"))
            lines.append(f"  {name:<32} {before:>10.4f} {trained[name]:>10.4f}")
    return "\n".join(lines)
