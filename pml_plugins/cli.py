"""``pml-plugins``: train | evaluate | list | validate | aggregate.

pml-plugins train CONFIG [--out DIR] [--resume] [--set key=value ...]
pml-plugins evaluate RUN_DIR
pml-plugins list [--kind KIND] [--plugins]
pml-plugins validate CONFIG [...]
pml-plugins aggregate RUNS_DIR --out RESULTS_DIR
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import yaml

from . import registry

EXIT_BAD_INPUT = 2


def _parse_set(items: list[str]) -> dict[str, Any]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set {item!r}: write key.path=value (e.g. epochs=3)")
        out[key] = yaml.safe_load(value)
    return out


def cmd_train(args: argparse.Namespace) -> int:
    from .experiment import run as run_mod

    out, metrics = run_mod.run(
        args.config, out=args.out, resume=args.resume, overrides=_parse_set(args.set)
    )
    if metrics:  # empty on the non-main ranks of a distributed run
        print(run_mod.format_metrics(metrics))
        print(f"run folder: {out}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .experiment import run as run_mod

    path = Path(args.run_dir) / "metrics.json"
    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist: {args.run_dir} is not a finished run folder "
            f"(run `pml-plugins train CONFIG --out {args.run_dir}` first)"
        )
    metrics = json.loads(path.read_text())
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
    p.add_argument("runs", help="folder holding run folders (searched recursively)")
    p.add_argument("--out", required=True, help="results folder")
    p.add_argument("--paper-numbers", help="CSV of the papers' numbers to set beside ours")
    p.add_argument("--no-tables", action="store_true", help="only the tidy CSV")
    p.set_defaults(func=cmd_aggregate)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:
        logging.getLogger("PML").setLevel(logging.WARNING)
    from .experiment.config import ConfigError
    from .experiment.run import RunError

    try:
        return args.func(args)
    except (ConfigError, RunError, FileNotFoundError, registry.UnknownComponentError) as exc:
        print(f"pml-plugins: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
