"""Tests of molm_megatron.training and pretrain.py (CPU, gloo)."""
