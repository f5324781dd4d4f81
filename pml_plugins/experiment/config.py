"""Load and validate an experiment YAML, before anything is built or written.

One JSON Schema (``experiment.schema.yaml`` beside this module) describes the file; the
Snakemake workflow validates each grid cell against the same file. After the schema,
``validate`` checks what a schema cannot: that every component name resolves in the
registry as the right kind, that each argument whose default is a number (or true /
false) is given one, that no argument is NaN (nor, for an optimiser or a learning-rate
scheduler, infinite), that a loss's ``embedding_size`` is the model's, that the loss,
miner, optimisers and learning-rate schedulers can be built from their arguments (they are
built once, on the CPU, and dropped; a scheduler also takes one step), and that the data
folder exists. ``check_labels`` (also reachable as ``check_sampler``) checks the batch /
sampler combination and a loss's ``num_classes`` against the training labels once they
are loaded. Every error is a ``ConfigError`` naming the key path, the bad value and what
is allowed. ``ExperimentConfig.from_dict`` is a typed, read-only view of the validated dict.
"""

from __future__ import annotations

import copy
import functools
import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any, Literal

import jsonschema
import numpy as np
import yaml

from .. import registry

SCHEMA_PATH = Path(__file__).with_name("experiment.schema.yaml")

#: config key -> registry kind of the component it names
COMPONENT_KINDS = {
    "loss": "losses",
    "miner": "miners",
    "sampler": "samplers",
    "trainer": "trainers",
    "model.trunk": "models",
}
#: sampler kwargs the runner supplies from the data set
SAMPLER_RUNTIME_KWARGS = ("labels", "length_before_new_iter", "batch_size")
#: the number of classes a loss is built with at validation, before the data is read
TRIAL_NUM_CLASSES = 2
#: the optimiser a learning-rate scheduler is tried on where the config names none
TRIAL_OPTIMIZER = {"Adam": {"lr": 1e-3}}
#: kinds whose numeric arguments must be finite (an infinite learning rate is never meant)
FINITE_KINDS = ("optimizers", "lr_schedulers")


class ConfigError(ValueError):
    """An experiment config that cannot run; the message says where and how to fix it."""


@functools.cache
def _schema() -> dict[str, Any]:
    return yaml.safe_load(SCHEMA_PATH.read_text())


def load_schema() -> dict[str, Any]:
    """The experiment JSON Schema (a fresh copy; the file is read and parsed once)."""
    return copy.deepcopy(_schema())


def _path(parts: Any) -> str:
    return ".".join(str(p) for p in parts) or "<top level>"


def _is_spec_schema(schema: Mapping[str, Any]) -> bool:
    return str(schema.get("description", "")).startswith("a component")


def _schema_error_message(error: jsonschema.ValidationError) -> str:
    where = _path(error.absolute_path)
    if error.validator == "oneOf" and _is_spec_schema(error.schema):
        return (
            f"{where}: {error.instance!r} is not a component spec; write 'Name' or "
            f"{{Name: {{kwargs}}}}"
        )
    if error.context:
        return _schema_error_message(jsonschema.exceptions.best_match(error.context))
    if error.validator == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        extra = sorted(set(error.instance) - set(allowed))
        first = extra[0] if where == "<top level>" else f"{where}.{extra[0]}"
        return (
            f"unknown key {first!r} ({', '.join(repr(e) for e in extra)} not allowed); "
            f"allowed keys here: {', '.join(allowed)}"
        )
    if error.validator == "enum":
        return f"{where}: {error.instance!r} is not allowed; use one of {error.validator_value}"
    return f"{where}: {error.message}"


def _fill_defaults(schema: Mapping[str, Any], data: dict[str, Any]) -> dict[str, Any]:
    for key, sub in schema.get("properties", {}).items():
        if key not in data and "default" in sub:
            data[key] = copy.deepcopy(sub["default"])
        if isinstance(data.get(key), dict) and sub.get("type") == "object":
            _fill_defaults(sub, data[key])
    return data


