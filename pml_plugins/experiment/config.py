"""Load and validate an experiment YAML, before anything is built or written.

One JSON Schema (``experiment.schema.yaml`` beside this module) describes the file; the
Snakemake workflow validates each grid cell against the same file. After the schema,
``validate`` checks what a schema cannot: that every component name resolves in the
registry as the right kind, and that the data folder exists. ``check_sampler`` checks
the batch / sampler combination against the data set's labels once they are loaded.
Every error is a ``ConfigError`` naming the key path, the bad value and what is allowed.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Mapping
from pathlib import Path
from typing import Any

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


class ConfigError(ValueError):
    """An experiment config that cannot run; the message says where and how to fix it."""


@functools.cache
def _schema_text() -> str:
    return SCHEMA_PATH.read_text()


def load_schema() -> dict[str, Any]:
    """The experiment JSON Schema (a fresh copy; the file is read once)."""
    return yaml.safe_load(_schema_text())


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
    if not isinstance(raw, Mapping):
        raise ConfigError(f"an experiment config is a mapping of keys, got {type(raw).__name__}")
    schema = load_schema()
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(raw), key=lambda e: (len(e.absolute_path), str(e.path)))
    if errors:
        raise ConfigError(f"invalid config: {_schema_error_message(errors[0])}")
    config = _fill_defaults(schema, copy.deepcopy(dict(raw)))
    _check_components(config)
    if check_data:
        from .data import check_root

        try:
            check_root(config["dataset"])
        except FileNotFoundError as exc:
            raise ConfigError(f"dataset.root: {exc}") from None
    return config


def _lookup(config: Mapping[str, Any], dotted: str) -> Any:
    value: Any = config
    for part in dotted.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


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
    for sub_key, value in kwargs.items():
        if sub_key in registry.NESTED_KEYS and registry.names_component(value):
            _check_spec(f"{key}.{name}.{sub_key}", value, None)
        elif registry.is_spec(value):
            _check_spec(f"{key}.{name}.{sub_key}", value, None)


def _check_components(config: Mapping[str, Any]) -> None:
    for key, kind in COMPONENT_KINDS.items():
        spec = _lookup(config, key)
        if spec is not None:
            _check_spec(key, spec, kind)
    for group, kind in (("optimizers", "optimizers"), ("lr_schedulers", "lr_schedulers")):
        for part, spec in (config.get(group) or {}).items():
            _check_spec(f"{group}.{part}", spec, kind)


def load(path: str | Path, overrides: Mapping[str, Any] | None = None, **kw: Any) -> dict:
    """Read a YAML file (plus dotted-key ``overrides``) and validate it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist; pass the path of a YAML file")
    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    raw = raw or {}
    for dotted, value in (overrides or {}).items():
        set_dotted(raw, dotted, value)
    return validate(raw, **kw)


def set_dotted(data: dict, dotted: str, value: Any) -> None:
    """``set_dotted(cfg, "model.embedding_size", 128)``."""
    parts = dotted.split(".")
    for part in parts[:-1]:
        data = data.setdefault(part, {})
    data[parts[-1]] = value


def check_sampler(config: Mapping[str, Any], labels: np.ndarray) -> None:
    """The batch / sampler combination must be possible on these labels."""
    spec = config.get("sampler")
    if spec is None:
        return
    name, kwargs = registry.parse_spec(spec)
    batch_size = config["batch_size"]
    _, counts = np.unique(labels, return_counts=True)
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
        if m > counts.min() and not config.get("allow_repeated_samples", False):
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


def dump(config: Mapping[str, Any], path: str | Path) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(dict(config), f, sort_keys=False)
