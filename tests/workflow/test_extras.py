"""Each extra brings what the README's commands for it need: the dependency closure of
``pml-plugins[workflow]``, read from the installed metadata, holds the packages that
``snakemake --report`` imports, which snakemake itself does not require."""

from __future__ import annotations

import re
from importlib import metadata

from packaging.requirements import Requirement


def _name(requirement: str) -> str:
    return re.sub(r"[-_.]+", "-", Requirement(requirement).name).lower()


def closure(dist: str, extras: set[str]) -> set[str]:
    """Distribution names needed by ``dist[extras]``, following installed metadata."""
    seen: set[str] = set()
    todo = [(dist, extras)]
    while todo:
        name, wanted = todo.pop()
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in seen and not wanted:
            continue
        seen.add(key)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        for text in requires:
            req = Requirement(text)
            marker = req.marker
            if marker is not None:
                if "extra" in str(marker):
                    if not any(marker.evaluate({"extra": e}) for e in wanted):
                        continue
                elif not marker.evaluate():
                    continue
            if _name(text) not in seen:
                todo.append((req.name, set(req.extras)))
    return seen


def test_workflow_extra_brings_what_snakemake_report_needs():
    needed = closure("pml-plugins", {"workflow"})
    assert "snakemake" in needed
    # snakemake/report raises "Python package pygments must be installed" without them
    assert {"pygments", "jinja2"} <= needed, sorted(needed)


def test_base_install_does_not_pull_the_workflow_tools():
    assert "snakemake" not in closure("pml-plugins", set())
