"""Fixtures shared by the experiment tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from pml_plugins.experiment.datasets import verify


@pytest.fixture(autouse=True)
def image_check_cache(tmp_path_factory, monkeypatch) -> Path:
    """``load_splits`` remembers verified image lists in the package's cache folder: one
    of each test's own, so that no test reads or writes the user's cache."""
    folder = tmp_path_factory.mktemp("pml-plugins-cache")
    monkeypatch.setenv(verify.CACHE_ENV, str(folder))
    return folder
