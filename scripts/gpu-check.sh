#!/usr/bin/env bash
# The CUDA paths in one short run (every plugin method, faiss-gpu evaluation, AMP fp16 and
# bf16, DDP under torchrun, the default example); writes OUT/report.md. See
# scripts/gpu_check.py. --cpu: the same checks on the CPU (the test suite's dry run).
set -euo pipefail
cd "$(dirname "$0")/.."
exec python scripts/gpu_check.py "$@"
