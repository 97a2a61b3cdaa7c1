"""Evaluation of MoLM models: lm-evaluation-harness on local tasks, perplexity (the harness's
rolling windows and our Transformer-XL segments), HumanEval pass@k in a sandbox, expert statistics.

    python -m molm_megatron.eval lm-eval|perplexity|humaneval --model PATH ... (--help for each)

PATH is a Hugging Face folder or a training checkpoint (consolidated on the fly).
"""
