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
ATTENTION_TYPES = ("stickbreaking", "softmax_rope")


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
    n_att_experts_per_layer: list[int] = dataclasses.field(default_factory=list)
    """Attention experts of each layer, one entry per layer (a pruned model); empty: `n_att_experts` in
    every layer. Counts include inserted experts."""
    n_mlp_experts_per_layer: list[int] = dataclasses.field(default_factory=list)
    """MLP experts of each layer, one entry per layer (a pruned model); empty: `n_mlp_experts` in every
    layer. Counts include inserted experts."""
    n_new_att_experts: int = 0
    """The last n attention experts of every layer are inserted experts (continual learning), stored as
    separate parameters so they can train while the old ones stay frozen."""
    n_new_mlp_experts: int = 0
    """The last n MLP experts of every layer are inserted experts (continual learning), stored as
    separate parameters so they can train while the old ones stay frozen."""
    attention: str = "stickbreaking"
    """How the MoA heads attend over the shared keys/values: 'stickbreaking' (published MoLM, no positional
    encoding) or 'softmax_rope' (the paper's baseline: causal softmax with rotary position embedding on queries
    and keys, memory keys included; not in the published Hugging Face format)."""
    rope_theta: float = 10000.0
    """Base of the rotary position embedding's frequencies (attention 'softmax_rope')."""
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

    def att_experts(self, layer: int) -> int:
        """Attention experts of `layer` (inserted ones included)."""
        return self.n_att_experts_per_layer[layer] if self.n_att_experts_per_layer else self.n_att_experts

    def mlp_experts(self, layer: int) -> int:
        """MLP experts of `layer` (inserted ones included)."""
        return self.n_mlp_experts_per_layer[layer] if self.n_mlp_experts_per_layer else self.n_mlp_experts

    def validate(self) -> None:
        """Raise ValueError naming the field and both values on an inconsistent config."""
        positive = ("vocab_size", "block_size", "n_embd", "n_layer", "n_head", "att_hidden",
                    "ffd_hidden", "gating_size", "n_att_experts", "k_att", "n_mlp_experts", "k_mlp")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.history_length < 0:
            raise ValueError(f"model.history_length must be >= 0, got {self.history_length}")
        for kind in ("att", "mlp"):
            self._validate_expert_counts(kind)
        if self.att_hidden % self.n_head:
            raise ValueError(f"model.att_hidden ({self.att_hidden}) is not divisible by model.n_head ({self.n_head})")
        if not 0 <= self.sample_topk <= min(self.k_att, self.k_mlp):
            raise ValueError(f"model.sample_topk ({self.sample_topk}) must be in [0, min(k_att ({self.k_att}), "
                             f"k_mlp ({self.k_mlp}))]")
        if self.attention not in ATTENTION_TYPES:
            raise ValueError(f"model.attention ({self.attention!r}) must be one of {ATTENTION_TYPES}")
        if self.attention == "softmax_rope" and self.head_size % 2:
            # Rotary embedding turns pairs of head dimensions.
            raise ValueError(f"model.attention 'softmax_rope' needs an even head size; model.att_hidden "
                             f"({self.att_hidden}) / model.n_head ({self.n_head}) = {self.head_size}")
        if not self.rope_theta > 0:
            raise ValueError(f"model.rope_theta must be positive, got {self.rope_theta}")
        if self.aux_loss_type not in AUX_LOSS_TYPES:
            raise ValueError(f"model.aux_loss_type ({self.aux_loss_type!r}) must be one of {AUX_LOSS_TYPES}")
        if self.gate_type != "mlp":
            raise ValueError(f"model.gate_type ({self.gate_type!r}) must be 'mlp' (the published router)")
        if self.activation_function not in ("gelu_new", "gelu", "relu", "silu"):
            raise ValueError(f"model.activation_function ({self.activation_function!r}) must be one of "
                             "gelu_new, gelu, relu, silu")
        if self.tie_word_embeddings:
            raise ValueError("model.tie_word_embeddings must be False (MoLM unties the head)")

    def _validate_expert_counts(self, kind: str) -> None:
        """Per-layer list length, and k <= count and n_new < count in every layer, for 'att' or 'mlp'."""
        per_layer: list[int] = getattr(self, f"n_{kind}_experts_per_layer")
        k, n_new = getattr(self, f"k_{kind}"), getattr(self, f"n_new_{kind}_experts")
        if per_layer and len(per_layer) != self.n_layer:
            raise ValueError(f"model.n_{kind}_experts_per_layer has {len(per_layer)} entries; "
                             f"model.n_layer is {self.n_layer}")
        if n_new < 0:
            raise ValueError(f"model.n_new_{kind}_experts must be >= 0, got {n_new}")
        # Name the field the count came from: the uniform one, or the layer's list entry.
        counts = ([(f"model.n_{kind}_experts_per_layer[{i}]", n) for i, n in enumerate(per_layer)] if per_layer
                  else [(f"model.n_{kind}_experts", getattr(self, f"n_{kind}_experts"))])
        for name, count in counts:
            if count <= 0:
                raise ValueError(f"{name} must be positive, got {count}")
            if k > count:
                raise ValueError(f"model.k_{kind} ({k}) exceeds {name} ({count})")
            if n_new >= count:
                # At least one old expert: inserted experts extend a router, they do not replace it.
                raise ValueError(f"model.n_new_{kind}_experts ({n_new}) must be less than {name} ({count})")

    @property
    def kv_is_identity(self) -> bool:
        """Published rule: keys and values are the hidden states themselves (no k/v projection)."""
        return self.n_head == 1 and self.att_hidden == self.n_embd

    # ---- sizes without allocating anything -------------------------------------------------
    def num_params(self, active: bool = False, embedding: bool = True) -> int:
        """Parameter count from the config alone; `active` counts only the k chosen experts.

        `embedding=False` leaves out the token-embedding table (a lookup, no FLOPs); the paper's
        Table 1 sizes (350M / 700M active) round these counts. Routers count all their rows also
        when `active`: every token scores every expert.
        """
        d, g = self.n_embd, self.gating_size
        router = lambda E: d * g + g + g * E  # noqa: E731
        kv = 0 if self.kv_is_identity else 2 * (d * self.att_hidden + self.att_hidden)
        norms = 2 * 2 * d
        layers = 0
        for layer in range(self.n_layer):
            E_att, E_mlp = self.att_experts(layer), self.mlp_experts(layer)
            e_att = self.k_att if active else E_att
            e_mlp = self.k_mlp if active else E_mlp
            attn = router(E_att) + e_att * 2 * d * self.att_hidden + kv
            mlp = router(E_mlp) + e_mlp * 2 * d * self.ffd_hidden
            layers += attn + mlp + norms
        emb = self.vocab_size * d if embedding else 0
        return layers + self.vocab_size * d + emb + 2 * d

    def training_spec(self) -> TrainingSpec:
        """What the trainer needs of a MoLM of this config (its `TrainingSpec`)."""
        return TrainingSpec(block_size=self.block_size, vocab_size=self.vocab_size, vocab_source="model.vocab_size",
                            history_length=self.history_length, config=dataclasses.asdict(self),
                            flops_per_token=self.flops_per_token(self.block_size),
                            new_experts={"attn": self.n_new_att_experts, "mlpf": self.n_new_mlp_experts},
                            aux_loss_name=self.aux_loss_type, parallel_config=self)

    def flops_per_token(self, seq_len: int, history: int | None = None) -> float:
        """Training FLOPs per token (forward + backward = 3x forward) of the active path.

        6 * active matmul parameters (embedding lookup excluded, head included; per layer, see
        num_params) plus the attention score and value products: per layer 2 (QK^T and AV) * 2 FLOPs
        * k_att * att_hidden * keys attended (half the segment on average plus the memory), times 3.
        """
        history = self.history_length if history is None else history
        dense = self.num_params(active=True, embedding=False)
        keys = history + (seq_len + 1) / 2
        attn = self.n_layer * 2 * 2 * self.k_att * self.att_hidden * keys
        return 6.0 * dense + 3.0 * attn


