"""One name -> class table for every component: PML's built-ins, our plugins, entry points.

A component is named in Python, the CLI, the experiment YAML and the workflow in the
same way: ``"Name"`` or ``{"Name": {kwargs}}``.  Nested components (``distance``,
``reducer``, ``miner``, ``loss``, inner losses, ...) are given in the same form inside
the kwargs and built recursively::

    from pml_plugins import registry
    loss = registry.build({"NRALoss": {"alpha": 4, "reducer": "MeanReducer"}})

Third-party packages add components through the entry-point group ``pml_plugins``::

    [project.entry-points.pml_plugins]
    MyLoss = "my_package.losses:MyLoss"

The kind of an entry-point class is found from its PML base class; an entry point named
``kind.Name`` (e.g. ``losses.MyLoss``) states it explicitly. An entry point that cannot
be loaded is reported as a warning and skipped, so one broken package does not stop the
commands that do not need it. An entry point whose name is already taken (by a PML
class, one of ours or another entry point) makes that name an error, naming both, until
one of them is renamed or uninstalled: neither is used silently in place of the other.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib import metadata
from typing import Any

ENTRY_POINT_GROUP = "pml_plugins"
LOG = logging.getLogger("pml_plugins")

#: kinds of PML built-ins, each read from ``pytorch_metric_learning.<kind>``
PML_KINDS = (
    "losses",
    "miners",
    "distances",
    "reducers",
    "regularizers",
    "samplers",
    "trainers",
    "testers",
)
#: every kind the registry knows, in listing order
KINDS = (*PML_KINDS, "optimizers", "lr_schedulers", "models", "datasets")

SINGULAR = {
    "losses": "loss",
    "miners": "miner",
    "distances": "distance",
    "reducers": "reducer",
    "regularizers": "regularizer",
    "samplers": "sampler",
    "trainers": "trainer",
    "testers": "tester",
    "optimizers": "optimizer",
    "lr_schedulers": "learning-rate scheduler",
    "models": "model",
    "datasets": "dataset",
}

#: our subpackages, each read through its ``__all__``
PLUGIN_MODULES = {
    "losses": "pml_plugins.losses",
    "miners": "pml_plugins.miners",
    "samplers": "pml_plugins.samplers",
    "trainers": "pml_plugins.trainers",
    "models": "pml_plugins.models",
}

#: kwargs whose plain-string values are component names, not strings
NESTED_KEYS = frozenset(
    {
        "distance",
        "reducer",
        "miner",
        "loss",
        "inner_loss",
        "base_loss",
        "loss_func",
        "embedding_regularizer",
        "weight_regularizer",
        "inner_miner",
    }
)


class UnknownComponentError(KeyError, ValueError):
    """A component name that the registry does not know."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class NameClashError(UnknownComponentError):
    """A name that two components claim (e.g. a PML class and an entry point): which one
    is meant is unknown, so neither is used."""


@dataclass(frozen=True)
class Entry:
    """One registered component."""

    name: str
    kind: str
    cls: type
    source: str  # "pml", "torch", "pml_plugins" or the entry point's distribution

    @property
    def is_plugin(self) -> bool:
        return self.source != "pml" and self.source != "torch"


_TABLE: dict[str, Entry] | None = None
#: names claimed twice -> the message that names both claimants
_CLASHES: dict[str, str] = {}


def _public_classes(module: Any, names: Iterable[str] | None = None) -> dict[str, type]:
    names = names if names is not None else getattr(module, "__all__", dir(module))
    out = {}
    for name in names:
        if name.startswith("_"):
            continue
        obj = getattr(module, name, None)
        if inspect.isclass(obj):
            out[name] = obj
    return out