def validate(raw: Mapping[str, Any], check_data: bool = True) -> dict[str, Any]:
    """Validate a config mapping and return it with defaults filled in.

    ``check_data=False`` skips the data-folder check (dry builds of paper configs).
    """
    config = _fill_defaults(_check_schema(raw), copy.deepcopy(dict(raw)))
    _check_cross_validation(config["dataset"])
    _check_components(config)
    _check_buildable(config)
    if check_data:
        from .data import check_root

        try:
            check_root(config["dataset"])
        except FileNotFoundError as exc:
            raise ConfigError(f"dataset.root: {exc}") from None
    return config


def _check_schema(raw: Any) -> dict[str, Any]:
    """Check ``raw`` against the schema (a ConfigError naming the first bad key); the schema."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"an experiment config is a mapping of keys, got {type(raw).__name__}")
    schema = load_schema()
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(raw), key=lambda e: (len(e.absolute_path), str(e.path)))
    if errors:
        raise ConfigError(f"invalid config: {_schema_error_message(errors[0])}")
    return schema


@dataclass(frozen=True)
class Evaluation:
    """The ``evaluation`` block of a validated config."""

    k_values: tuple[int, ...]
    clustering: bool | Literal["auto"]  # NMI, AMI and F1; auto: on below 5000 classes
    batch_size: int
    interval: int  # evaluate the validation split every N epochs; 0: before and after only


@dataclass(frozen=True)
class ExperimentConfig:
    """A typed, read-only view of the dict :func:`validate` returns, for code that reads it.

    The dict stays the data (``config.yaml`` holds it, run folders are compared by it);
    the view holds copies, so neither changes the other. Components stay specs (``"Name"``
    or ``{Name: {kwargs}}``), as :func:`.registry.build` takes them. The keys not shown here
    (the ``dataset`` and ``model`` blocks, optimisers, ...) are read from the dict.
    """

    dataset_name: str
    embedding_size: int
    evaluation: Evaluation
    loss: Any
    trainer: Any
    batch_size: int
    allow_repeated_samples: bool
    epochs: int
    seed: int
    device: str  # auto, cpu, cuda or cuda:N
    amp: Literal["off", "bf16", "fp16"]
    channels_last: bool
    num_workers: int
    distributed: bool
    name: str | None = None
    miner: Any = None
    sampler: Any = None
    iterations_per_epoch: int | None = None
    output: str | None = None

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> ExperimentConfig:
        """The view of ``config``, as :func:`validate` returns it (defaults filled in); a
        ConfigError where it does not pass the schema or lacks a key."""
        _check_schema(config)
        nested = ("dataset_name", "embedding_size", "evaluation")
        try:
            top = {  # the keys without a default in the schema may be absent
                f.name: copy.deepcopy(
                    config[f.name] if f.default is MISSING else config.get(f.name)
                )
                for f in fields(cls)
                if f.name not in nested
            }
            ev = config["evaluation"]
            return cls(
                dataset_name=config["dataset"]["name"],
                embedding_size=config["model"]["embedding_size"],
                evaluation=Evaluation(
                    tuple(ev["k_values"]), ev["clustering"], ev["batch_size"], ev["interval"]
                ),
                **top,
            )
        except KeyError as exc:
            raise ConfigError(
                f"key {exc.args[0]!r} is missing: an ExperimentConfig is a view of the config "
                f"that config.validate returns, with the defaults filled in"
            ) from None


def _check_cross_validation(dataset: Mapping[str, Any]) -> None:
    cv = dataset.get("cross_validation")
    if not cv:
        return
    if cv["fold"] >= cv["folds"]:
        raise ConfigError(
            f"dataset.cross_validation.fold: {cv['fold']} is not a fold of {cv['folds']}; "
            f"use 0 to {cv['folds'] - 1}"
        )
    if dataset.get("val_classes"):
        raise ConfigError(
            "dataset.val_classes: a cross-validation fold is its own validation split; "
            "remove val_classes or cross_validation"
        )


def _lookup(config: Mapping[str, Any], dotted: str) -> Any:
    value: Any = config
    for part in dotted.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _type_problem(value: Any, default: Any) -> str | None:
    """Why ``value`` cannot stand where the constructor's default is ``default``, if it
    cannot: a number's place takes a number (or null), a true/false flag's takes a bool."""
    if isinstance(default, bool):
        if isinstance(value, bool):
            return None
        return f"{value!r} is not true or false (the default is {str(default).lower()})"
    if _is_number(default) and value is not None and not _is_number(value):
        hint = ""
        if isinstance(value, str):
            try:
                float(value)
                hint = f"; YAML reads {value} as a string: write it with a dot, e.g. 1.0e-3"
            except ValueError:
                pass
        return (
            f"{value!r} is a {type(value).__name__}, not a number (the default is "
            f"{default!r}){hint}"
        )
    return None


def _check_argument_types(key: str, cls: type, kwargs: Mapping[str, Any]) -> None:
    """Each argument whose default is a number or a flag is given a value of that type."""
    defaults = registry.constructor_defaults(cls)
    for arg, value in kwargs.items():
        if arg not in defaults:
            continue
        problem = _type_problem(value, defaults[arg])
        if problem is not None:
            raise ConfigError(f"{key}.{arg}: {problem}")


def _non_finite(value: Any) -> float | None:
    """The first NaN or infinite number in ``value`` (a number or a list of them), else None."""
    if isinstance(value, float) and not math.isfinite(value):
        return value
    if isinstance(value, (list, tuple)):
        for item in value:
            found = _non_finite(item)
            if found is not None:
                return found
    return None


def _check_finite(key: str, kwargs: Mapping[str, Any], allow_infinite: bool) -> None:
    """No argument is NaN; none is infinite unless ``allow_infinite``."""
    for arg, value in kwargs.items():
        bad = _non_finite(value)
        if bad is None or (allow_infinite and not math.isnan(bad)):
            continue
        what = "is not a finite number" if bad is value else f"holds {bad!r}"
        raise ConfigError(f"{key}.{arg}: {value!r} {what}; use a finite number")


def _check_spec(key: str, spec: Any, kind: str) -> None:
    name, kwargs = registry.parse_spec(spec)
    try:
        cls = registry.get(name, kind)
    except registry.UnknownComponentError as exc:
        raise ConfigError(f"{key}: {exc}") from None
    params = registry.constructor_arguments(cls)
    if params is not None:
        unknown = sorted(set(kwargs) - set(params))
        if unknown:
            raise ConfigError(
                f"{key}.{name}: unknown argument {', '.join(repr(u) for u in unknown)}; "
                f"{name} takes: {', '.join(p for p in params if p not in SAMPLER_RUNTIME_KWARGS)}"
            )
    _check_argument_types(f"{key}.{name}", cls, kwargs)
    _check_finite(f"{key}.{name}", kwargs, allow_infinite=kind not in FINITE_KINDS)
    for sub_key, value in kwargs.items():
        nested = sub_key in registry.NESTED_KEYS and registry.names_component(value)
        if nested or registry.is_spec(value):
            _check_spec(f"{key}.{name}.{sub_key}", value, None)


def _check_components(config: Mapping[str, Any]) -> None:
    for key, kind in COMPONENT_KINDS.items():
        spec = _lookup(config, key)
        if spec is not None:
            _check_spec(key, spec, kind)
    for kind in ("optimizers", "lr_schedulers"):
        for part, spec in (config.get(kind) or {}).items():
            _check_spec(f"{kind}.{part}", spec, kind)
    _check_loss_embedding_size(config)


def _check_loss_embedding_size(config: Mapping[str, Any]) -> None:
    """A loss given its own ``embedding_size`` (a proxy loss) must be given the model's."""
    name, kwargs = registry.parse_spec(config["loss"])
    given, model = kwargs.get("embedding_size"), config["model"]["embedding_size"]
    if given is not None and given != model:
        raise ConfigError(
            f"loss.{name}.embedding_size: {given!r}, but model.embedding_size is {model}; "
            f"leave it out (the runner passes model.embedding_size) or set both alike"
        )