@dataclass(frozen=True)
class TrainingSpec:
    """What the trainer (and the expert statistics) ask of a model beyond its forward pass: MoLM's
    from its ModelConfig, a Hugging Face dense or EMoE model's from its adapter
    (molm_megatron.emoe.training.EMoECausalLM), so that one trainer drives both."""

    block_size: int
    """Tokens per training window."""
    vocab_size: int
    """Ids the model embeds: the data's vocabulary must fit."""
    vocab_source: str
    """Where vocab_size comes from, for error messages (a config field or file)."""
    history_length: int
    """Tokens of Transformer-XL memory; 0: the model keeps none (`out.memory` is None)."""
    config: dict
    """The trained model's configuration as saved in every checkpoint's meta.json; a resumed run must
    build the same, and the converters rebuild the model from it."""
    flops_per_token: float
    """Training FLOPs per token at block_size (MFU)."""
    new_experts: dict = dataclasses.field(default_factory=dict)
    """Router kind ('attn', 'mlpf') -> inserted experts (the last ones), for their load share."""
    aux_loss_name: str = ""
    """The load-balancing loss named on the log line ('' for none)."""
    parallel_config: ModelConfig | None = None
    """The MoLM config that the tensor- and expert-parallel plans split; None for a model that trains
    data-parallel only (ZeRO 1-3)."""
    zero3_leaf_modules: tuple = ()
    """Module classes ZeRO-3 must gather whole: they read their children's weights without calling them."""


