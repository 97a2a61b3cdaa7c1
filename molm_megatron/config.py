"""Every dataclass of a run and the named model presets.

The model fields carry the names of the published ModuleFormer (MoLM) checkpoints' `config.json`
(`n_embd`, `att_hidden`, `n_att_experts`, ...), so Hugging Face conversion is field-for-field.
Each field's docstring is its `--help` text. Presets derive from each other (torchtitan's
config registry); `molm-350m-4b`, `molm-700m-4b` and `molm-700m-8b` are Table 1 of
Shen et al., "ModuleFormer: Modularity Emerges from Mixture-of-Experts" (2023).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

AUX_LOSS_TYPES = ("mi", "switch")


@dataclass
class ModelConfig:
    """The MoLM architecture. Field names follow the published `config.json`."""

    vocab_size: int = 50295
    """Vocabulary size (CodeGen tokenizer: 50257 GPT-2 ids plus 38 whitespace-run tokens)."""
    block_size: int = 512
    """Tokens per training segment."""
    history_length: int = 512
    """Tokens of the previous segment kept as attention memory (Transformer-XL style)."""
    n_embd: int = 1024
    """Hidden size d."""
    n_layer: int = 24
    """Number of Transformer blocks."""
    n_head: int = 1
    """Attention heads per attention expert; keys/values have the same number of heads."""
    att_hidden: int = 1024
    """Width of one attention expert (n_head * head size)."""
    ffd_hidden: int = 2048
    """Hidden width of one MLP expert."""
    gating_size: int = 256
    """Hidden width of the router MLP."""
    n_att_experts: int = 16
    """Attention experts per layer."""
    k_att: int = 2
    """Attention experts chosen per token."""
    n_mlp_experts: int = 32
    """MLP experts per layer."""
    k_mlp: int = 2
    """MLP experts chosen per token."""
    activation_function: str = "gelu_new"
    """MLP expert activation; the published models use GELU with the tanh approximation."""
    sample_topk: int = 0
    """In training keep the best k - sample_topk experts and sample sample_topk more from the rest."""
    aux_loss_type: str = "mi"
    """Load-balancing loss used in pretraining: 'mi' (mutual information) or 'switch'."""
    aux_loss_weight: float = 0.0
    """Weight of the load-balancing loss (`aux_loss_type`) in the training loss."""
    concentration_loss_weight: float = 0.0
    """Weight of the load-concentration loss H(e) (fine-tuning)."""
    z_loss_weight: float = 0.0
    """Weight of the router z-loss (with the switch baseline)."""
    routing_reg_weight: float = 0.0
    """Weight of the routing regularisation ||W_e_new|| of inserted experts (continual learning)."""
    gate_type: str = "mlp"
    """Router type; only the published 'mlp' router is supported."""
    embd_pdrop: float = 0.0
    """Dropout after the token embedding."""
    attn_pdrop: float = 0.0
    """Dropout on the stick-breaking attention weights (reference path only)."""
    resid_pdrop: float = 0.0
    """Dropout on each residual branch."""
    moe_pdrop: float = 0.0
    """Dropout inside the router MLP (index 2 of `gate.w_gate`)."""
    layer_norm_epsilon: float = 1e-5
    """LayerNorm epsilon."""
    initializer_range: float = 0.02
    """Std of the normal init of linear and embedding weights."""
    bos_token_id: int = 50256
    eos_token_id: int = 50256
    tie_word_embeddings: bool = False
    """Published MoLM unties the head; kept False."""

    @property
    def head_size(self) -> int:
        return self.att_hidden // self.n_head

    def validate(self) -> None:
        """Raise ValueError naming the field and both values on an inconsistent config."""
        positive = ("vocab_size", "block_size", "n_embd", "n_layer", "n_head", "att_hidden",
                    "ffd_hidden", "gating_size", "n_att_experts", "k_att", "n_mlp_experts", "k_mlp")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.history_length < 0:
            raise ValueError(f"model.history_length must be >= 0, got {self.history_length}")
        if self.k_att > self.n_att_experts:
            raise ValueError(f"model.k_att ({self.k_att}) exceeds model.n_att_experts ({self.n_att_experts})")
        if self.k_mlp > self.n_mlp_experts:
            raise ValueError(f"model.k_mlp ({self.k_mlp}) exceeds model.n_mlp_experts ({self.n_mlp_experts})")
        if self.att_hidden % self.n_head:
            raise ValueError(f"model.att_hidden ({self.att_hidden}) is not divisible by model.n_head ({self.n_head})")
        if not 0 <= self.sample_topk <= min(self.k_att, self.k_mlp):
            raise ValueError(f"model.sample_topk ({self.sample_topk}) must be in [0, min(k_att ({self.k_att}), "
                             f"k_mlp ({self.k_mlp}))]")
        if self.aux_loss_type not in AUX_LOSS_TYPES:
            raise ValueError(f"model.aux_loss_type ({self.aux_loss_type!r}) must be one of {AUX_LOSS_TYPES}")
        if self.gate_type != "mlp":
            raise ValueError(f"model.gate_type ({self.gate_type!r}) must be 'mlp' (the published router)")
        if self.activation_function not in ("gelu_new", "gelu", "relu", "silu"):
            raise ValueError(f"model.activation_function ({self.activation_function!r}) must be one of "
                             "gelu_new, gelu, relu, silu")
        if self.tie_word_embeddings:
            raise ValueError("model.tie_word_embeddings must be False (MoLM unties the head)")

    @property
    def kv_is_identity(self) -> bool:
        """Published rule: keys and values are the hidden states themselves (no k/v projection)."""
        return self.n_head == 1 and self.att_hidden == self.n_embd

    # ---- sizes without allocating anything -------------------------------------------------
    def num_params(self, active: bool = False, embedding: bool = True) -> int:
        """Parameter count from the config alone; `active` counts only the k chosen experts.

        `embedding=False` leaves out the token-embedding table (a lookup, no FLOPs); the paper's
        Table 1 sizes (350M / 700M active) round these counts.
        """
        d, L = self.n_embd, self.n_layer
        router = lambda E: d * self.gating_size + self.gating_size + self.gating_size * E  # noqa: E731
        e_att = self.k_att if active else self.n_att_experts
        e_mlp = self.k_mlp if active else self.n_mlp_experts
        kv = 0 if self.kv_is_identity else 2 * (d * self.att_hidden + self.att_hidden)
        attn = router(self.n_att_experts) + e_att * 2 * d * self.att_hidden + kv
        mlp = router(self.n_mlp_experts) + e_mlp * 2 * d * self.ffd_hidden
        norms = 2 * 2 * d
        emb = self.vocab_size * d if embedding else 0
        return L * (attn + mlp + norms) + self.vocab_size * d + emb + 2 * d

    def flops_per_token(self, seq_len: int, history: int | None = None) -> float:
        """Training FLOPs per token (forward + backward = 3x forward) of the active path.

        6 * active matmul parameters (embedding lookup excluded, head included) plus the
        attention score and value products: per layer 2 (QK^T and AV) * 2 FLOPs * k_att * att_hidden
        * keys attended (half the segment on average plus the memory), times 3.
        """
        history = self.history_length if history is None else history
        dense = self.num_params(active=True, embedding=False)
        keys = history + (seq_len + 1) / 2
        attn = self.n_layer * 2 * 2 * self.k_att * self.att_hidden * keys
        return 6.0 * dense + 3.0 * attn


def _tiny() -> ModelConfig:
    return ModelConfig(vocab_size=512, block_size=32, history_length=32, n_embd=64, n_layer=2,
                       n_head=1, att_hidden=64, ffd_hidden=128, gating_size=32, n_att_experts=4,
                       k_att=2, n_mlp_experts=8, k_mlp=2, aux_loss_weight=0.01)


def _molm_350m_4b() -> ModelConfig:
    return ModelConfig(aux_loss_weight=0.01)


PRESETS: dict[str, Callable[[], ModelConfig]] = {
    "molm-350m-4b": _molm_350m_4b,
    "molm-700m-4b": lambda: dataclasses.replace(_molm_350m_4b(), k_att=4, k_mlp=4),
    "molm-700m-8b": lambda: dataclasses.replace(_molm_350m_4b(), n_layer=48),
    # Tests: hidden 64, 2 layers, a few experts; multi-head and projected k/v variant too.
    "tiny": _tiny,
    "tiny-multihead": lambda: dataclasses.replace(_tiny(), n_head=2, att_hidden=32),
    # The CPU demo: small enough to train for a few hundred steps on 2 cores in minutes.
    "demo": lambda: dataclasses.replace(_tiny(), vocab_size=50295, block_size=64, history_length=64,
                                         n_embd=128, n_layer=4, att_hidden=128, ffd_hidden=256,
                                         n_att_experts=8, n_mlp_experts=16),
}


def model_preset(name: str, **overrides) -> ModelConfig:
    """A named preset with field overrides, validated."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    cfg = PRESETS[name]()
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    for key in overrides:
        if key not in names:
            raise ValueError(f"model.{key} is not a ModelConfig field")
    cfg = dataclasses.replace(cfg, **overrides)
    cfg.validate()
    return cfg
