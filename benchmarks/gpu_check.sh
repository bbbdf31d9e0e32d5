#!/usr/bin/env bash
# The GPU check of a session that is lent a GPU: CUDA tests, then the GPU benchmarks in order of
# value, each under its own time limit inside one budget (default 480 s), every result written to
# $OUT as its stage ends. No install step: the package is imported from src/ (PYTHONPATH).
#
#   bash benchmarks/gpu_check.sh                                # on the GPU machine
#   bash benchmarks/gpu_check.sh --stages index --budget 200    # rerun one stage
#   bash benchmarks/gpu_check.sh --dry-run --out runs/gpu_check # the same stages on the CPU, tiny sizes
#
# See benchmarks/gpu_check.py (--help) for the stages and the files written.
set -eu
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" -u benchmarks/gpu_check.py "$@"
