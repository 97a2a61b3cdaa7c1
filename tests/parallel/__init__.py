"""Multi-rank tests of molm_megatron.parallel (gloo, CPU)."""
