"""``pml-plugins``: train | evaluate | list | validate | aggregate.

pml-plugins train CONFIG [--out DIR] [--resume] [--set key=value ...]
pml-plugins evaluate RUN_DIR
pml-plugins list [--kind KIND] [--plugins]
pml-plugins validate CONFIG [...]
pml-plugins aggregate RUN_DIR... --out RESULTS_DIR
pml-plugins search SPEC [--trials N]
pml-plugins search-report SPEC --out DIR
pml-plugins ensemble BEST_JSON --out RUN_DIR

Bad input (a config, a ``--set``, a run folder, a full disk) ends in one line on stderr,
``pml-plugins: error: <what is wrong and how to fix it>``, and exit status 2, before
anything is written where the check can come first; anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations

import argparse
import errno
import logging
import sys
from pathlib import Path
from typing import Any

import yaml

from . import registry

EXIT_BAD_INPUT = 2


def _parse_set(items: list[str]) -> dict[str, Any]:
    """``["epochs=3", "model.embedding_size=2"]`` -> ``{"epochs": 3, ...}`` (values as YAML)."""
    from .experiment.config import ConfigError, describe_yaml_error

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key or not all(key.split(".")):
            raise ConfigError(f"--set {item!r}: write key.path=value (e.g. epochs=3)")
        try:
            out[key] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise ConfigError(
                f"--set {item!r}: the value {value!r} is not valid YAML "
                f"({describe_yaml_error(exc)}); quote it if it is a string"
            ) from None
    return out


def cmd_train(args: argparse.Namespace) -> int:
    overrides = _parse_set(args.set)
    from .experiment import run as run_mod

    out, metrics = run_mod.run(args.config, out=args.out, resume=args.resume, overrides=overrides)
    if metrics:  # empty on the non-main ranks of a distributed run
        print(run_mod.format_metrics(metrics))
        print(f"run folder: {out}")
    return 0


def read_metrics(run_dir: Path) -> dict[str, Any]:
    """The ``metrics.json`` of a finished run folder; a RunFileError where it is missing,
    damaged or not a run's metrics (both stages, as ``evaluate`` prints them side by side)."""
    from .experiment.aggregate import metrics_problem
    from .experiment.files import RunFileError, read_json

    path = run_dir / "metrics.json"
    if run_dir.exists() and not run_dir.is_dir():
        raise RunFileError(
            f"{run_dir} is a file, not a run folder; pass the folder that `pml-plugins train` "
            f"wrote (its --out)"
        )
    if not path.is_file():
        raise RunFileError(
            f"{path} does not exist: {run_dir} is not a finished run folder "
            f"(run `pml-plugins train CONFIG --out {run_dir}` first)"
        )
    fix = (
        f"evaluate the run again with `pml-plugins train {run_dir / 'config.yaml'} --out "
        f"{run_dir} --resume` (it reloads the last checkpoint)"
    )
    metrics = read_json(path, fix=fix)
    problem = metrics_problem(metrics, required=("trained", "untrained"))
    if problem is not None:
        raise RunFileError(f"{path} does not hold a run's metrics ({problem}); {fix}")
    return metrics


def cmd_evaluate(args: argparse.Namespace) -> int:
    metrics = read_metrics(Path(args.run_dir))
    from .experiment import run as run_mod

    print(run_mod.format_metrics(metrics))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    kinds = [args.kind] if args.kind else list(registry.KINDS)
    for kind in kinds:
        rows = [e for e in registry.entries(kind) if e.is_plugin or not args.plugins]
        if not rows:
            continue
        print(f"{kind}:")
        for e in rows:
            mark = f"  [plugin: {e.source}]" if e.is_plugin else ""
            print(f"  {e.name}{mark}")
    for message in registry.clashes().values():
        print(f"pml-plugins: warning: {message}", file=sys.stderr)
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from .experiment import config as cfg_mod

    for path in args.configs:
        cfg_mod.load(path, check_data=not args.no_data)
        print(f"{path}: ok")
    return 0


