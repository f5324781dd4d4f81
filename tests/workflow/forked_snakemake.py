"""Snakemake command lines run by forks of one process that has imported everything once.

Every ``snakemake`` call of the workflow spends about five seconds of CPU importing torch,
torchvision and PML (the grid is validated through the plugin registry at load time),
and only a fraction of a second on the workflow. :class:`ForkedSnakemake` starts this
file once as a server: it imports snakemake's command line and builds the registry, then
runs each requested command line in a fresh ``fork`` of itself, that is
``snakemake.cli.main(args)``, which ``python -m snakemake args`` calls, in the requested
working folder, with its output in a file. Independent calls run side by side.

The server computes nothing with torch before it forks (a fork after OpenMP has started
its threads may hang), and each command runs in its own child process, so no state of
one call reaches the next.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Call:
    """One ``snakemake`` command line, run in ``cwd``, its output written to ``log``."""

    args: Sequence[str]
    cwd: Path
    log: Path


class ForkedSnakemake:
    """Client of the server below; :meth:`run` and :meth:`run_many` return
    ``subprocess.CompletedProcess`` with stdout and stderr together in ``stdout``."""

    def __init__(self, env: Mapping[str, str], cwd: Path, timeout: float = 600):
        self.timeout = timeout
        self.proc = subprocess.Popen(
            [sys.executable, __file__],
            cwd=cwd,
            env=dict(env),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        ready = self.proc.stdout.readline()
        if ready.strip() != "ready":
            self.close()
            raise RuntimeError(f"the snakemake fork server did not start: {ready!r}")

    def run_many(
        self, calls: Sequence[Call], parallel: int = 2
    ) -> list[subprocess.CompletedProcess]:
        request = {
            "parallel": parallel,
            "calls": [
                {"args": list(map(str, c.args)), "cwd": str(c.cwd), "log": str(c.log)}
                for c in calls
            ],
        }
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the snakemake fork server exited ({self.proc.wait()})")
        codes = json.loads(line)["codes"]
        return [
            subprocess.CompletedProcess(
                ["snakemake", *map(str, c.args)],
                code,
                stdout=Path(c.log).read_text(errors="replace"),
                stderr="",
            )
            for c, code in zip(calls, codes, strict=True)
        ]

    def run(self, *args: str | Path, cwd: Path, log: Path) -> subprocess.CompletedProcess:
        return self.run_many([Call(args, cwd, log)])[0]

    def close(self) -> None:
        """Stop the server (it holds no state worth a clean exit; its children are reaped)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdin.close()
        self.proc.stdout.close()


# ------------------------------------------------------------------------ server


def _child(call: Mapping[str, str]) -> None:
    """In the fork: ``snakemake.cli.main(args)`` in ``cwd`` with output to ``log``; never
    returns."""
    code = 1
    try:
        os.chdir(call["cwd"])
        fd = os.open(call["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        from snakemake.cli import main

        try:
            main(call["args"])
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: BLE001 - reported in the log, the exit code says it failed
        import traceback

        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _run_calls(calls: Sequence[Mapping[str, str]], parallel: int) -> list[int]:
    codes: list[int | None] = [None] * len(calls)
    running: dict[int, int] = {}  # pid -> index
    pending = list(range(len(calls)))
    while pending or running:
        while pending and len(running) < max(1, parallel):
            i = pending.pop(0)
            sys.stdout.flush()
            pid = os.fork()
            if pid == 0:
                _child(calls[i])
            running[pid] = i
        pid, status = os.wait()
        if pid in running:
            codes[running.pop(pid)] = os.waitstatus_to_exitcode(status)
    return [int(c) for c in codes]


def serve() -> None:
    import snakemake.cli  # noqa: F401 - imported once, before the forks

    from pml_plugins import registry

    registry.get("MultiSimilarityLoss")  # builds the table: PML, our plugins, entry points
    out = sys.stdout
    print("ready", file=out, flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        codes = _run_calls(request["calls"], int(request.get("parallel", 2)))
        print(json.dumps({"codes": codes}), file=out, flush=True)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    serve()
