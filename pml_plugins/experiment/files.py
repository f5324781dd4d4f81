"""Atomic writes and careful reads of the files in a run folder.

Every file a run writes goes through :func:`atomic_write`: the content goes to a temporary
file in the same folder, is flushed and ``fsync``-ed, and is renamed over the target, so a
reader sees either the old file or the whole new one, never a part. A kill or a full disk
during the write leaves the target as it was.

:func:`read_json` tells a missing file from a damaged one, and says what to do about each.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any


class RunFileError(RuntimeError):
    """A run-folder file that is missing, damaged or cannot be written; the message says
    which file and what to do."""


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w", **kwargs: Any) -> Iterator[IO]:
    """Open a temporary sibling of ``path`` for writing; on success it replaces ``path``.

    On any error the temporary file is removed and ``path`` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise RunFileError(
                f"{path}: no space left on the device while writing it; free some space "
                f"and run the same command again (the previous {path.name}, if any, is intact)"
            ) from None
        raise


def atomic_write(path: str | Path, data: str | bytes) -> Path:
    """Write ``data`` (text or bytes) to ``path`` atomically."""
    mode = "wb" if isinstance(data, bytes) else "w"
    kwargs = {} if isinstance(data, bytes) else {"encoding": "utf-8"}
    with atomic_open(path, mode, **kwargs) as f:
        f.write(data)
    return Path(path)


def atomic_save(path: str | Path, save: Callable[[IO], None]) -> Path:
    """Call ``save(file)`` on a binary temporary file that then replaces ``path``
    (e.g. ``atomic_save(p, lambda f: torch.save(obj, f))``)."""
    with atomic_open(path, "wb") as f:
        save(f)
    return Path(path)


def write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write(path, json.dumps(obj, indent=2) + "\n")


def read_json(path: str | Path, fix: str) -> Any:
    """Read a JSON file written by :func:`write_json`.

    A missing file raises ``FileNotFoundError``; an unreadable or damaged one a
    :class:`RunFileError` that names the file and ends with ``fix`` (what to do).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError) as exc:
        raise RunFileError(f"{path} cannot be read ({exc}); {fix}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        what = "is empty" if not text.strip() else f"is damaged ({exc.msg} at line {exc.lineno})"
        raise RunFileError(f"{path} {what}; {fix}") from None
