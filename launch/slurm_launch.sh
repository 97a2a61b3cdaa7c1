#!/usr/bin/env bash
# Shared body of the SLURM training jobs (launch/pretrain_*.slurm, launch/finetune_*.slurm): runs
# pretrain.py or finetune.py on every node of the allocation, checkpoints and requeues the job when
# SLURM warns of the time limit.
#
# Usage, inside an sbatch job (the .slurm scripts do this):
#   slurm_launch.sh PRESET [pretrain.py overrides ...]     pretraining of a model preset
#   slurm_launch.sh finetune.py [finetune.py overrides ...]  fine-tuning (the model comes from the
#                                                           recipe's finetune.init_from)
#
# How it launches: one srun task per node runs launch/node_launch.sh, which starts torchrun (or
# the DeepSpeed launcher) for that node's GPUs; all nodes meet at MASTER_ADDR:MASTER_PORT (static
# rendezvous, node rank = SLURM_NODEID). Everything goes to the job's one log (--output).
#
# Preemption: the .slurm scripts ask for `--signal=B:USR1@600`, so SLURM sends USR1 to this
# script 10 minutes before the time limit. It is forwarded to the training processes, which finish
# their step, save a checkpoint, log `preempted: checkpoint saved at step N` and exit (75). This
# script then requeues the job (`scontrol requeue`, hence `--requeue`); the requeued job (same job
# id, same log, appended) resumes from the latest complete checkpoint in CHECKPOINT_DIR. SIGTERM
# (scancel, a preempting job) is forwarded too: the run checkpoints and stops without a requeue.
# torchrun does not pass its workers' exit status on, so the requeue decision reads this run's
# part of the log for the line above.
#
# Environment (all optional; defaults in brackets):
#   MOLM_ROOT         repository checkout [SLURM_SUBMIT_DIR: submit from the repository root]
#   MOLM_ENV_SETUP    shell code run first to set up the software, e.g.
#                     "module load cuda/12.4; source ~/envs/molm/bin/activate"
#                     [source MOLM_ROOT/.venv/bin/activate when it exists]
#   PYTHON            interpreter with the project installed [python, after MOLM_ENV_SETUP]
#   CONFIG            training recipe YAML [launch/configs/pretrain.yaml; finetune_full.yaml for
#                     finetune.py]
#   DATA_PREFIXES     indexed datasets written by data_prep (space-separated, without .bin/.idx)
#                     [unset: data.prefixes of CONFIG]
#   DATA_WEIGHTS      their blend weights, e.g. "4 1" [unset: data.weights of CONFIG]
#   CHECKPOINT_DIR    checkpoints; the run resumes from the newest complete one [checkpoints/JOB_NAME]
#   METRICS_DIR       metrics.jsonl and TensorBoard files [runs/JOB_NAME]
#   NPROC_PER_NODE    training processes per node [GPUs SLURM gave the node, else nvidia-smi's
#                     count, else 1]
#   LAUNCHER          torchrun | deepspeed [torchrun]
#   MASTER_ADDR       rendezvous host [first host of the allocation (scontrol show hostnames)]
#   MASTER_PORT       rendezvous port [10000 + job id mod 20000, below Linux's ephemeral range]
#   SAVE_TIMEOUT      seconds a stopped run may take to save before it is killed [300]
#   EXTRA_ARGS        more training overrides, split on spaces (arguments after PRESET are
#                     passed on too)
#   NCCL_DEBUG [WARN], TORCH_NCCL_ASYNC_ERROR_HANDLING [1]; other NCCL_* pass through unchanged,
#                     e.g. NCCL_SOCKET_IFNAME, NCCL_IB_HCA; NCCL_NVLS_ENABLE=0 where NVLink
#                     SHARP (multicast) is unavailable or unstable (see README, "Launching on a
#                     cluster").
set -uo pipefail  # no -e: srun's exit status is examined below

for arg in "$@"; do
  if [[ $arg == -h || $arg == --help ]]; then
    sed -n '2,/^set -uo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
    exit 0
  fi