def _tiny() -> ModelConfig:
    return ModelConfig(vocab_size=512, block_size=32, history_length=32, n_embd=64, n_layer=2,
                       n_head=1, att_hidden=64, ffd_hidden=128, gating_size=32, n_att_experts=4,
                       k_att=2, n_mlp_experts=8, k_mlp=2, aux_loss_weight=0.01,
                       bos_token_id=511, eos_token_id=511)


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
                                         n_att_experts=8, n_mlp_experts=16,
                                         bos_token_id=50256, eos_token_id=50256),
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


# ---- the run: one tree of sections (`JobConfig`), read from YAML and `--section.field` flags ----
# Each section field's docstring is its `--help` text (molm_megatron/cli.py reads it from this
# file's source, as tyro does for torchtitan's job_config.py). Precedence: field defaults < the
# YAML file < command-line flags.


@dataclass
class ModelSection:
    """The model: a named preset plus ModelConfig field overrides (`--model.n_layer 4`)."""

    preset: str = "tiny"
    """Named model preset (tiny, tiny-multihead, demo, molm-350m-4b, molm-700m-4b, molm-700m-8b);
    any ModelConfig field given beside it (YAML) or as `--model.<field>` replaces the preset's value."""
    overrides: dict = dataclasses.field(default_factory=dict)
    """ModelConfig fields replacing the preset's values (written flat beside `preset` in YAML)."""

    def build(self) -> ModelConfig:
        """The resolved, validated ModelConfig."""
        return model_preset(self.preset, **self.overrides)


@dataclass
class ParallelConfig:
    """How the ranks are split. Data-parallel size = WORLD_SIZE / tensor_parallel_size."""

    tensor_parallel_size: int = 1
    """Tensor-parallel ranks (megatron-core): vocab-parallel embedding, head and cross entropy;
    each MLP expert's hidden dimension split; attention experts kept whole."""
    expert_parallel_size: int = 1
    """Data-parallel ranks that share out one layer's MLP experts (dropless all-to-all); must divide
    the data-parallel size and model.n_mlp_experts."""
    zero_stage: int = 1
    """DeepSpeed ZeRO stage: 1 (optimizer states sharded), 2 (and gradients), 3 (and parameters;
    only with expert_parallel_size 1)."""
    backend: str = "auto"
    """torch.distributed backend: auto (nccl on GPU, gloo on CPU), nccl or gloo."""