def cmd_aggregate(args: argparse.Namespace) -> int:
    from .experiment import aggregate

    written = aggregate.aggregate(
        args.runs, args.out, paper_numbers=args.paper_numbers, tables=not args.no_tables
    )
    for path in written:
        print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pml-plugins",
        description="Deep-metric-learning plugins for pytorch-metric-learning: run experiments.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log PML's progress messages")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train and evaluate one experiment from a YAML config")
    p.add_argument("config", help="experiment YAML file")
    p.add_argument("--out", help="run folder (default: the config's output, or runs/...)")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set epochs=1 --set model.embedding_size=2",
    )
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="print the metrics of a finished run folder")
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("list", help="list every registered component by kind")
    p.add_argument("--kind", choices=registry.KINDS)
    p.add_argument("--plugins", action="store_true", help="only components from plugins")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("validate", help="validate experiment configs without running them")
    p.add_argument("configs", nargs="+")
    p.add_argument("--no-data", action="store_true", help="skip the data-folder check")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("aggregate", help="collect run folders into tables and plots")
    p.add_argument(
        "runs", nargs="+", help="run folders, or one folder holding run folders (searched)"
    )
    p.add_argument("--out", required=True, help="results folder")
    p.add_argument("--paper-numbers", help="CSV of the papers' numbers to set beside ours")
    p.add_argument("--no-tables", action="store_true", help="only the tidy CSV")
    p.set_defaults(func=cmd_aggregate)

    p = sub.add_parser(
        "search", help="work on a hyperparameter search (an Optuna study) until its budget is met"
    )
    p.add_argument("spec", help="search spec YAML (docs/protocol.md)")
    p.add_argument("--trials", type=int, help="stop after this many trials of this worker")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("search-report", help="best parameters, history and plots of a search")
    p.add_argument("spec")
    p.add_argument("--out", required=True, help="folder for best.json, trials.csv and plots")
    p.set_defaults(func=cmd_search_report)

    p = sub.add_parser("ensemble", help="evaluate the best trial's fold models on the test split")
    p.add_argument("best", help="best.json of search-report")
    p.add_argument("--out", required=True, help="run folder")
    p.set_defaults(func=cmd_ensemble)
    return parser


def cmd_search(args: argparse.Namespace) -> int:
    from .experiment.search import spec, worker

    search = spec.load(args.spec)
    n = worker.work(search, max_trials=args.trials)
    print(f"{search.study}: {n} trials run by this worker; the study is in {search.output}")
    return 0


def cmd_search_report(args: argparse.Namespace) -> int:
    from .experiment.search import report, spec

    best = report.write_report(spec.load(args.spec), args.out)
    print(
        f"{best['study']}: best trial {best['trial']}, mean validation {best['metric']} "
        f"{best['value']:.4f}, parameters {best['params']}"
    )
    return 0


def cmd_ensemble(args: argparse.Namespace) -> int:
    from .experiment import run as run_mod
    from .experiment.search import ensemble

    metrics = ensemble.evaluate(args.best, args.out)
    print(run_mod.format_metrics({"untrained": {}, **metrics}))
    return 0


def _user_error_types() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad input or a run file that cannot be read or written."""
    from .experiment.config import ConfigError
    from .experiment.files import RunFileError

    types: list[type[BaseException]] = [
        ConfigError,
        RunFileError,
        FileNotFoundError,
        registry.UnknownComponentError,
    ]
    search = sys.modules.get(f"{__package__}.experiment.search.spec")
    if search is not None:
        types.append(search.SearchSpecError)
    folds = sys.modules.get(f"{__package__}.experiment.folds")
    if folds is not None:
        types.append(folds.TestSplitAccessError)
    # a RunError can only come from the runner, so it is looked up only once that is loaded
    run_mod = sys.modules.get(f"{__package__}.experiment.run")
    if run_mod is not None:
        types.append(run_mod.RunError)
    return tuple(types)


#: file-system errors on a path the user gave (or a full disk) -> what to do about them
PATH_ERRORS: dict[type[OSError], str] = {
    FileExistsError: "a file is in the way; choose another path or move that file",
    NotADirectoryError: "a file is in the way of a folder; choose another path",
    IsADirectoryError: "a folder is where a file is expected; choose another path",
    PermissionError: "permission denied; choose a path you can read or write",
}


def _os_error_message(exc: BaseException) -> str | None:
    """The one-line message of a full disk or an unusable path, else None (a bug)."""
    if not isinstance(exc, OSError):
        return None
    where = exc.filename or "a file"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return (
            f"{where}: no space left on the device ({exc.strerror}); free some space and "
            f"run the same command again"
        )
    for kind, fix in PATH_ERRORS.items():
        if isinstance(exc, kind):
            return f"{where}: {fix}"
    return None


def _one_line(message: str) -> str:
    """``message`` with its line breaks (and the indentation after them) as single spaces:
    an error is one line on stderr, whatever the exception's text."""
    return " ".join(line.strip() for line in message.splitlines() if line.strip())


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:
        logging.getLogger("PML").setLevel(logging.WARNING)
    try:
        return args.func(args)
    except Exception as exc:
        message = str(exc) if isinstance(exc, _user_error_types()) else _os_error_message(exc)
        if message is None:
            raise
        print(f"pml-plugins: error: {_one_line(message)}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
