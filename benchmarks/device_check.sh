#!/usr/bin/env bash
# Device check (at most 10 minutes on one CUDA GPU): per-layer time of the zoo models measured
# against the h100 and h200 cost models, and one-stage programs' step time and peak memory against
# their plans; writes benchmarks/results/<today>-device-check-cuda.{md,json}.
#   benchmarks/device_check.sh            # on a machine with one CUDA GPU
#   benchmarks/device_check.sh --device cpu --models mlp   # dry mode, runs anywhere
set -euo pipefail
cd "$(dirname "$0")"
PY="${PYTHON:-../.venv/bin/python}"
exec timeout 600 "$PY" device_check.py "$@"
