"""Shared fixtures; the workflow's scripts (workflow/scripts) are importable."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "workflow" / "scripts"))


@pytest.fixture(scope="module")
def one_thread():
    """Small tensors: one intra-op thread avoids oversubscribing a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True, scope="session")
def private_cache_home(tmp_path_factory):
    """The image check remembers verified image lists under $XDG_CACHE_HOME: during the
    tests (and in their subprocesses) that is a folder of the test session's own, never
    the user's cache."""
    import os

    old = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("cache-home"))
    yield
    if old is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = old