def _kind_of(cls: type) -> str:
    """The kind of a class, from the PML or torch base class it derives from."""
    from pytorch_metric_learning import distances, losses, miners, reducers, regularizers, testers
    from pytorch_metric_learning.trainers import BaseTrainer
    from torch.optim import Optimizer
    from torch.optim.lr_scheduler import LRScheduler
    from torch.utils.data import Dataset, Sampler

    bases = [
        (miners.BaseMiner, "miners"),
        (regularizers.BaseRegularizer, "regularizers"),
        (losses.BaseMetricLossFunction, "losses"),
        (distances.BaseDistance, "distances"),
        (reducers.BaseReducer, "reducers"),
        (BaseTrainer, "trainers"),
        (testers.BaseTester, "testers"),
        (Sampler, "samplers"),
        (Optimizer, "optimizers"),
        (LRScheduler, "lr_schedulers"),
        (Dataset, "datasets"),
    ]
    for base, kind in bases:
        if issubclass(cls, base):
            return kind
    import torch

    if issubclass(cls, torch.nn.Module):
        return "losses" if "Loss" in cls.__name__ else "models"
    return "other"


def _pml_entries() -> dict[str, Entry]:
    import torch

    table: dict[str, Entry] = {}
    for kind in PML_KINDS:
        package = f"pytorch_metric_learning.{kind}"
        module = importlib.import_module(package)
        for name, cls in _public_classes(module, names=dir(module)).items():
            # keep the classes defined in that subpackage, not re-exported helpers
            if cls.__module__.startswith(package):
                table[name] = Entry(name, kind, cls, "pml")
    for name, cls in _public_classes(torch.optim, names=dir(torch.optim)).items():
        if issubclass(cls, torch.optim.Optimizer) and cls is not torch.optim.Optimizer:
            table[name] = Entry(name, "optimizers", cls, "torch")
    sched = torch.optim.lr_scheduler
    for name, cls in _public_classes(sched, names=dir(sched)).items():
        if issubclass(cls, sched.LRScheduler) and cls is not sched.LRScheduler:
            table[name] = Entry(name, "lr_schedulers", cls, "torch")
    return table


def _plugin_entries() -> dict[str, Entry]:
    table: dict[str, Entry] = {}
    for kind, module_name in PLUGIN_MODULES.items():
        module = importlib.import_module(module_name)
        for name, cls in _public_classes(module).items():
            table[name] = Entry(name, kind, cls, "pml_plugins")
    return table


def _describe(entry: Entry) -> str:
    """``module.Class (source)``: where a registered class comes from."""
    return f"{entry.cls.__module__}.{entry.cls.__qualname__} ({entry.source})"


def _load_entry_point(ep: metadata.EntryPoint) -> Entry | None:
    """The entry of one entry point, or None (with a warning) where it cannot be used."""
    dist = getattr(getattr(ep, "dist", None), "name", None) or "entry point"
    where = f"entry point {ep.name!r} = {ep.value!r} (group {ENTRY_POINT_GROUP!r}, from {dist})"
    try:
        cls = ep.load()
    except Exception as exc:  # a broken third-party plugin must not break the others
        LOG.warning(
            "%s could not be loaded and is skipped (%s: %s); fix or uninstall the package "
            "that provides it",
            where,
            type(exc).__name__,
            exc,
        )
        return None
    kind, _, name = ep.name.rpartition(".")
    kind = kind or _kind_of(cls)
    if kind not in KINDS:
        LOG.warning(
            "%s is skipped: unknown kind %r; name it '<kind>.%s' with one of %s",
            where,
            kind,
            name,
            ", ".join(KINDS),
        )
        return None
    return Entry(name, kind, cls, dist)


def _add_entry_points(table: dict[str, Entry]) -> None:
    """Add the entry points to ``table``; a name that is already taken becomes a clash."""
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        new = _load_entry_point(ep)
        if new is None:
            continue
        name = new.name
        old = table.get(name)
        if name in _CLASHES:
            _CLASHES[name] += f"; also claimed by the entry point {ep.value!r} ({new.source})"
        elif old is None or old.cls is new.cls:
            table[name] = new
        else:
            del table[name]
            _CLASHES[name] = (
                f"{name!r} names two components: {_describe(old)} and the entry point "
                f"{ep.name} = {ep.value!r} (module {new.cls.__module__}, from {new.source}); "
                f"rename the entry point in that package, or uninstall it"
            )