def _trial_build(key: str, spec: Any, build: Callable[[], Any]) -> Any:
    """``build()``, with a constructor's rejection of its arguments as a ConfigError.

    The torch random state is restored afterwards, so validating a config does not
    change what a seeded run draws.
    """
    import torch

    name, _ = registry.parse_spec(spec)
    with torch.random.fork_rng(devices=[]):
        try:
            return build()
        except (TypeError, ValueError, KeyError, AssertionError, RuntimeError) as exc:
            text = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
            reason = one_line(str(text)) or type(exc).__name__
            raise ConfigError(
                f"{key}: {name} cannot be built from these arguments: {reason}"
            ) from None


def _trial_step(optimizer: Any, scheduler: Any) -> None:
    """One optimiser step (no gradient: nothing changes) and one scheduler step: the
    scheduler's arithmetic on its arguments (``StepLR(step_size="x")``) runs now, not
    after the first epoch. Arguments the step requires (a plateau scheduler's metric)
    are given 0.0."""
    if _required_arguments(optimizer.step) == 0:
        optimizer.step()
    scheduler.step(*[0.0] * _required_arguments(scheduler.step))


def _required_arguments(method: Callable[..., Any]) -> int:
    """How many positional arguments ``method`` needs (besides ``self``, which a step
    wrapped by a scheduler shows)."""
    return sum(
        p.default is inspect.Parameter.empty
        and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        and name != "self"
        for name, p in inspect.signature(method).parameters.items()
    )