@dataclass
class OptimizerConfig:
    """AdamW (decoupled weight decay) as in the ModuleFormer paper."""

    lr: float = 3e-4
    """Peak learning rate (after warmup)."""
    beta1: float = 0.9
    """AdamW beta1 (first-moment decay)."""
    beta2: float = 0.95
    """AdamW beta2 (second-moment decay; 0.95 as in GPT-3-style pretraining)."""
    eps: float = 1e-8
    """AdamW epsilon."""
    weight_decay: float = 0.01
    """Decoupled weight decay of matrices, expert tensors and embeddings; LayerNorm weights and all
    biases are never decayed."""
    grad_clip: float = 1.0
    """Clip the global gradient norm (all ranks, all parameters) to this value; 0 disables."""


@dataclass
class ScheduleConfig:
    """Learning rate: linear warmup, then cosine decay to min_lr_ratio x peak, then constant."""

    warmup_steps: int = 1000
    """Optimizer steps of linear warmup from lr/warmup_steps to the peak lr."""
    decay_steps: int = 0
    """Step at which the cosine reaches its floor; 0 means train.steps."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of the peak (0.1: decay to 10%)."""


@dataclass
class DataConfig:
    """Token data: indexed `.bin/.idx` prefixes written by data_prep, blended by weight."""

    prefixes: list[str] = dataclasses.field(default_factory=list)
    """Paths of indexed datasets without the .bin/.idx suffix."""
    weights: list[float] = dataclasses.field(default_factory=list)
    """Blend weight of each prefix (same length as prefixes; empty means equal weights)."""
    split: str = "98,2,0"
    """Train, validation, test proportions of every dataset's documents."""
    spec: str = ""
    """A data-spec YAML file (`datasets: [{prefix, weight}, ...]`, `split`; prefixes relative to the
    file) used instead of prefixes, weights and split."""


@dataclass
class CheckpointConfig:
    """Where and how often to save; a run whose dir holds a complete checkpoint resumes from it."""

    dir: str = ""
    """Checkpoint folder (shared by all ranks); empty disables checkpointing and resuming. A checkpoint
    of another parallel layout (world size, TP, EP, DP, ZeRO stage) resumes too, when data-parallel size
    x train.micro_batch_size is the same (README, "Resuming in another layout")."""
    interval: int = 1000
    """Save every this many steps (and always on SIGTERM/SIGUSR1 and at the end)."""
    keep_last: int = 3
    """Complete checkpoints to keep; older ones are deleted after a successful save."""


@dataclass
class MetricsConfig:
    """Logging: stdout, JSON lines and TensorBoard, from rank 0."""

    log_interval: int = 10
    """Log every this many steps (and the first step)."""
    dir: str = "runs/pretrain"
    """Folder of metrics.jsonl, the TensorBoard event files and offline Weights & Biases runs; empty
    writes no metrics files (stdout only)."""
    tensorboard: bool = True
    """Write TensorBoard event files."""
    wandb: bool = False
    """Also log to Weights & Biases (needs the `wandb` package, not installed by requirements.txt)."""
    wandb_project: str = "molm"
    """Weights & Biases project name."""
    wandb_mode: str = ""
    """Weights & Biases mode: online, offline (runs stay in metrics.dir; `wandb sync` uploads them
    later) or disabled; empty keeps wandb's own choice (WANDB_MODE, `wandb offline`)."""
    peak_tflops: float = 0.0
    """Peak dense bf16 TFLOP/s of one device for MFU; 0 looks it up (H100/H200 989, A100 312,
    CPU a nominal 0.1 per process)."""


