"""The papers' own numbers (a CSV typed in from the papers), shown beside ours."""

from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import Any

PAPER_COLUMNS = ("method", "dataset", "embedding_size", "metric", "value", "source")
#: names the papers' CSV may use for our metrics (lower case, without spaces)
METRIC_ALIASES = {
    "map@r": "mean_average_precision_at_r",
    "map_at_r": "mean_average_precision_at_r",
    "mapr": "mean_average_precision_at_r",
    "r-precision": "r_precision",
    "r-prec": "r_precision",
    "rp": "r_precision",
    "p@1": "precision_at_1",
    "nmi": "NMI",
    "ami": "AMI",
    "f1": "F1",
}


def canonical_metric(name: str) -> str:
    """Our metric name for a paper's (``R@4`` -> ``recall_at_4``, ``MAP@R`` -> ...)."""
    key = name.strip().lower().replace(" ", "")
    match = re.fullmatch(r"(?:r|recall)(?:@|_at_)(\d+)", key)
    if match:
        return f"recall_at_{match.group(1)}"
    return METRIC_ALIASES.get(key, name.strip())


def read_paper_numbers(path: str | Path) -> list[dict[str, Any]]:
    """Rows of the papers' CSV, metric names mapped to ours, values in % (a file whose
    values are all <= 1 holds fractions)."""
    from ..config import ConfigError

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"paper numbers {str(path)!r} do not exist")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in PAPER_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ConfigError(
                f"paper numbers {str(path)!r}: missing column(s) {', '.join(missing)}; "
                f"expected {','.join(PAPER_COLUMNS)}"
            )
        rows = []
        for i, row in enumerate(reader, start=2):
            try:
                value = float(row["value"])
                dim = int(row["embedding_size"])
            except (TypeError, ValueError):
                raise ConfigError(
                    f"paper numbers {str(path)!r}, line {i}: value and embedding_size must be "
                    f"numbers, got {row['value']!r}, {row['embedding_size']!r}"
                ) from None
            rows.append(
                {
                    "method": row["method"].strip(),
                    "dataset": row["dataset"].strip().lower(),
                    "embedding_size": dim,
                    "metric": canonical_metric(row["metric"]),
                    "value": value,
                    "source": row["source"].strip(),
                }
            )
    # one unit per file: fractions (every value <= 1) or percentages
    if rows and max(abs(r["value"]) for r in rows) <= 1:
        for r in rows:
            r["value"] *= 100
    return rows
