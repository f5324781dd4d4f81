"""One short check of the CUDA paths, for the first CUDA machine at hand.

Runs, each as the ``pml-plugins train`` a user runs (one epoch on a slice of the embedded
MNIST subset, so that every check takes seconds):

- one training run per plugin method (GradML, NRA, LoOp, Metrix in its three modes,
  Alternating Projections) on the device, evaluated by the project's ``Calculator``
  (faiss-gpu where faiss has GPUs, else the exact torch search on the device);
- AMP: the default example with ``amp: fp16`` and with ``amp: bf16`` (no NaN: a
  non-finite loss stops a run with an error);
- DDP: the default example under ``torchrun --nproc_per_node=1`` with
  ``distributed: true`` (and ``=2`` where two GPUs are visible);
- the default example, unchanged but for the device, for its full 5 epochs.

Every check's command, exit status, wall time and MAP@R go into ``REPORT`` (markdown),
with the machine's torch, CUDA, GPU and faiss. ``--cpu`` runs the same checks on the CPU
(fp16 AMP needs CUDA and is reported as not applicable, DDP uses gloo): the dry run the
test suite runs, so that the script keeps working where no GPU is lent.

    bash scripts/gpu-check.sh [--cpu] [--out DIR]      (report: DIR/report.md)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
QUICK = ("epochs=1", "dataset.limit_per_class=40", "batch_size=32")

#: (check, example, extra --set values); one per plugin method and Metrix mode
METHODS = (
    ("GradML", "gradml.yaml", ()),
    ("NRA", "nra.yaml", ()),
    ("LoOp", "loop.yaml", ()),
    ("Metrix embed", "metrix_multi_similarity_embed.yaml", ()),
    ("Metrix feature", "metrix_multi_similarity_feature.yaml", ()),
    ("Metrix input", "metrix_multi_similarity_input.yaml", ()),
    ("Alternating Projections", "ap_multi_similarity.yaml", ("batch_size=80",)),  # 5 x 16
)


@dataclass
class Check:
    name: str
    command: list[str]
    status: str = "not run"
    seconds: float = 0.0
    map_at_r: float | None = None
    detail: str = ""


def train_command(example: str, out: Path, sets: tuple[str, ...], launcher=()) -> list[str]:
    """``python [-m LAUNCHER ...] -m pml_plugins.cli train EXAMPLE --out OUT --set ...``."""
    prefix = [sys.executable, "-m", *launcher] if launcher else [sys.executable]
    command = [*prefix, "-m", "pml_plugins.cli", "train", str(EXAMPLES / example)]
    command += ["--out", str(out)]
    for value in sets:
        command += ["--set", value]
    return command


def plan(device: str, out: Path, gpus: int) -> list[Check]:
    on = (f"device={device}",)
    checks = [
        Check(name, train_command(example, out / f"method_{i}", (*on, *QUICK, *extra)))
        for i, (name, example, extra) in enumerate(METHODS)
    ]
    for amp in ("fp16", "bf16"):
        checks.append(
            Check(
                f"AMP {amp}",
                train_command("default.yaml", out / f"amp_{amp}", (*on, *QUICK, f"amp={amp}")),
            )
        )
    for nproc in (1, 2) if gpus >= 2 or device == "cpu" else (1,):
        torchrun = ("torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc))
        sets = (*on, *QUICK, "distributed=true")
        checks.append(
            Check(
                f"DDP torchrun x{nproc}",
                train_command("default.yaml", out / f"ddp_{nproc}", sets, torchrun),
            )
        )
    checks.append(Check("default example", train_command("default.yaml", out / "default", on)))
    return checks


def run_check(check: Check, device: str) -> None:
    if device == "cpu" and check.name == "AMP fp16":
        check.status = "not applicable"
        check.detail = "fp16 autocast needs CUDA (the config refuses it on the CPU)"
        return
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1"}
    start = time.time()
    proc = subprocess.run(check.command, env=env, capture_output=True, text=True, timeout=600)
    check.seconds = time.time() - start
    out = Path(check.command[check.command.index("--out") + 1])
    metrics = out / "metrics.json"
    if proc.returncode == 0 and metrics.is_file():
        check.status = "passed"
        trained = json.loads(metrics.read_text())["trained"]
        check.map_at_r = next(iter(trained.values()))["mean_average_precision_at_r"]
    else:
        check.status = "FAILED"
        check.detail = (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]


def machine(device: str) -> dict[str, str]:
    import torch

    from pml_plugins.experiment.evaluate import faiss_gpus, faiss_module

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch CUDA": str(torch.version.cuda),
        "device": device,
        "GPUs visible": str(torch.cuda.device_count()),
    }
    if torch.cuda.is_available():
        info["GPU"] = torch.cuda.get_device_name(0)
    faiss = faiss_module()
    info["faiss"] = getattr(faiss, "__version__", "not installed") if faiss else "not installed"
    info["faiss GPUs"] = str(faiss_gpus())
    return info


def report(checks: list[Check], info: dict[str, str], path: Path) -> None:
    lines = ["# pml-plugins GPU check", ""]
    lines += [f"- {k}: {v}" for k, v in info.items()]
    lines += ["", "| check | status | seconds | MAP@R | detail |", "|---|---|---:|---:|---|"]
    for c in checks:
        value = f"{c.map_at_r:.4f}" if c.map_at_r is not None else ""
        lines.append(f"| {c.name} | {c.status} | {c.seconds:.1f} | {value} | {c.detail} |")
    lines += ["", "Commands:", ""]
    lines += [f"- {c.name}: `{' '.join(c.command)}`" for c in checks]
    path.write_text("\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="run the checks on the CPU")
    parser.add_argument("--out", type=Path, default=Path("gpu-check"))
    args = parser.parse_args()
    import torch

    device = "cpu" if args.cpu else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("gpu-check: torch sees no CUDA device here; use --cpu for the dry run")
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    checks = plan(device, args.out.resolve(), torch.cuda.device_count())
    for check in checks:
        run_check(check, device)
        print(
            f"{check.status:>14}  {check.name} ({check.seconds:.1f} s) {check.detail}", flush=True
        )
    report(checks, machine(device), args.out / "report.md")
    print(f"report: {args.out / 'report.md'}")
    return 1 if any(c.status == "FAILED" for c in checks) else 0


if __name__ == "__main__":
    sys.exit(main())
