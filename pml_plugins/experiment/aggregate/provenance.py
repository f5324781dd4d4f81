"""Files that let a reader trace every number: the CSVs and each run's config and manifest."""

from __future__ import annotations

import csv
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .discovery import Run


def write_csv(path: Path, columns: Sequence[str], rows: Iterable[Mapping[str, Any]]) -> Path:
    """``rows`` (their ``columns``) as CSV at ``path``, written whole or not at all."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)
    return path


def copy_provenance(runs: Sequence[Run], folder: Path) -> list[Path]:
    """Each run's merged config and manifest, under ``folder/runs/<loss>/<dim>/seed<k>/``,
    so that every number in the tables can be traced to the config and versions that made it."""
    written = []
    for run in runs:
        target = folder / "runs" / run.loss / str(run.embedding_size) / f"seed{run.seed}"
        target.mkdir(parents=True, exist_ok=True)
        for name in ("config.yaml", "manifest.json"):
            source = run.path / name
            if source.is_file():
                (target / name).write_bytes(source.read_bytes())
                written.append(target / name)
    return written