def _table() -> dict[str, Entry]:
    global _TABLE
    if _TABLE is None:
        _CLASHES.clear()
        table = _pml_entries()
        table.update(_plugin_entries())
        _add_entry_points(table)
        _TABLE = table
    return _TABLE


def clashes() -> dict[str, str]:
    """Names that two components claim -> a message naming both (see :class:`NameClashError`)."""
    _table()
    return dict(_CLASHES)


def refresh() -> None:
    """Forget the table, so that the next look-up reads entry points again."""
    global _TABLE
    _TABLE = None


def register(cls: type, name: str | None = None, kind: str | None = None) -> type:
    """Register a class at run time (also usable as a decorator)."""
    name = name or cls.__name__
    kind = kind or _kind_of(cls)
    _table()[name] = Entry(name, kind, cls, "runtime")
    return cls


def _a(kind: str) -> str:
    """``"a loss"``, ``"an optimizer"``: one component of ``kind``, in words."""
    word = SINGULAR.get(kind, kind)
    return f"{'an' if word[0] in 'aeiou' else 'a'} {word}"


def entry(name: str, kind: str | None = None) -> Entry:
    """The registry entry of ``name``; ``kind`` restricts the search."""
    table = _table()
    if name in _CLASHES:
        raise NameClashError(_CLASHES[name])
    found = table.get(name)
    if found is not None and (kind is None or found.kind == kind):
        return found
    candidates = [n for n, e in table.items() if kind is None or e.kind == kind]
    close = difflib.get_close_matches(name, candidates, n=3, cutoff=0.5)
    what = SINGULAR.get(kind, "component")
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    where = f" ({name!r} is registered, but as {_a(found.kind)})" if found is not None else ""
    raise UnknownComponentError(
        f"unknown {what} {name!r}{where}.{hint} Run `pml-plugins list` to see every "
        f"registered name, or register a class through the {ENTRY_POINT_GROUP!r} entry-point group."
    )


def get(name: str, kind: str | None = None) -> type:
    """The class registered as ``name``."""
    return entry(name, kind).cls


def names(kind: str | None = None) -> list[str]:
    """Sorted names of every registered component (of one kind)."""
    if kind is not None and kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; use one of {', '.join(KINDS)}")
    return sorted(n for n, e in _table().items() if kind is None or e.kind == kind)


def entries(kind: str | None = None) -> list[Entry]:
    """Registry entries (of one kind), sorted by kind then name."""
    order = {k: i for i, k in enumerate(KINDS)}
    rows = [e for e in _table().values() if kind is None or e.kind == kind]
    return sorted(rows, key=lambda e: (order.get(e.kind, len(order)), e.name))


def parse_spec(spec: Any) -> tuple[str, dict[str, Any]]:
    """Split ``"Name"`` or ``{"Name": {kwargs}}`` into ``(name, kwargs)``."""
    if isinstance(spec, str):
        return spec, {}
    if isinstance(spec, Mapping) and len(spec) == 1:
        ((name, kwargs),) = spec.items()
        if kwargs is None:
            kwargs = {}
        if isinstance(name, str) and isinstance(kwargs, Mapping):
            return name, dict(kwargs)
    raise ValueError(f"a component spec is 'Name' or {{'Name': {{kwargs}}}}, got {spec!r}")


