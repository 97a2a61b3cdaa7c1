#!/usr/bin/env bash
# Training throughput at the paper recipe's per-GPU shape on one GPU (BENCHMARKS.md, "Training
# engine"): molm-350m-4b (all 24 layers), segments of 512 tokens with 512 memory tokens, 98,304
# tokens per optimizer step, bf16 with ZeRO-1 and the MI loss, through the real Trainer.
#   micro-batch 8 (24 accumulation steps) eager, then with CUDA graphs; then graphs at micro-batch
#   16 and 32 (12 and 6 accumulation steps; 32 recomputes the attention sublayers to fit 141 GB).
# Each run writes DIR/NAME/breakdown.json (timed_tokens_per_s, timed_mfu, peak memory, the profiled
# kernel-time breakdown) and DIR/NAME.log.
#
#   bash benchmarks/train_throughput.sh DIR [DATA_PREFIX] [NAME ...]
#
# DATA_PREFIX defaults to build/bench_data/stdlib (data_prep output of 5 MB of standard-library
# sources); NAME picks runs (eager_mb8 graph_mb8 graph_mb16 graph_mb32; default all).
set -uo pipefail
out=${1:?usage: bash benchmarks/train_throughput.sh DIR [DATA_PREFIX] [NAME ...]}
data=${2:-build/bench_data/stdlib}
shift $(( $# > 1 ? 2 : 1 ))
names=("$@")
[ ${#names[@]} -gt 0 ] || names=(eager_mb8 graph_mb8 graph_mb16 graph_mb32)
mkdir -p "$out"
common=(--model.preset molm-350m-4b --data.prefixes "$data" --data.split 100,0,0 --train.steps 3
        --train.global_batch_tokens 98304 --schedule.warmup_steps 1 --parallel.zero_stage 1
        --train.precision bf16 --train.eval_interval 0 --checkpoint.dir "" --metrics.tensorboard false)
for name in "${names[@]}"; do
  case $name in
    eager_mb8)  flags=(--train.micro_batch_size 8) ;;
    graph_mb8)  flags=(--train.micro_batch_size 8 --train.cuda_graph true) ;;
    graph_mb16) flags=(--train.micro_batch_size 16 --train.cuda_graph true) ;;
    graph_mb32) flags=(--train.micro_batch_size 32 --train.cuda_graph true --train.activation_checkpoint moa) ;;
    *) echo "unknown run $name" >&2; exit 2 ;;
  esac
  echo "== $name"
  python -m molm_megatron.training.benchmark --out "$out/$name" --timed-steps 2 --profile-steps 1 -- \
    "${common[@]}" "${flags[@]}" --metrics.dir "$out/$name" > "$out/$name.log" 2>&1
  echo "exit $?"
  grep -E "^timed:|step wall|^  [a-z]+ +[0-9]" "$out/$name.log" || tail -5 "$out/$name.log"
done
