"""The run folder's file helpers: a write is all or nothing, even when the process is
killed during it; a reader tells a missing file from a damaged one."""

from __future__ import annotations

import errno
import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pml_plugins.experiment import files

#: replaces ``argv[1]`` atomically, but is killed by SIGKILL half-way through the content
KILLED_MID_WRITE = textwrap.dedent(
    """
    import os, signal, sys
    from pml_plugins.experiment import files

    with files.atomic_open(sys.argv[1], "w") as f:
        f.write('{"half": ')
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    """
)


def test_a_kill_during_a_write_leaves_the_old_file(tmp_path):
    path = tmp_path / "untrained_metrics.json"
    files.write_json(path, {"test": {"recall_at_1": 0.5}})
    proc = subprocess.run([sys.executable, "-c", KILLED_MID_WRITE, str(path)], timeout=120)
    assert proc.returncode == -signal.SIGKILL
    assert files.read_json(path, "unused") == {"test": {"recall_at_1": 0.5}}


def test_an_error_during_a_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = files.atomic_write(tmp_path / "config.yaml", "seed: 0\n")
    with pytest.raises(ZeroDivisionError), files.atomic_open(path) as f:
        f.write("seed: ")
        1 / 0  # noqa: B018
    assert path.read_text() == "seed: 0\n"
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]


def test_a_full_disk_is_a_run_file_error_naming_the_file(tmp_path):
    path = files.atomic_write(tmp_path / "metrics.json", b"{}")

    def no_space(f) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(files.RunFileError, match="metrics.json: no space left") as err:
        files.atomic_save(path, no_space)
    assert "is intact" in str(err.value)
    assert path.read_bytes() == b"{}"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


@pytest.mark.parametrize(
    ("content", "what"),
    [(b"", "is empty"), (b"  \n", "is empty"), (b'{"a": ', "is damaged"), (b"\xff", "cannot")],
    ids=["empty", "blank", "truncated", "not-utf8"],
)
def test_read_json_names_a_damaged_file_and_what_to_do(tmp_path, content, what):
    path = tmp_path / "metrics.json"
    path.write_bytes(content)
    with pytest.raises(files.RunFileError) as err:
        files.read_json(path, "train it again")
    message = str(err.value)
    assert message.startswith(str(path)) and what in message
    assert message.endswith("train it again")


def test_read_json_of_a_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        files.read_json(tmp_path / "metrics.json", "unused")
    files.write_json(tmp_path / "metrics.json", [1])
    assert json.loads((tmp_path / "metrics.json").read_text()) == [1]
    assert files.read_json(Path(tmp_path / "metrics.json"), "unused") == [1]