@dataclass
class TrainConfig:
    """The loop: steps, batch, seed, device, validation, non-finite handling."""

    steps: int = 1000
    """Optimizer steps to train (a resumed run continues to this step)."""
    global_batch_tokens: int = 0
    """Tokens per optimizer step over all ranks; = micro_batch_size x grad accumulation x
    data-parallel size x model.block_size. 0 means one micro-batch per rank (no accumulation)."""
    micro_batch_size: int = 8
    """Sequences per rank per forward pass (also the number of parallel Transformer-XL streams)."""
    seed: int = 1234
    """Seed of the weights, the data order and dropout."""
    device: str = "auto"
    """auto (cuda if available), cuda or cpu."""
    precision: str = "auto"
    """auto (bf16 on GPU, fp32 on CPU), bf16 (fp32 master weights) or fp32."""
    eval_interval: int = 0
    """Validation perplexity on the held-out split every this many steps; 0 disables."""
    eval_steps: int = 20
    """Micro-batches per rank in one validation pass."""
    max_nonfinite_steps: int = 5
    """Stop (after a checkpoint) when this many consecutive steps have non-finite loss or gradients."""
    cuda_graph: bool = False
    """Capture each micro-batch's forward, backward and fp32 gradient accumulation as a CUDA graph
    and replay it: no per-kernel launch cost. Needs a CUDA device, bf16 with ZeRO-1,
    parallel.tensor_parallel_size 1 and parallel.expert_parallel_size 1 (the expert dispatcher reads
    split sizes on the host). Graphs are captured per kind of step (logging or not) and memory
    length; a window without memory (the first of a run) runs eagerly."""
    activation_checkpoint: str = "none"
    """Recompute activations in the backward instead of keeping them: none; moa (each layer's
    mixture-of-attention sublayer: router, query/output projections, attention); full (each whole
    block). Trades a partial or whole extra forward for memory, e.g. for larger micro-batches."""


FINETUNE_TRAINABLE = ("all", "new")
# ModelConfig fields a fine-tuning run may not change: the starting weights fix them (insertion,
# vocabulary growth, pruning and layer dropping change them through their own settings and commands).
SHAPE_FIELDS = ("vocab_size", "n_embd", "n_layer", "n_head", "att_hidden", "ffd_hidden", "gating_size",
                "n_att_experts", "n_mlp_experts", "n_att_experts_per_layer", "n_mlp_experts_per_layer",
                "n_new_att_experts", "n_new_mlp_experts", "activation_function", "gate_type", "tie_word_embeddings",
                "attention", "rope_theta")


@dataclass
class FinetuneConfig:
    """Fine-tuning: the starting weights, inserted experts and which tensors train.

    The model's shape comes from the starting weights; --model.<field> may change only its losses
    and other non-shape fields (e.g. --model.concentration_loss_weight, --model.routing_reg_weight).
    The MI loss of pretraining is off unless --model.aux_loss_weight is given."""

    init_from: str = ""
    """Starting weights (required): a pretraining checkpoint folder (pretrain.py's checkpoint.dir or
    one step_* folder, any parallel layout), a Hugging Face folder in the published MoLM format (the
    published weights), or a model file (python -m molm_megatron.modular prune|drop-layers,
    python -m molm_megatron.hf.convert consolidate); preset:NAME starts from a preset's random
    initialisation (benchmarks). Also a Hugging Face GPT-2, GPT-NeoX or Llama folder, dense or EMoE
    (python -m molm_megatron.emoe convert), or a checkpoint of one: trained without Transformer-XL
    memory, data-parallel only (ZeRO 1-3), in windows of --model.block_size tokens (default: the
    model's context length). A run whose checkpoint.dir holds a checkpoint resumes from that."""
    insert_mlp_experts: int = 0
    """Continual learning: new MLP experts appended to every layer (the router's W_e gains as many
    rows); with expert parallelism a multiple of parallel.expert_parallel_size."""
    insert_att_experts: int = 0
    """Continual learning: new attention experts appended to every layer (never expert-parallel)."""
    trainable: str = "all"
    """all: every tensor trains (full fine-tuning). new: only the inserted experts and their router rows
    (the partially trainable router), the new vocabulary rows and, with train_embedding, the token
    embedding; every other tensor is frozen (no gradient, no optimizer state, bitwise unchanged)."""
    train_embedding: bool = False
    """With trainable new: the whole token embedding trains too (the paper's joint-training setting)."""
    tokenizer: str = ""
    """An extended tokenizer folder (python -m tokenizer extend): the embedding and head grow to its
    vocabulary, the new rows initialised as published; with trainable new only the new rows train."""
    lora_rank: int = 0
    """LoRA (peft) of this rank on a Hugging Face dense or EMoE model, every other tensor frozen (no
    gradient, no optimizer state, bitwise unchanged); exports merge the adapters. 0: no LoRA."""
    lora_alpha: float = 16.0
    """LoRA scaling numerator: the adapter's update is scaled by lora_alpha / lora_rank."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA branch's input."""
    lora_targets: list[str] = dataclasses.field(default_factory=list)
    """Module-name suffixes that get adapters; empty: the attention projections (gpt2: attn.c_attn,
    attn.c_proj; gpt_neox: attention.query_key_value, attention.dense; llama: self_attn.q/k/v/o_proj).
    Never modules inside an EMoE FFN (its sparse computation reads the weights directly)."""


