#!/usr/bin/env bash
# Start the training processes of one node: torchrun (default) or the DeepSpeed launcher, with a
# static rendezvous at MASTER_ADDR:MASTER_PORT. Run once per node: by srun under SLURM
# (launch/slurm_launch.sh) and directly on one machine (launch/local.sh).
#
# Usage: node_launch.sh SCRIPT.py [script arguments ...]
#
# Environment (defaults in brackets):
#   NNODES          number of nodes [1]
#   NODE_RANK       this node's index [SLURM_NODEID, else 0]
#   NPROC_PER_NODE  training processes on this node [1]
#   MASTER_ADDR     host of node 0 [127.0.0.1]
#   MASTER_PORT     rendezvous port on node 0 [29500]
#   LAUNCHER        torchrun | deepspeed [torchrun]
#   SAVE_TIMEOUT    seconds torchrun gives its workers to checkpoint and exit after a stop
#                   signal before it kills them [300]
#   PYTHON          interpreter that has the project installed [python]
set -euo pipefail

if [[ $# -lt 1 ]]; then
  echo "usage: node_launch.sh SCRIPT.py [script arguments ...] (--help explains)" >&2
  exit 2
fi
if [[ $1 == -h || $1 == --help ]]; then
  sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
  exit 0
fi

NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-${SLURM_NODEID:-0}}
NPROC_PER_NODE=${NPROC_PER_NODE:-1}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
PYTHON=${PYTHON:-python}

case ${LAUNCHER:-torchrun} in
  torchrun)
    # torchrun forwards SIGTERM/SIGINT to its workers by default; USR1 is the preemption warning
    # SLURM sends (--signal), so torchrun must forward it too instead of dying from it
    # (--signals-to-handle needs torch >= 2.9: older ones fail here rather than lose a checkpoint).
    # It then gives the workers SAVE_TIMEOUT to save (its own default, 30 s, is short for a
    # multi-GB checkpoint) before it kills them. torchrun_exit.py is torchrun exiting with the
    # workers' status (2 bad configuration, 3 non-finite, 75 stopped after a checkpoint) instead
    # of its own tracebacks.
    export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${SAVE_TIMEOUT:-300}
    exec "$PYTHON" "$(dirname "${BASH_SOURCE[0]}")/torchrun_exit.py" --nnodes="$NNODES" --node_rank="$NODE_RANK" \
      --nproc_per_node="$NPROC_PER_NODE" --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT" \
      --signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 "$@"
    ;;
  deepspeed)
    # The DeepSpeed launcher needs a host list to count the world; --no_ssh makes every node start
    # only its own processes (srun already runs us on each node). Its launcher processes would die
    # from USR1, so they ignore it (an ignored signal stays ignored across exec); the training
    # processes install their own handler and still receive it from SLURM, which signals every
    # process of the job step.
    hostfile=$(mktemp "${TMPDIR:-/tmp}/molm-hostfile.XXXXXX")
    trap 'rm -f "$hostfile"' EXIT
    for ((i = 0; i < NNODES; i++)); do echo "node$i slots=$NPROC_PER_NODE"; done > "$hostfile"
    trap '' USR1
    "$PYTHON" -m deepspeed.launcher.runner --hostfile="$hostfile" --no_ssh --node_rank="$NODE_RANK" \
      --num_nodes="$NNODES" --num_gpus="$NPROC_PER_NODE" --master_addr="$MASTER_ADDR" \
      --master_port="$MASTER_PORT" "$@"
    ;;
  *)
    echo "node_launch.sh: LAUNCHER must be torchrun or deepspeed, got '$LAUNCHER'" >&2
    exit 2
    ;;
esac
