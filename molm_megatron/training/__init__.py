"""The pretraining engine: `trainer` (build, then loop), `checkpoint` (atomic per-rank checkpoints),
`metrics` (one flat dict to stdout, JSON lines and TensorBoard; MFU), `schedule` (batch arithmetic,
LR warmup + cosine), `optimizer` (AdamW parameter groups, the DeepSpeed config), `benchmark`
(a profiled single-device run). `pretrain.py` is the entry point."""
