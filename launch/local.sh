#!/usr/bin/env bash
# Train on this machine with N processes (GPUs, or CPU processes over gloo).
#
# Usage: bash launch/local.sh [-n NPROC] [-l torchrun|deepspeed] [SCRIPT.py] [script arguments ...]
#   -n NPROC     processes [GPUs on this machine, else 1]
#   -l LAUNCHER  torchrun (default) or deepspeed
#   SCRIPT.py    entry point [pretrain.py]
#
# Examples:
#   bash launch/local.sh -n 2 --config launch/configs/tiny_cpu.yaml --data.prefixes data/stdlib --train.steps 50
#   bash launch/local.sh -n 8 -l deepspeed pretrain.py --config launch/configs/pretrain.yaml --model.preset molm-350m-4b
#
# (data/stdlib: `python -c 'import data_prep; data_prep.prepare_text_files(data_prep.stdlib_sources(4_000_000), "data/stdlib")'`;
# data/pile, the default of pretrain.yaml: `python -m data_prep --format pile ...`, README "Data".)
#
# The rendezvous port is MASTER_PORT [a free port]; PYTHON [.venv/bin/python if present] runs it.
# SIGUSR1 or SIGTERM to this script makes every rank save a checkpoint and stop (exit 75);
# rerunning the same command resumes from it.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }
while [[ $# -gt 0 ]]; do
  case $1 in
    -h|--help) usage; exit 0 ;;
    -n) NPROC_PER_NODE=$2; shift 2 ;;
    -l) LAUNCHER=$2; shift 2 ;;
    *) break ;;
  esac
done
script=pretrain.py
if [[ $# -gt 0 && $1 == *.py ]]; then script=$1; shift; fi

if [[ -z ${PYTHON:-} ]]; then
  PYTHON=python
  [[ -x $root/.venv/bin/python ]] && PYTHON=$root/.venv/bin/python
fi
if [[ -z ${NPROC_PER_NODE:-} ]]; then
  NPROC_PER_NODE=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  [[ $NPROC_PER_NODE -gt 0 ]] || NPROC_PER_NODE=1
fi
MASTER_PORT=${MASTER_PORT:-$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
export PYTHON NPROC_PER_NODE MASTER_PORT NNODES=1 NODE_RANK=0 MASTER_ADDR=127.0.0.1

cd "$root"
exec bash launch/node_launch.sh "$script" "$@"
