"""Cost of the image check before training (``pml_plugins.experiment.datasets.verify``).

    python benchmarks/bench_verify.py [--n 120053] [--size 320x240] [--workers 1 2]

Writes ``--n`` JPEGs (default: 120,053, the size of Stanford Online Products) of
``--size`` pixels into a temporary folder, 1,000 per sub-folder, each a smooth random
pattern with mild noise (quality 90, about 18 KB at 320 x 240), then times, for each
``--workers`` count, with an empty cache folder:

- ``fingerprint``: ``stat`` of every file, hashed (done on every run, cached or not);
- ``first check``: ``verify_images`` decoding every image (images/s);
- ``cached check``: the same call again, served from the cache.

The files were just written, so they are read from the page cache: on a cold disk the
first check also waits for the reads. Decoding time grows about linearly with the pixel
count; real photos of other sizes scale accordingly.

Measured once on a 2-core AMD EPYC (shared with other jobs), Python 3.11.7, Pillow 13.0.0:
``python benchmarks/bench_verify.py --n 40000 --workers 1 2`` (320 x 240 JPEGs, 18.9 KB
each; writing them took 32 s)::

    | workers | fingerprint s | first check s | images/s | cached check s | SOP first check s (extrapolated) |
    |---:|---:|---:|---:|---:|---:|
    | 1 | 0.11 | 17.5 | 2291 | 0.12 | 52 (extrapolated) |
    | 2 | 0.11 | 8.6 | 4678 | 0.12 | 26 (extrapolated) |

Extrapolated linearly to SOP's 120,053 images of this size (not measured at that size):
about 26 s for the first check with 2 threads (52 s with 1), and about 0.4 s for each
later, cached check (the fingerprint's ``stat`` of every file).
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import PIL
from PIL import Image

from pml_plugins.experiment.datasets import verify

SOP_IMAGES = 120_053
PER_FOLDER = 1000
#: distinct base patterns (each image is one of them with its own noise)
PATTERNS = 16


def _patterns(width: int, height: int, seed: int = 0) -> list[np.ndarray]:
    """Smooth random colour fields (8 x 6 random colours, bicubic upsampling)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(PATTERNS):
        small = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
        out.append(np.asarray(small.resize((width, height), Image.BICUBIC), dtype=np.int16))
    return out


def write_images(folder: Path, n: int, width: int, height: int) -> list[str]:
    """``n`` JPEGs under ``folder``; their paths."""
    rng = np.random.default_rng(1)
    patterns = _patterns(width, height)
    paths = []
    for i in range(n):
        sub = folder / f"{i // PER_FOLDER:04d}"
        if i % PER_FOLDER == 0:
            sub.mkdir(parents=True, exist_ok=True)
        noise = rng.integers(-6, 7, (height, width, 1), dtype=np.int16)
        pixels = np.clip(patterns[i % PATTERNS] + noise, 0, 255).astype(np.uint8)
        path = sub / f"{i:06d}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        paths.append(str(path))
    return paths


def _timed(fn):
    t0 = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - t0


def measure(paths: list[str], workers: int, cache: Path) -> dict[str, float]:
    """Seconds for the fingerprint, the first check and the cached check."""
    _, t_fp = _timed(lambda: verify.fingerprint(paths))
    first, t_first = _timed(
        lambda: verify.verify_images(paths, "bench", workers=workers, cache=cache)
    )
    second, t_second = _timed(
        lambda: verify.verify_images(paths, "bench", workers=workers, cache=cache)
    )
    assert first.decoded == len(paths) and second.decoded == 0
    return {"fingerprint": t_fp, "first": t_first, "cached": t_second}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=SOP_IMAGES, help="number of images")
    parser.add_argument("--size", default="320x240", help="image size WxH")
    parser.add_argument(
        "--workers", type=int, nargs="+", default=[os.cpu_count() or 1], help="thread counts"
    )
    args = parser.parse_args()
    width, height = (int(x) for x in args.size.lower().split("x"))

    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; Python "
        f"{platform.python_version()}, Pillow {PIL.__version__}"
    )
    with tempfile.TemporaryDirectory(prefix="bench_verify_") as tmp:
        tmp = Path(tmp)
        paths, t_write = _timed(lambda: write_images(tmp / "images", args.n, width, height))
        mb = sum(os.path.getsize(p) for p in paths) / 2**20
        print(
            f"wrote {args.n} JPEGs of {width}x{height} ({mb / args.n * 1024:.1f} KB each) "
            f"in {t_write:.1f} s"
        )
        scale = SOP_IMAGES / args.n
        print("| workers | fingerprint s | first check s | images/s | cached check s |", end="")
        print(" SOP first check s (extrapolated) |")
        print("|---:|---:|---:|---:|---:|---:|")
        for i, workers in enumerate(args.workers):
            t = measure(paths, workers, tmp / f"cache{i}")
            print(
                f"| {workers} | {t['fingerprint']:.2f} | {t['first']:.1f} | "
                f"{args.n / t['first']:.0f} | {t['cached']:.2f} | "
                f"{t['first'] * scale:.0f}{'' if scale == 1 else ' (extrapolated)'} |"
            )


if __name__ == "__main__":
    main()
