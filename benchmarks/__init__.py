"""Model-level GPU checks and benchmarks (`python -m benchmarks.model_bench`) and EMoE's
(`python -m benchmarks.emoe_bench`); the kernels' own are in `molm_kernels.bench`, and training
throughput is `python -m molm_megatron.training.benchmark`."""