done
if [[ $# -lt 1 ]]; then
  echo "usage: slurm_launch.sh PRESET|finetune.py [overrides ...] (--help explains)" >&2
  exit 2
fi
if [[ -z ${SLURM_JOB_ID:-} ]]; then
  echo "slurm_launch.sh runs inside a SLURM job: sbatch launch/pretrain_8b_k2.slurm (or bash launch/local.sh on one machine)" >&2
  exit 2
fi
if [[ $1 == *.py ]]; then
  script=$1
  model_args=()
else
  script=pretrain.py
  model_args=(--model.preset "$1")
fi
shift

# ---- signals first: a warning that arrives while the environment loads must not be lost ----
preempted=""
requeue_wanted=""
srun_pid=""
on_signal() {
  echo "[launch] $(date '+%F %T') caught SIG$1: asking the training processes to checkpoint and stop"
  preempted=$1
  [[ $1 == USR1 ]] && requeue_wanted=1
  # srun passes the signal to every process of the step (torchrun and its workers).
  [[ -n $srun_pid ]] && kill -s "$1" "$srun_pid" 2>/dev/null
  return 0
}
trap 'on_signal USR1' USR1
trap 'on_signal TERM' TERM

MOLM_ROOT=${MOLM_ROOT:-$SLURM_SUBMIT_DIR}
if [[ ! -f $MOLM_ROOT/$script ]]; then
  echo "slurm_launch.sh: no $script in MOLM_ROOT=$MOLM_ROOT; submit from the repository root or set MOLM_ROOT" >&2
  exit 2
fi
cd "$MOLM_ROOT" || exit 2
if [[ -n ${MOLM_ENV_SETUP:-} ]]; then
  eval "$MOLM_ENV_SETUP"
elif [[ -f .venv/bin/activate ]]; then
  source .venv/bin/activate
fi
export PYTHON=${PYTHON:-python}

# ---- rendezvous and sizes ---------------------------------------------------------------------
export NNODES=$SLURM_JOB_NUM_NODES
export MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
export MASTER_PORT=${MASTER_PORT:-$((10000 + SLURM_JOB_ID % 20000))}
if [[ -z ${NPROC_PER_NODE:-} ]]; then
  NPROC_PER_NODE=${SLURM_GPUS_ON_NODE:-0}
  [[ $NPROC_PER_NODE -gt 0 ]] || NPROC_PER_NODE=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  [[ $NPROC_PER_NODE -gt 0 ]] || NPROC_PER_NODE=1
fi
export NPROC_PER_NODE
unset NODE_RANK  # each srun task takes its own from SLURM_NODEID
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
# Abort a collective that hangs (a dead node) instead of blocking until the time limit.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
# Log lines appear in the job log as they happen, not when a buffer fills.
export PYTHONUNBUFFERED=1

default_config=launch/configs/pretrain.yaml
[[ $script == finetune.py ]] && default_config=launch/configs/finetune_full.yaml
CONFIG=${CONFIG:-$default_config}
CHECKPOINT_DIR=${CHECKPOINT_DIR:-checkpoints/$SLURM_JOB_NAME}
METRICS_DIR=${METRICS_DIR:-runs/$SLURM_JOB_NAME}
args=(--config "$CONFIG" "${model_args[@]}" --checkpoint.dir "$CHECKPOINT_DIR" --metrics.dir "$METRICS_DIR")
# shellcheck disable=SC2206  # the lists and EXTRA_ARGS are split on spaces on purpose
[[ -n ${DATA_PREFIXES:-} ]] && args+=(--data.prefixes $DATA_PREFIXES)
# shellcheck disable=SC2206
[[ -n ${DATA_WEIGHTS:-} ]] && args+=(--data.weights $DATA_WEIGHTS)
# shellcheck disable=SC2206
args+=(${EXTRA_ARGS:-} "$@")

job_log=$(scontrol show job -o "$SLURM_JOB_ID" | grep -o 'StdOut=[^ ]*' | cut -d= -f2-)
log_offset=$(stat -c %s "$job_log" 2>/dev/null || echo 0)
echo "[launch] $(date '+%F %T') job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $NNODES node(s)" \
  "[$SLURM_JOB_NODELIST] x $NPROC_PER_NODE processes, ${LAUNCHER:-torchrun} rendezvous $MASTER_ADDR:$MASTER_PORT," \
  "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
echo "[launch] $script ${args[*]}"

rc=0
if [[ -z $preempted ]]; then
  # One task per node with all of the node's CPUs (srun would otherwise give the step one CPU
  # per task); --kill-on-bad-exit ends every node when one fails instead of hanging at a collective.
  srun --nodes="$NNODES" --ntasks-per-node=1 --cpus-per-task="$SLURM_CPUS_ON_NODE" --kill-on-bad-exit=1 \
    bash launch/node_launch.sh "$script" "${args[@]}" &
  srun_pid=$!
  # `wait` returns early (status > 128) whenever a trapped signal arrives: keep waiting for srun.
  while kill -0 "$srun_pid" 2>/dev/null; do wait "$srun_pid"; done
  wait "$srun_pid"
  rc=$?
fi

saved_in_this_run() {
  [[ -r $job_log ]] && tail -c +$((log_offset + 1)) "$job_log" | grep -q 'preempted: checkpoint saved at step'
}
if [[ -n $requeue_wanted ]] && { [[ $rc -eq 75 ]] || [[ -z $srun_pid ]] || saved_in_this_run; }; then
  echo "[launch] $(date '+%F %T') requeueing job $SLURM_JOB_ID; it resumes from the latest checkpoint in $CHECKPOINT_DIR"
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi
[[ -n $preempted ]] && echo "[launch] stopped by SIG$preempted; training exited with $rc"
exit "$rc"
