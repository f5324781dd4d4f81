"""A run folder is one run: locked while a process writes it, fingerprinted by its config.

Lock
    ``.lock`` (``filelock``, held for the whole run by the process that writes the folder)
    and ``.lock.json`` beside it: the holder's pid, host, start time and command. A second
    writer gets a :class:`FolderLockedError` naming the folder and the holder. The
    operating system releases the lock of a process that died; the info file it left names
    a pid that no longer runs, which is logged as a stale lock, and the run proceeds.

Record
    ``run.json``: the config's fingerprint (SHA-256 of the config without the keys below),
    that config, and the status ``running``, ``failed`` (with the reason) or ``finished``.

``--resume`` continues only the same experiment. These keys may differ from the run's
config, as they do not change the result on the same device: :data:`ALLOWED_TO_DIFFER`
(``output``: where the folder is; ``device``: which device trains it (a run moved to
another kind of device continues, with that device's rounding); ``num_workers``: how many
processes load the same batches; random augmentations drawn in worker processes are not
restored by a resume anyway, see :mod:`.checkpoint`). Any other difference (loss, miner,
learning rate, seed, embedding size, epochs, data, ...) is refused before anything is
written, with the differing keys old -> new; train such a config into another ``--out``.
Extending the epochs of a finished run is refused the same way: start a new run folder.
The workflow's first step (``write_cell`` in workflow/scripts/grid.py) uses the same rule
to decide whether a run folder holds another experiment.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import logging
import os
import socket
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import filelock
import yaml

from . import files

LOG = logging.getLogger("pml_plugins")
LOCK_NAME = ".lock"
LOCK_INFO_NAME = ".lock.json"
RECORD_NAME = "run.json"
ALLOWED_TO_DIFFER = ("output", "device", "num_workers")
RUNNING, FAILED, FINISHED = "running", "failed", "finished"


class FolderLockedError(files.RunFileError):
    """Another process holds the run folder's lock."""


# ---------------------------------------------------------------- lock


def _pid_runs(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _holder_text(info: Mapping[str, Any] | None) -> str:
    if not info:
        return "another process (it left no information)"
    return (
        f"pid {info.get('pid')} on {info.get('host')}, started {info.get('started')}, "
        f"command: {info.get('command')}"
    )


def _read_info(folder: Path) -> dict[str, Any] | None:
    try:
        info = json.loads((folder / LOCK_INFO_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def _report_stale(folder: Path, info: Mapping[str, Any] | None) -> None:
    if info is None:
        return
    same_host = info.get("host") == socket.gethostname()
    pid = info.get("pid")
    if same_host and isinstance(pid, int) and not _pid_runs(pid):
        LOG.warning(
            "%s: stale lock of a process that no longer runs (%s); taking it over",
            folder,
            _holder_text(info),
        )
    else:
        LOG.warning("%s: the previous writer left its lock info (%s)", folder, _holder_text(info))


@contextlib.contextmanager
def locked(folder: Path) -> Iterator[None]:
    """Hold ``folder``'s exclusive lock (``folder`` must exist); refuse at once if held."""
    lock = filelock.FileLock(str(folder / LOCK_NAME), timeout=0)
    try:
        lock.acquire()
    except filelock.Timeout:
        raise FolderLockedError(
            f"{folder} is being written by another run ({_holder_text(_read_info(folder))}); "
            f"wait for it to end, or train into another --out"
        ) from None
    try:
        _report_stale(folder, _read_info(folder))
        files.write_json(
            folder / LOCK_INFO_NAME,
            {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                "command": " ".join(sys.argv),
            },
        )
        yield
    finally:
        with contextlib.suppress(OSError):
            (folder / LOCK_INFO_NAME).unlink()
        lock.release()


# ---------------------------------------------------------------- fingerprint


def comparable(config: Mapping[str, Any]) -> dict[str, Any]:
    """The config without :data:`ALLOWED_TO_DIFFER`, as plain JSON data."""
    out = {k: v for k, v in config.items() if k not in ALLOWED_TO_DIFFER}
    return json.loads(json.dumps(out, sort_keys=True, default=str))


def fingerprint(config: Mapping[str, Any]) -> str:
    text = json.dumps(comparable(config), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, Mapping) and data:
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): data}


def differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """``["key.path: old -> new", ...]`` over the keys not allowed to differ."""
    a, b = _flatten(comparable(old)), _flatten(comparable(new))
    unset = "(unset)"
    return [
        f"{key}: {json.dumps(a.get(key, unset))} -> {json.dumps(b.get(key, unset))}"
        for key in sorted(set(a) | set(b))
        if a.get(key, unset) != b.get(key, unset)
    ]


# ---------------------------------------------------------------- run.json


def read_record(folder: Path) -> dict[str, Any] | None:
    """``run.json``, or a record made from a ``config.yaml`` of a folder written before
    ``run.json`` existed; None where the folder has neither."""
    fix = f"remove {folder / RECORD_NAME} if the folder's config.yaml is the run's config"
    try:
        record = files.read_json(folder / RECORD_NAME, fix)
    except FileNotFoundError:
        record = None
    if isinstance(record, dict) and isinstance(record.get("config"), dict):
        return record
    if record is not None:
        raise files.RunFileError(f"{folder / RECORD_NAME} is not a run record; {fix}")
    try:
        with open(folder / "config.yaml", encoding="utf-8") as f:
            config = yaml.safe_load(f)
    except (OSError, yaml.YAMLError):
        return None
    if not isinstance(config, dict):
        return None
    return {"fingerprint": fingerprint(config), "config": comparable(config), "status": None}


def write_record(
    folder: Path, config: Mapping[str, Any], status: str, reason: str | None = None
) -> None:
    record = {
        "fingerprint": fingerprint(config),
        "status": status,
        "reason": reason,
        "config": comparable(config),
    }
    files.write_json(folder / RECORD_NAME, record)
