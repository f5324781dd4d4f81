"""Every image of a run decoded once before training, and the result remembered.

A damaged file (random or zero bytes, a truncated JPEG) would otherwise stop a run with
``PIL.UnidentifiedImageError`` hours in, after the run folder exists. :func:`verify_images`
opens and fully decodes each image, as training does, in a thread pool (Pillow's
decoders release the GIL), and raises :class:`CorruptImagesError` naming the first bad
file, the reason, and how many of the images are bad.

A successful check is remembered in a small file under the user's cache folder
(``$XDG_CACHE_HOME/pml-plugins/verified-images/``, else ``~/.cache/pml-plugins/...``),
never in the data folder (which may be read-only). Its name is a fingerprint of the image
list: every path with its size and modification time, and the Pillow version. The same
images unchanged are not decoded again; a replaced, re-extracted or touched file changes
the fingerprint, and the list is decoded again. Failures are not remembered.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import PIL
from PIL import Image

from .common import LOG, DatasetFormatError

#: bumped when what counts as a verified image changes (so old cache entries are ignored)
CHECK_VERSION = 1
#: images per task handed to a worker thread
CHUNK = 256
#: bad files named in the error message besides the first
SHOWN = 5
#: what a decoder raises on a damaged file (UnidentifiedImageError is an OSError)
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


class CorruptImagesError(DatasetFormatError):
    """Images that exist but cannot be decoded; the message names them."""


@dataclass(frozen=True)
class Verification:
    """The outcome of a successful :func:`verify_images`."""

    images: int
    #: images decoded by this call (0 where the cache said the list was verified)
    decoded: int
    cache_file: Path | None


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/pml-plugins`` (default ``~/.cache/pml-plugins``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "pml-plugins"


def fingerprint(paths: Iterable[str]) -> str:
    """A hash of each path with its size and modification time, in order.

    A file that cannot be ``stat``-ed enters as such (the decode then reports it).
    """
    h = hashlib.sha256(f"v{CHECK_VERSION} pillow {PIL.__version__}\n".encode())
    for path in paths:
        try:
            st = os.stat(path)
            h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{path}\0unreadable\n".encode())
    return h.hexdigest()


def decode_error(path: str) -> str | None:
    """Why ``path`` cannot be decoded as an image, or None if it can."""
    try:
        with Image.open(path) as img:
            img.load()
    except DECODE_ERRORS as exc:
        # Pillow's "cannot identify image file '<path>'": the path is named already
        return str(exc).replace(f" {path!r}", "") or type(exc).__name__
    return None


def _decode_chunk(paths: Sequence[str]) -> list[tuple[str, str]]:
    """``(path, reason)`` for each bad image of ``paths``."""
    return [(path, reason) for path in paths if (reason := decode_error(path)) is not None]


def find_bad_images(paths: Sequence[str], workers: int | None = None) -> list[tuple[str, str]]:
    """Decode every image of ``paths`` in ``workers`` threads (default: one per CPU);
    ``(path, reason)`` of each one that fails, in the order of ``paths``."""
    workers = workers or os.cpu_count() or 1
    chunks = [paths[i : i + CHUNK] for i in range(0, len(paths), CHUNK)]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return [bad for result in pool.map(_decode_chunk, chunks) for bad in result]


def error_message(name: str, bad: Sequence[tuple[str, str]], total: int) -> str:
    """One line: the first bad file and its reason, what to do, and how many are bad."""
    path, reason = bad[0]
    message = f"{path}: cannot decode image ({reason}); replace the file or re-extract the archive"
    if len(bad) > 1:
        others = [p for p, _ in bad[1 : 1 + SHOWN]]
        more = f" and {len(bad) - 1 - SHOWN} more" if len(bad) > 1 + SHOWN else ""
        message += (
            f" ({len(bad)} of the {total} {name} images cannot be decoded; the others: "
            f"{', '.join(others)}{more})"
        )
    return message


def _is_cached(path: Path, n_images: int) -> bool:
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("images") == n_images
    except (OSError, ValueError, AttributeError):
        return False


def _remember(path: Path, name: str, n_images: int) -> Path | None:
    """Write the cache entry; a cache that cannot be written only costs a later re-check."""
    from ..files import RunFileError, write_json

    record = {"dataset": name, "images": n_images, "verified": time.strftime("%Y-%m-%d %H:%M")}
    try:
        return write_json(path, record)
    except (OSError, RunFileError) as exc:
        LOG.info("could not remember the image check in %s: %s", path, exc)
        return None


def verify_images(
    paths: Sequence[str],
    name: str = "dataset",
    *,
    workers: int | None = None,
    cache: Path | None = None,
) -> Verification:
    """Decode every image in ``paths`` unless this exact list was verified before.

    Raises :class:`CorruptImagesError` (a ``FileNotFoundError``, like a missing data
    folder) naming the first bad file and counting all of them. ``cache`` is the cache
    folder (default :func:`cache_dir`).
    """
    paths = list(dict.fromkeys(str(p) for p in paths))
    entry = (cache or cache_dir()) / "verified-images" / f"{fingerprint(paths)}.json"
    if _is_cached(entry, len(paths)):
        LOG.debug("%s: %d images verified before (%s)", name, len(paths), entry)
        return Verification(len(paths), 0, entry)
    LOG.info("%s: decoding %d images once to check them", name, len(paths))
    bad = find_bad_images(paths, workers)
    if bad:
        raise CorruptImagesError(error_message(name, bad, len(paths)))
    return Verification(len(paths), len(paths), _remember(entry, name, len(paths)))