def _dummy_parameters() -> list[Any]:
    import torch

    return [torch.nn.Parameter(torch.zeros(1))]


def _check_buildable(config: Mapping[str, Any]) -> None:
    """Build the loss, miner, optimisers and schedulers once, to catch values their
    constructors reject (a negative or NaN learning rate, a distance a loss cannot use)
    before the run folder exists. Trunks (large), samplers and trainers (they need the
    data and the models) are checked by argument types only."""
    emb = config["model"]["embedding_size"]
    loss = config.get("loss")
    _trial_build(
        "loss",
        loss,
        lambda: registry.build_accepting(
            loss, "losses", num_classes=TRIAL_NUM_CLASSES, embedding_size=emb
        ),
    )
    miner = config.get("miner")
    if miner is not None:
        _trial_build("miner", miner, lambda: registry.build(miner, "miners"))
    optimizers = config.get("optimizers") or {}
    for part, spec in optimizers.items():
        _trial_build(
            f"optimizers.{part}",
            spec,
            lambda spec=spec: registry.build(spec, "optimizers", params=_dummy_parameters()),
        )
    for part, spec in (config.get("lr_schedulers") or {}).items():
        opt_spec = optimizers.get(part, TRIAL_OPTIMIZER)

        def build(spec: Any = spec, opt_spec: Any = opt_spec) -> Any:
            opt = registry.build(opt_spec, "optimizers", params=_dummy_parameters())
            scheduler = registry.build(spec, "lr_schedulers", optimizer=opt)
            _trial_step(opt, scheduler)
            return scheduler

        _trial_build(f"lr_schedulers.{part}", spec, build)


def one_line(text: str) -> str:
    """``text`` with its line breaks and runs of spaces collapsed (for one-line errors)."""
    return " ".join(str(text).split())


def describe_yaml_error(exc: yaml.YAMLError) -> str:
    """A one-line description of a YAML syntax error: the problem and where it is."""
    problem = getattr(exc, "problem", None) or getattr(exc, "reason", None)
    mark = getattr(exc, "problem_mark", None)
    if problem and mark is not None:
        return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"
    if problem and getattr(exc, "position", None) is not None:
        return f"{problem} at character {exc.position}"
    return one_line(str(exc))


def _yaml_kind(value: Any) -> str:
    """``a list``, ``a number``, ...: what a YAML document holds, in words."""
    if isinstance(value, list):
        return "a list"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return f"a {type(value).__name__}"


def _read_yaml(path: Path) -> Any:
    """The YAML content of the config file ``path``, or a ConfigError saying why not."""
    if path.is_dir():
        raise ConfigError(
            f"{str(path)!r} is a folder; pass the path of an experiment YAML file "
            f"(e.g. examples/default.yaml)"
        )
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist; pass the path of a YAML file")
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f)
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path}: not a text file (byte {exc.start} is not UTF-8); an experiment config "
            f"is a YAML text file"
        ) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {describe_yaml_error(exc)}") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read ({exc.strerror or exc})") from None


