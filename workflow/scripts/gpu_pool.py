"""One GPU per job on a multi-GPU machine: ``python workflow/scripts/gpu_pool.py CMD...``.

Snakemake's ``resources: gpu=1`` with ``--resources gpu=N`` only limits how many GPU jobs
run at once; it does not say which GPU a job gets (it does not set
``CUDA_VISIBLE_DEVICES``). This launcher takes the first free GPU from a pool of lock
files, one per visible GPU, sets ``CUDA_VISIBLE_DEVICES`` to it and replaces itself with
the command, which keeps the lock open: the lock is released when the command ends,
however it ends (exit, crash, kill), since the kernel drops ``flock`` locks of a dead
process. A job waits while every GPU is taken.

The pool is the GPUs in ``CUDA_VISIBLE_DEVICES`` if set (so under SLURM, which sets it,
a job keeps its allocation), else ``0..n-1`` for the ``n`` GPUs that ``nvidia-smi -L``
lists. With one GPU or none, the command runs as is. The lock files live in
``$PML_PLUGINS_GPU_LOCKS`` (default: ``<tmp>/pml-plugins-gpu-locks-<uid>``), shared by
every workflow of the user on the machine (apptainer binds ``/tmp`` by default).
Linux/macOS only (``fcntl``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LOCK_ENV = "PML_PLUGINS_GPU_LOCKS"


def visible_devices() -> list[str]:
    """The GPUs this process may use, as ``CUDA_VISIBLE_DEVICES`` entries."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [d.strip() for d in env.split(",") if d.strip() and d.strip() != "-1"]
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return []
    n = sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))
    return [str(i) for i in range(n)]


def lock_dir() -> Path:
    default = Path(tempfile.gettempdir()) / f"pml-plugins-gpu-locks-{os.getuid()}"
    return Path(os.environ.get(LOCK_ENV) or default)


def acquire(devices: list[str], folder: Path, poll_s: float = 2.0) -> tuple[str, int]:
    """Block until one device's lock is free; return the device and the open lock fd."""
    import fcntl

    folder.mkdir(parents=True, exist_ok=True)
    while True:
        for device in devices:
            name = "gpu-" + "".join(c if c.isalnum() else "_" for c in device) + ".lock"
            fd = os.open(folder / name, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            return device, fd
        time.sleep(poll_s)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--"]:
        args = args[1:]
    if not args:
        print("usage: python workflow/scripts/gpu_pool.py COMMAND [ARGS...]", file=sys.stderr)
        return 2
    devices = visible_devices()
    if len(devices) > 1:
        device, fd = acquire(devices, lock_dir())
        os.set_inheritable(fd, True)
        os.environ["CUDA_VISIBLE_DEVICES"] = device
        print(f"gpu_pool: {args[0]} runs on GPU {device}", file=sys.stderr, flush=True)
    os.execvp(args[0], args)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
