#!/usr/bin/env bash
# Every experiment at one scale, then the result tables (experiments/run_all.py):
#   bash experiments/run_all.sh SCALE DATA OUT [python -m experiments.run_all options]
#   bash experiments/run_all.sh gpu build/experiments_data runs/experiments --archive runs/experiments.tar.gz
# SCALE: smoke (CI), cpu (a 2-core machine, lanes one after the other), gpu (one GPU, lanes at once).
# DATA: a folder written by `python -m experiments.data --scale SCALE --out DATA` (prepare it where the
# text is; the GPU machine has none). The interpreter: $PYTHON, else .venv's when there is one, else python3.
set -euo pipefail
if [ $# -lt 3 ]; then
    sed -n '2,7p' "$0" >&2
    exit 2
fi
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
command -v "$PY" > /dev/null || PY=python3
export PYTHONPATH="$PWD:$PWD/kernels${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" -m experiments.run_all --scale "$1" --data "$2" --out "$3" "${@:4}"