ZERO_STAGES = (1, 2, 3)
BACKENDS = ("auto", "nccl", "gloo")
DEVICES = ("auto", "cuda", "cpu")
PRECISIONS = ("auto", "bf16", "fp32")
ACTIVATION_CHECKPOINTS = ("none", "moa", "full")
WANDB_MODES = ("", "online", "offline", "disabled")


@dataclass
class JobConfig:
    """Pretrain a ModuleFormer (MoLM) model with DeepSpeed.

    The whole run: `molm_megatron.cli.parse_job_config(argv)` builds it from YAML plus
    `--section.field` flags. A fine-tuning job subclasses it with sections of its own; every field
    that is a dataclass is a section. The first docstring line is the program's `--help` summary.
    """

    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = dataclasses.field(default_factory=ScheduleConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = dataclasses.field(default_factory=MetricsConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)

    def validate(self) -> ModelConfig:
        """Check every field that needs no knowledge of the world size; returns the model config.

        World-dependent checks (batch arithmetic, divisibility by the parallel sizes) run at start-up
        in molm_megatron.training.schedule.plan_batch and check_layout.
        """
        cfg = self.model.build()
        p, o, s, t, c, m = self.parallel, self.optimizer, self.schedule, self.train, self.checkpoint, self.metrics
        for path, value in (("parallel.tensor_parallel_size", p.tensor_parallel_size),
                            ("parallel.expert_parallel_size", p.expert_parallel_size),
                            ("train.steps", t.steps), ("train.micro_batch_size", t.micro_batch_size),
                            ("train.eval_steps", t.eval_steps), ("train.max_nonfinite_steps", t.max_nonfinite_steps),
                            ("checkpoint.interval", c.interval), ("checkpoint.keep_last", c.keep_last),
                            ("metrics.log_interval", m.log_interval)):
            if value <= 0:
                raise ValueError(f"{path} must be positive, got {value}")
        for path, value in (("train.global_batch_tokens", t.global_batch_tokens),
                            ("train.eval_interval", t.eval_interval), ("schedule.warmup_steps", s.warmup_steps),
                            ("schedule.decay_steps", s.decay_steps), ("optimizer.weight_decay", o.weight_decay),
                            ("optimizer.grad_clip", o.grad_clip), ("metrics.peak_tflops", m.peak_tflops)):
            if value < 0:
                raise ValueError(f"{path} must be >= 0, got {value}")
        for path, value, allowed in (("parallel.zero_stage", p.zero_stage, ZERO_STAGES),
                                     ("parallel.backend", p.backend, BACKENDS),
                                     ("train.device", t.device, DEVICES), ("train.precision", t.precision, PRECISIONS),
                                     ("train.activation_checkpoint", t.activation_checkpoint, ACTIVATION_CHECKPOINTS)):
            if value not in allowed:
                raise ValueError(f"{path} must be one of {', '.join(map(str, allowed))}; got {value!r}")
        if p.zero_stage == 3 and p.expert_parallel_size > 1:
            raise ValueError(f"parallel.zero_stage 3 needs parallel.expert_parallel_size 1, got "
                             f"{p.expert_parallel_size} (DeepSpeed partitions no expert parameters in stage 3)")
        if t.cuda_graph:
            graph_needs = (("train.device", t.device, t.device != "cpu"),
                           ("train.precision", t.precision, t.precision != "fp32"),
                           ("parallel.zero_stage", p.zero_stage, p.zero_stage == 1),
                           ("parallel.tensor_parallel_size", p.tensor_parallel_size, p.tensor_parallel_size == 1),
                           ("parallel.expert_parallel_size", p.expert_parallel_size, p.expert_parallel_size == 1))
            for path, value, ok in graph_needs:
                if not ok:
                    raise ValueError(f"train.cuda_graph needs a CUDA device, bf16 with ZeRO-1, tensor and expert "
                                     f"parallel size 1; {path} is {value!r}")
        if not o.lr > 0 or not o.eps > 0:
            raise ValueError(f"optimizer.lr ({o.lr}) and optimizer.eps ({o.eps}) must be positive")
        for path, beta in (("optimizer.beta1", o.beta1), ("optimizer.beta2", o.beta2)):
            if not 0 <= beta < 1:
                raise ValueError(f"{path} must be in [0, 1), got {beta}")
        if not 0 <= s.min_lr_ratio <= 1:
            raise ValueError(f"schedule.min_lr_ratio must be in [0, 1], got {s.min_lr_ratio}")
        decay = s.decay_steps or t.steps
        if decay < s.warmup_steps:
            raise ValueError(f"schedule.decay_steps ({decay}, 0 = train.steps) is shorter than "
                             f"schedule.warmup_steps ({s.warmup_steps})")
        if self.data.spec and (self.data.prefixes or self.data.weights):
            raise ValueError(f"data.spec ({self.data.spec}) replaces data.prefixes and data.weights; give one or the "
                             f"other, not both (data.prefixes: {self.data.prefixes})")
        if m.wandb_mode not in WANDB_MODES:
            raise ValueError(f"metrics.wandb_mode must be one of {', '.join(map(repr, WANDB_MODES))}; got {m.wandb_mode!r}")
        if self.data.weights and len(self.data.weights) != len(self.data.prefixes):
            raise ValueError(f"data.weights has {len(self.data.weights)} entries but data.prefixes has "
                             f"{len(self.data.prefixes)}")
        return cfg

    def to_dict(self) -> dict:
        """The resolved tree, model fields included in full (what is logged and saved in checkpoints)."""
        out = dataclasses.asdict(self)
        out["model"] = {"preset": self.model.preset, **dataclasses.asdict(self.model.build())}
        return out


# ---- fine-tuning: the pretraining tree plus a `finetune` section and the paper's fine-tuning defaults ----


@dataclass
class FinetuneModelSection(ModelSection):
    """The model's non-shape settings over the starting weights' own (e.g. loss weights)."""

    preset: str = ""
    """Not used by fine-tuning (the model comes from finetune.init_from); --model.<field> sets a
    non-shape ModelConfig field (loss weights, dropout, k, history_length) over the starting
    weights' value."""

    def build(self) -> ModelConfig:
        """The overrides over ModelConfig's defaults, validated (the starting weights' config is only
        known once they are loaded: modular.finetune.build_finetune_model applies them there)."""
        cfg = dataclasses.replace(ModelConfig(), **self.overrides)
        cfg.validate()
        return cfg


@dataclass
class FinetuneOptimizerConfig(OptimizerConfig):
    """AdamW (decoupled weight decay); fine-tuning's learning rate 5e-5 (ModuleFormer appendix C.4)."""

    lr: float = 5e-5


@dataclass
class ConstantScheduleConfig(ScheduleConfig):
    """Learning rate: constant by default in fine-tuning (no warmup, min_lr_ratio 1).

    The pretraining schedule's fields (linear warmup, then cosine decay to min_lr_ratio x peak) still apply."""

    warmup_steps: int = 0
    min_lr_ratio: float = 1.0


@dataclass
class FinetuneMetricsConfig(MetricsConfig):
    """Logging: stdout, JSON lines and TensorBoard, from rank 0."""

    dir: str = "runs/finetune"


@dataclass
class FinetuneJobConfig(JobConfig):
    """Fine-tune a ModuleFormer (MoLM) model with DeepSpeed: load concentration, continual learning by
    inserted experts, or plain full fine-tuning, from a pretraining checkpoint or a Hugging Face folder;
    or a dense or EMoE GPT-2 / GPT-NeoX / Llama model, fully or with LoRA.

    The pretraining tree (one engine, one checkpoint format) plus the `finetune` section.
    """

    model: FinetuneModelSection = dataclasses.field(default_factory=FinetuneModelSection)
    optimizer: FinetuneOptimizerConfig = dataclasses.field(default_factory=FinetuneOptimizerConfig)
    schedule: ConstantScheduleConfig = dataclasses.field(default_factory=ConstantScheduleConfig)
    metrics: FinetuneMetricsConfig = dataclasses.field(default_factory=FinetuneMetricsConfig)
    finetune: FinetuneConfig = dataclasses.field(default_factory=FinetuneConfig)

    def validate(self) -> ModelConfig:
        """JobConfig's checks plus the finetune section's; the returned config holds only the
        overrides (the model's shape comes from finetune.init_from)."""
        f, m = self.finetune, self.model
        if m.preset:
            raise ValueError(f"model.preset ({m.preset!r}): fine-tuning takes its model from finetune.init_from")
        shape = sorted(set(m.overrides) & set(SHAPE_FIELDS))
        if shape:
            raise ValueError(f"model.{shape[0]}: the model's shape comes from finetune.init_from; change it with "
                             "finetune.insert_mlp_experts / insert_att_experts / tokenizer, or with "
                             "python -m molm_megatron.modular prune|drop-layers")
        cfg = super().validate()
        if not f.init_from:
            raise ValueError("finetune.init_from is empty: give the starting weights (a pretraining checkpoint "
                             "folder, a Hugging Face folder or a model file)")
        for name in ("insert_mlp_experts", "insert_att_experts"):
            if getattr(f, name) < 0:
                raise ValueError(f"finetune.{name} must be >= 0, got {getattr(f, name)}")
        if f.trainable not in FINETUNE_TRAINABLE:
            raise ValueError(f"finetune.trainable must be one of {', '.join(FINETUNE_TRAINABLE)}; got {f.trainable!r}")
        if f.trainable == "new" and not (f.insert_mlp_experts or f.insert_att_experts or f.tokenizer
                                         or f.train_embedding):
            raise ValueError("finetune.trainable 'new' trains nothing without finetune.insert_mlp_experts, "
                             "finetune.insert_att_experts, finetune.tokenizer or finetune.train_embedding")
        if f.train_embedding and f.trainable != "new":
            raise ValueError("finetune.train_embedding applies to finetune.trainable 'new' (with 'all' every "
                             "tensor trains already)")
        if f.lora_rank < 0:
            raise ValueError(f"finetune.lora_rank must be >= 0 (0: no LoRA), got {f.lora_rank}")
        if f.lora_rank and not f.lora_alpha > 0:
            raise ValueError(f"finetune.lora_alpha must be positive, got {f.lora_alpha}")
        if not 0 <= f.lora_dropout < 1:
            raise ValueError(f"finetune.lora_dropout must be in [0, 1), got {f.lora_dropout}")
        if f.lora_targets and not f.lora_rank:
            raise ValueError(f"finetune.lora_targets ({f.lora_targets}) needs finetune.lora_rank > 0")
        if f.lora_rank and (f.trainable != "all" or f.insert_mlp_experts or f.insert_att_experts or f.tokenizer):
            raise ValueError(f"finetune.lora_rank ({f.lora_rank}) trains adapters of a Hugging Face dense or EMoE "
                             "model; it does not combine with finetune.trainable 'new', inserted experts or "
                             "finetune.tokenizer")
        ep = self.parallel.expert_parallel_size
        if f.insert_mlp_experts % ep:
            raise ValueError(f"finetune.insert_mlp_experts ({f.insert_mlp_experts}) must be a multiple of "
                             f"parallel.expert_parallel_size ({ep}): every expert-parallel rank holds the same "
                             "number of old and of new experts")
        return cfg

    def to_dict(self) -> dict:
        """The resolved tree; `model` holds the overrides (the trained model's full config is saved
        beside it in every checkpoint)."""
        out = dataclasses.asdict(self)
        out["model"] = dict(self.model.overrides)
        return out