def load(path: str | Path, overrides: Mapping[str, Any] | None = None, **kw: Any) -> dict:
    """Read a YAML file (plus dotted-key ``overrides``) and validate it."""
    path = Path(path)
    raw = _read_yaml(path)
    raw = {} if raw is None else raw
    if not isinstance(raw, Mapping):
        raise ConfigError(
            f"{path}: an experiment config is a mapping of keys (loss: ..., epochs: ...), "
            f"but this file holds {_yaml_kind(raw)}"
        )
    for dotted, value in (overrides or {}).items():
        set_dotted(raw, dotted, value)
    return validate(raw, **kw)


def set_dotted(data: dict, dotted: str, value: Any) -> None:
    """``set_dotted(cfg, "model.embedding_size", 128)``; missing mappings are created.

    Raises ConfigError where a part of the path is empty or holds a value that is not a
    mapping (``epochs.x`` when ``epochs`` is a number).
    """
    parts = dotted.split(".")
    if not all(parts):
        raise ConfigError(
            f"override {dotted!r}: empty key; write a dotted key path such as model.embedding_size"
        )
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            where = ".".join(parts[: i + 1])
            raise ConfigError(
                f"override {dotted!r}: {where} is {node!r}, not a mapping of keys, so it has "
                f"no key {parts[i + 1]!r}; set {where} itself (e.g. {where}=...)"
            )
    node[parts[-1]] = value


def _check_count(key: str, value: Any) -> None:
    """``value`` (where given) is a whole number of at least 1."""
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ConfigError(f"{key}: {value!r} is not allowed; use a whole number of at least 1")


def check_labels(config: Mapping[str, Any], labels: np.ndarray) -> None:
    """What needs the training ``labels``: the batch / sampler combination must be
    possible on them, and a loss given ``num_classes`` must have a class for each."""
    view = ExperimentConfig.from_dict(config)
    _check_sampler_on(view, labels)
    _check_loss_classes(view.loss, labels)


def _check_loss_classes(loss: Any, labels: np.ndarray) -> None:
    name, kwargs = registry.parse_spec(loss)
    given, needed = kwargs.get("num_classes"), len(np.unique(labels))
    if _is_number(given) and given < needed:
        raise ConfigError(
            f"loss.{name}.num_classes: {given}, but the training split has {needed} classes; "
            f"leave it out (the runner passes the number of training classes) or use at "
            f"least {needed}"
        )


def _check_sampler_on(config: ExperimentConfig, labels: np.ndarray) -> None:
    """The batch / sampler combination must be possible on these labels."""
    if config.sampler is None:
        return
    name, kwargs = registry.parse_spec(config.sampler)
    batch_size = config.batch_size
    _, counts = np.unique(labels, return_counts=True)
    for arg in ("m", "samples_per_class", "classes_per_batch"):
        _check_count(f"sampler.{name}.{arg}", kwargs.get(arg))
    m = kwargs.get("m", kwargs.get("samples_per_class"))
    if m is None:
        return
    if name == "MPerClassSampler":
        if batch_size % m != 0:
            raise ConfigError(
                f"sampler.{name}.m: batch_size {batch_size} is not a multiple of m={m}; "
                f"choose a batch_size divisible by m"
            )
        if batch_size // m > len(counts):
            raise ConfigError(
                f"sampler.{name}.m: batch_size {batch_size} / m={m} needs {batch_size // m} "
                f"classes per batch but the training split has {len(counts)}; lower batch_size "
                f"or raise m"
            )
        if m > counts.min() and not config.allow_repeated_samples:
            small = int((counts < m).sum())
            raise ConfigError(
                f"sampler.{name}.m: m={m} is larger than the smallest training class "
                f"({counts.min()} samples; {small} of {len(counts)} classes have fewer than "
                f"m); use m <= {counts.min()}, or set allow_repeated_samples: true to let the "
                f"sampler repeat images"
            )
    classes = kwargs.get("classes_per_batch")
    if classes is not None and classes > len(counts):
        raise ConfigError(
            f"sampler.{name}.classes_per_batch: {classes} classes per batch but the training "
            f"split has {len(counts)}; lower it"
        )


#: the earlier name of :func:`check_labels`
check_sampler = check_labels


def dump(config: Mapping[str, Any], path: str | Path) -> None:
    """Write ``config`` as YAML, atomically (see :func:`.files.atomic_write`)."""
    from .files import atomic_write

    atomic_write(path, yaml.safe_dump(dict(config), sort_keys=False))
