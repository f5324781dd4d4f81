"""The lock-file GPU pool: concurrent jobs get distinct GPUs, a third waits for a free one."""

from __future__ import annotations

import os
import subprocess
import sys

import gpu_pool

REPORT = (
    "import os, sys, time; "
    "print(os.environ['CUDA_VISIBLE_DEVICES'], round(time.time(), 3), flush=True); "
    "time.sleep(float(sys.argv[1])); print(round(time.time(), 3), flush=True)"
)


def launch(tmp_path, devices: str, hold_s: float) -> subprocess.Popen:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": devices, gpu_pool.LOCK_ENV: str(tmp_path)}
    cmd = [sys.executable, gpu_pool.__file__]
    cmd += [sys.executable, "-c", REPORT, str(hold_s)]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_concurrent_jobs_get_distinct_gpus_and_a_third_waits(tmp_path):
    first = [launch(tmp_path, "3,5", 3.0) for _ in range(2)]
    starts = [p.stdout.readline() for p in first]  # both hold a GPU once they have printed
    third = launch(tmp_path, "3,5", 0.0)
    results = []
    for p, start in zip([*first, third], [*starts, ""], strict=True):
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        lines = (start + out).split()
        results.append((lines[0], float(lines[1]), float(lines[-1])))
    devices = {r[0] for r in results[:2]}
    assert devices == {"3", "5"}, results
    assert results[2][0] in {"3", "5"}
    first_end = min(r[2] for r in results[:2])
    assert results[2][1] >= first_end - 0.05, "the third job must wait until a GPU is free"


def test_single_or_no_gpu_runs_the_command_as_is(tmp_path):
    p = launch(tmp_path, "7", 0.0)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    assert out.split()[0] == "7"
    assert not list(tmp_path.iterdir()), "no lock needed for one GPU"


def test_visible_devices_reads_cuda_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0, 2,GPU-abc")
    assert gpu_pool.visible_devices() == ["0", "2", "GPU-abc"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert gpu_pool.visible_devices() == []


def test_the_lock_is_released_when_the_job_dies(tmp_path):
    p = launch(tmp_path, "0,1", 30.0)
    p.stdout.readline()  # it holds a GPU
    p.kill()
    p.communicate(timeout=30)
    # both devices must be free again: two quick jobs get one each without waiting
    a, b = launch(tmp_path, "0,1", 1.0), launch(tmp_path, "0,1", 1.0)
    outs = [x.communicate(timeout=60)[0].split()[0] for x in (a, b)]
    assert sorted(outs) == ["0", "1"]
