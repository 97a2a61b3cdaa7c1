#!/usr/bin/env bash
# Training throughput at the paper recipe's per-GPU shape on one GPU (BENCHMARKS.md, "Training
# engine" and "Fine-tuning"): molm-350m-4b (all 24 layers), segments of 512 tokens with 512 memory
# tokens, 98,304 tokens per optimizer step, bf16 with ZeRO-1, through the real Trainer.
#   eager_mb8, graph_mb8, graph_mb16, graph_mb32: pretraining (MI loss), micro-batch 8 (24
#   accumulation steps) eager, then with CUDA graphs; then graphs at micro-batch 16 and 32 (12 and 6
#   accumulation steps; 32 recomputes the attention sublayers to fit 141 GB).
#   ft_full_mb8, ft_continual_mb8: finetune.py's recipes on the same random-weight model, eager at
#   micro-batch 8: full fine-tuning (launch/configs/finetune_full.yaml) and continual learning with
#   8 inserted MLP experts per layer, only they and their router rows trained
#   (launch/configs/finetune_continual.yaml).
# Each run writes DIR/NAME/breakdown.json (timed_tokens_per_s, timed_mfu, peak memory, the profiled
# kernel-time breakdown; fine-tuning adds trainable_params, total_params, trainable_share) and
# DIR/NAME.log. On an H200 a run takes about 4 minutes (the first step autotunes the kernels, the
# profiled step's post-processing about a minute).
#
#   bash benchmarks/train_throughput.sh DIR [DATA_PREFIX] [NAME ...]
#
# DATA_PREFIX defaults to build/bench_data/stdlib (data_prep output of 5 MB of standard-library
# sources); NAME picks runs (default: the four pretraining runs).
set -uo pipefail
out=${1:?usage: bash benchmarks/train_throughput.sh DIR [DATA_PREFIX] [NAME ...]}
data=${2:-build/bench_data/stdlib}
shift $(( $# > 1 ? 2 : 1 ))
names=("$@")
[ ${#names[@]} -gt 0 ] || names=(eager_mb8 graph_mb8 graph_mb16 graph_mb32)
mkdir -p "$out"
common=(--data.prefixes "$data" --data.weights 1 --data.split 100,0,0 --train.steps 3
        --train.global_batch_tokens 98304 --parallel.zero_stage 1 --train.precision bf16
        --train.eval_interval 0 --checkpoint.dir "" --metrics.tensorboard false)
pretrain=(--model.preset molm-350m-4b --schedule.warmup_steps 1)
finetune=(--finetune.init_from preset:molm-350m-4b)
for name in "${names[@]}"; do
  mode=() model=("${pretrain[@]}")
  case $name in
    eager_mb8)  flags=(--train.micro_batch_size 8) ;;
    graph_mb8)  flags=(--train.micro_batch_size 8 --train.cuda_graph true) ;;
    graph_mb16) flags=(--train.micro_batch_size 16 --train.cuda_graph true) ;;
    graph_mb32) flags=(--train.micro_batch_size 32 --train.cuda_graph true --train.activation_checkpoint moa) ;;
    ft_full_mb8)
      mode=(--finetune) model=(--config launch/configs/finetune_full.yaml "${finetune[@]}")
      flags=(--train.micro_batch_size 8) ;;
    ft_continual_mb8)
      mode=(--finetune) model=(--config launch/configs/finetune_continual.yaml "${finetune[@]}"
                               --finetune.insert_mlp_experts 8)
      flags=(--train.micro_batch_size 8) ;;
    *) echo "unknown run $name" >&2; exit 2 ;;
  esac
  echo "== $name"
  python -m molm_megatron.training.benchmark --out "$out/$name" --timed-steps 2 --profile-steps 1 "${mode[@]}" -- \
    "${model[@]}" "${common[@]}" "${flags[@]}" --metrics.dir "$out/$name" > "$out/$name.log" 2>&1
  echo "exit $?"
  grep -E "^timed:|step wall|^  [a-z]+ +[0-9]" "$out/$name.log" || tail -5 "$out/$name.log"
done