def is_spec(value: Any) -> bool:
    """True where ``value`` is a ``{"Name": {kwargs}}`` mapping naming a component
    (see :func:`names_component`: a typo in a class-like name is a spec that fails to
    build, not a plain dict passed on silently). The one definition: :func:`build`,
    the config checks and the grid's merge (a spec is replaced whole) all use it."""
    if not (isinstance(value, Mapping) and len(value) == 1):
        return False
    ((name, kwargs),) = value.items()
    return names_component(name) and (kwargs is None or isinstance(kwargs, Mapping))


def names_component(value: Any) -> bool:
    """A plain string under a nested key names a component when it is registered or
    looks like a class name (so a typo fails loudly); other strings (e.g. MetrixLoss's
    ``loss="contrastive"``) pass through unchanged."""
    return isinstance(value, str) and (value[:1].isupper() or value in _table())


def _resolve(key: str | None, value: Any) -> Any:
    if (key in NESTED_KEYS and names_component(value)) or is_spec(value):
        return build(value)
    if isinstance(value, list):
        return [_resolve(None, v) for v in value]
    return value


def build(spec: Any, kind: str | None = None, **extra: Any) -> Any:
    """Instantiate ``spec`` (``"Name"`` or ``{"Name": {kwargs}}``), nested specs included.

    ``extra`` kwargs (e.g. ``params`` for an optimizer, ``labels`` for a sampler) are
    passed alongside the spec's own.
    """
    name, kwargs = parse_spec(spec)
    cls = get(name, kind)
    resolved = {k: _resolve(k, v) for k, v in kwargs.items()}
    resolved.update(extra)
    try:
        return cls(**resolved)
    except TypeError as exc:
        params = constructor_arguments(cls)
        unknown = sorted(set(resolved) - set(params)) if params is not None else []
        if unknown:
            raise TypeError(
                f"{name} does not take {', '.join(repr(u) for u in unknown)}; "
                f"its arguments are: {', '.join(params) or '(none)'}"
            ) from exc
        raise TypeError(f"{name}({_fmt(resolved)}) failed: {exc}") from exc


def _constructor_parameters(cls: type) -> list[inspect.Parameter] | None:
    """Explicit keyword parameters of ``cls``'s constructor chain (a subclass's own first),
    followed through the bases while each passes ``**kwargs`` on; None if a signature
    cannot be read (the class may take anything)."""
    params: dict[str, inspect.Parameter] = {}
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        try:
            sig = inspect.signature(init)
        except (TypeError, ValueError):
            return None
        has_var_kw = False
        for p in list(sig.parameters.values())[1:]:
            if p.kind is p.VAR_KEYWORD:
                has_var_kw = True
            elif p.kind is not p.VAR_POSITIONAL and p.name not in params:
                params[p.name] = p
        if not has_var_kw:
            break
    return list(params.values())


def constructor_arguments(cls: type) -> list[str] | None:
    """Explicit keyword names of ``cls``'s constructor chain; None if it takes anything."""
    params = _constructor_parameters(cls)
    return None if params is None else [p.name for p in params]


def constructor_defaults(cls: type) -> dict[str, Any]:
    """The default value of each constructor argument of ``cls`` that has one."""
    return {
        p.name: p.default
        for p in _constructor_parameters(cls) or []
        if p.default is not inspect.Parameter.empty
    }


def build_accepting(spec: Any, kind: str | None = None, **available: Any) -> Any:
    """Build ``spec``, passing those of the ``available`` kwargs (runtime values such as
    ``num_classes`` or ``labels``) that its class accepts and the spec does not set."""
    name, kwargs = parse_spec(spec)
    params = constructor_arguments(get(name, kind)) or []
    extra = {k: v for k, v in available.items() if k in params and k not in kwargs}
    return build({name: kwargs}, kind, **extra)


def _fmt(kwargs: Mapping[str, Any]) -> str:
    """``k=value`` for a number, string, bool or None, else ``k=TypeName``."""
    short = (int, float, str, bool, type(None))
    return ", ".join(
        f"{k}={repr(v) if isinstance(v, short) else type(v).__name__}" for k, v in kwargs.items()
    )
