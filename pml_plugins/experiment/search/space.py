"""Search spaces: per component, the distribution of each constructor argument searched.

A space is declared in YAML by component name (the registry's name), one entry per
argument::

    MultiSimilarityLoss:
      alpha: {float: [0.01, 100], log: true}
      base: {float: [0, 1]}
    GradMLLoss:
      k: {int: [1, 4]}
    LoOpLoss:
      base: {choice: [hphn_triplet, npair]}

An experiment's space is the entries of the components it uses (``loss``, ``miner``,
``sampler``, ``trainer``): the Optuna parameter ``loss.MultiSimilarityLoss.alpha`` is the
argument ``alpha`` of the config's ``loss: {MultiSimilarityLoss: {...}}``. A loss given as
``MetrixLoss`` and a miner given as ``MultiSimilarityMiner`` search both entries.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import Any

import optuna.distributions as od

from ... import registry

#: the config keys whose components a space can search
COMPONENT_KEYS = ("loss", "miner", "sampler", "trainer")


class SearchSpaceError(ValueError):
    """A search space that cannot be searched; the message names the entry."""


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def distribution(where: str, spec: Any) -> od.BaseDistribution:
    """``{float: [lo, hi], log: bool}``, ``{int: [lo, hi], log: bool}`` or ``{choice: [...]}``."""
    if not isinstance(spec, Mapping):
        raise SearchSpaceError(
            f"{where}: {spec!r} is not a distribution; write {{float: [low, high]}}, "
            f"{{int: [low, high]}} or {{choice: [a, b, ...]}} (log: true for a log scale)"
        )
    kinds = [k for k in ("float", "int", "choice") if k in spec]
    extra = sorted(set(spec) - {"float", "int", "choice", "log"})
    if len(kinds) != 1 or extra:
        raise SearchSpaceError(
            f"{where}: {dict(spec)!r}: give exactly one of float, int or choice (and log: "
            f"true/false for float and int)"
        )
    kind, values = kinds[0], spec[kinds[0]]
    if kind == "choice":
        if not isinstance(values, list) or len(values) < 2 or "log" in spec:
            raise SearchSpaceError(f"{where}: choice needs a list of 2 or more values, no log")
        return od.CategoricalDistribution(values)
    log = spec.get("log", False)
    if (
        not isinstance(values, list)
        or len(values) != 2
        or not all(_number(v) for v in values)
        or not isinstance(log, bool)
    ):
        raise SearchSpaceError(f"{where}: {kind} needs [low, high], two finite numbers")
    low, high = values
    if kind == "int" and not all(float(v).is_integer() for v in values):
        raise SearchSpaceError(f"{where}: int needs whole numbers, got {values}")
    if not low < high:
        raise SearchSpaceError(f"{where}: low {low} must be below high {high}")
    if log and low <= 0:
        raise SearchSpaceError(f"{where}: a log scale needs low > 0, got {low}")
    if kind == "int":
        return od.IntDistribution(int(low), int(high), log=log)
    return od.FloatDistribution(float(low), float(high), log=log)


def check_spaces(spaces: Any) -> dict[str, dict[str, od.BaseDistribution]]:
    """Every entry of a spaces mapping, parsed: component -> argument -> distribution.

    A component must be a name the registry knows, and each argument one its constructor
    takes."""
    if not isinstance(spaces, Mapping) or not spaces:
        raise SearchSpaceError(
            "search.spaces: a mapping of component name -> argument -> distribution"
        )
    out: dict[str, dict[str, od.BaseDistribution]] = {}
    for name, params in spaces.items():
        try:
            cls = registry.get(name)
        except registry.UnknownComponentError as exc:
            raise SearchSpaceError(f"search.spaces.{name}: {exc.args[0]}") from None
        if not isinstance(params, Mapping) or not params:
            raise SearchSpaceError(f"search.spaces.{name}: a mapping of argument -> distribution")
        allowed = registry.constructor_arguments(cls)
        out[name] = {}
        for arg, spec in params.items():
            if allowed is not None and arg not in allowed:
                raise SearchSpaceError(
                    f"search.spaces.{name}.{arg}: {name} takes no argument {arg!r}; its "
                    f"arguments: {', '.join(allowed)}"
                )
            out[name][arg] = distribution(f"search.spaces.{name}.{arg}", spec)
    return out


def experiment_space(
    config: Mapping[str, Any], spaces: Mapping[str, Mapping[str, od.BaseDistribution]]
) -> dict[str, od.BaseDistribution]:
    """``{"loss.GradMLLoss.k": distribution, ...}`` for the components ``config`` uses."""
    out = {}
    for key in COMPONENT_KEYS:
        spec = config.get(key)
        if not spec:
            continue
        name, _ = registry.parse_spec(spec)
        for arg, dist in spaces.get(name, {}).items():
            out[f"{key}.{name}.{arg}"] = dist
    return out


def apply(config: Mapping[str, Any], params: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``config`` with each ``key.Name.arg`` of ``params`` set in its component."""
    out = copy.deepcopy(dict(config))
    for path, value in params.items():
        key, name, arg = path.split(".", 2)
        current, kwargs = registry.parse_spec(out[key])
        if current != name:
            raise SearchSpaceError(
                f"parameter {path!r}: the config's {key} is {current}, not {name}"
            )
        out[key] = {name: {**kwargs, arg: value}}
    return out


def describe(space: Mapping[str, od.BaseDistribution]) -> dict[str, str]:
    """``{"loss.GradMLLoss.k": "int [1, 4]", ...}``: the space as a reader sees it."""
    out = {}
    for path, dist in space.items():
        if isinstance(dist, od.CategoricalDistribution):
            out[path] = "choice " + ", ".join(map(str, dist.choices))
        else:
            kind = "int" if isinstance(dist, od.IntDistribution) else "float"
            out[path] = f"{kind} [{dist.low:g}, {dist.high:g}]" + (" log" if dist.log else "")
    return out
