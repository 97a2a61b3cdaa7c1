"""The MoLM (ModuleFormer) model in plain single-device PyTorch, top to bottom in forward order.

References:
- Shen et al., "ModuleFormer: Modularity Emerges from Mixture-of-Experts", 2023 (the architecture,
  the MI and load-concentration losses, the published checkpoints whose keys we keep).
- Tan et al., "Scaling Stick-Breaking Attention", 2024 (the attention, see kernels/).
- Zhang et al., "Mixture of Attention Heads", 2022 (MoA: routed query/output projections with
  shared keys and values).
- Dai et al., "Transformer-XL", 2019 (the previous segment's keys/values as memory).
- Su et al., "RoFormer: Enhanced Transformer with Rotary Position Embedding", 2021 (the softmax
  baseline's positions, `attention: softmax_rope`; ModuleFormer's Table 4 compares against it).

Parallelism is applied from outside (molm_megatron/parallel): nothing here communicates. Where
tensor or expert parallelism may shard a weight, sizes are read from the tensor, not the config.

Legend: B batch, T tokens of this segment, M memory tokens, S = M + T keys, D = n_embd,
A = att_hidden, F = ffd_hidden, E experts, K experts per token, N = B*T*K assignments,
nh = n_head, hs = head size, V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

import molm_kernels
from molm_megatron.config import ModelConfig, TrainingSpec
from molm_megatron.model.losses import AUX_LOSS_NAMES, loss_weights, router_aux_losses, weighted_aux_loss

# (keys, values) of one layer, each [B, S, nh, hs].
LayerMemory = tuple[torch.Tensor, torch.Tensor]

def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """Upcast bf16/fp16 to fp32; leave fp32/fp64 as they are (fp64 is the tests' oracle precision)."""
    return x.float() if x.element_size() < 4 else x


class ParallelExperts(nn.Module):
    """E independent linear maps in one tensor, weight [E, in, out] as published (y = x @ W[e]).

    With inserted experts (continual learning) the last `num_new_experts` maps live in a separate
    parameter `new_weight` [E_new, in, out], so they can train while `weight` [E - E_new, in, out]
    stays frozen (a frozen tensor then gets no optimizer state); `full_weight()` is what the kernels
    compute with.
    """

    def __init__(self, num_experts: int, in_features: int, out_features: int, num_new_experts: int = 0):
        super().__init__()
        if not 0 <= num_new_experts < num_experts:
            raise ValueError(f"num_new_experts ({num_new_experts}) must be in [0, num_experts ({num_experts}))")
        self.weight = nn.Parameter(torch.empty(num_experts - num_new_experts, in_features, out_features))
        if num_new_experts:
            self.new_weight = nn.Parameter(torch.empty(num_new_experts, in_features, out_features))
        else:
            self.register_parameter("new_weight", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Published init: uniform(-1/in, 1/in) (not Kaiming's 1/sqrt(in)).
        bound = 1.0 / self.weight.shape[1]
        for w in (self.weight, self.new_weight):
            if w is not None:
                nn.init.uniform_(w, -bound, bound)

    def full_weight(self) -> torch.Tensor:
        """[E, in, out]: the old experts, then the inserted ones (no copy without inserted experts)."""
        return self.weight if self.new_weight is None else torch.cat([self.weight, self.new_weight])


@dataclass
class RouterOutput:
    gates_TK: torch.Tensor  # selected probabilities, NOT renormalised (published semantics); or ones
    experts_TK: torch.Tensor
    probs_TE: torch.Tensor  # softmax over all experts, at least fp32
    logits_TE: torch.Tensor


# A router scorer: x [T, in_features] -> logits [T, E] (EMoE scores each expert by its key centroid).
Scorer = Callable[[torch.Tensor], torch.Tensor]


class Router(nn.Module):
    """logits = scorer(x); p = softmax(logits); top-k of p; gates = the chosen p (or 1).

    One implementation for attention and MLP experts. The default scorer is the published MLP
    `W_e GELU(W_in x + b)`, held as `w_gate` whose indices 0 / 3 match the published keys (index 2
    is the router dropout). With inserted experts, `w_gate.3.weight` holds the old rows of W_e and
    `new_weight` [E_new, gating_size] the rows of the `num_new_experts` last experts, a parameter of
    its own so that it alone can train (and be regularised). `scorer` replaces the MLP (no
    `w_gate` then); `unit_gates` gives every chosen expert the gate 1 (EMoE's avg-k gate: no
    gradient reaches the scorer through the gates).
    """

    def __init__(
        self,
        in_features: int,
        num_experts: int,
        k: int,
        gating_size: int = 256,
        *,
        num_new_experts: int = 0,
        dropout: float = 0.0,
        sample_topk: int = 0,
        scorer: Scorer | None = None,
        unit_gates: bool = False,
    ):
        super().__init__()
        if not 0 < k <= num_experts:
            raise ValueError(f"k ({k}) must be in [1, num_experts ({num_experts})]")
        if not 0 <= num_new_experts < num_experts:
            raise ValueError(f"num_new_experts ({num_new_experts}) must be in [0, num_experts ({num_experts}))")
        if scorer is not None and num_new_experts:
            raise ValueError("a custom scorer scores all experts itself: num_new_experts must be 0")
        self.num_experts, self.num_new_experts, self.k = num_experts, num_new_experts, k
        self.sample_topk, self.unit_gates = sample_topk, unit_gates
        self.scorer = scorer
        if scorer is None:
            self.w_gate = nn.Sequential(
                nn.Linear(in_features, gating_size),
                nn.GELU(),  # exact erf GELU, as published
                nn.Dropout(dropout),
                nn.Linear(gating_size, num_experts - num_new_experts, bias=False),
            )
        if num_new_experts:
            self.new_weight = nn.Parameter(torch.empty(num_new_experts, gating_size))
        else:
            self.register_parameter("new_weight", None)

    def forward(self, x_TD: torch.Tensor) -> RouterOutput:
        # w_gate[3] is called as a module, not read as a weight: ZeRO-3 gathers a partitioned
        # parameter for its module's forward and backward only.
        if self.scorer is not None:
            logits_TE = self.scorer(x_TD)
        elif self.new_weight is None:
            logits_TE = self.w_gate(x_TD)
        else:
            h_TG = self.w_gate[:3](x_TD)
            logits_TE = torch.cat([self.w_gate[3](h_TG), F.linear(h_TG, self.new_weight)], dim=-1)  # old, then new
        # Softmax and top-k in fp32: near-ties in bf16 would flip expert choices between runs.
        logits_TE = at_least_fp32(logits_TE)
        probs_TE = logits_TE.softmax(dim=-1)
        if self.training and self.sample_topk > 0:
            experts_TK = self._sample_experts(probs_TE)
            gates_TK = probs_TE.gather(1, experts_TK)
        else:
            gates_TK, experts_TK = probs_TE.topk(self.k, dim=-1)
        if self.unit_gates:
            gates_TK = torch.ones_like(gates_TK)
        return RouterOutput(gates_TK, experts_TK, probs_TE, logits_TE)

    def _sample_experts(self, probs_TE: torch.Tensor) -> torch.Tensor:
        """Keep the best k - s experts, sample s more from the rest by their probabilities."""
        keep = self.k - self.sample_topk
        top_TK = probs_TE.topk(keep, dim=-1).indices
        rest = probs_TE.detach() + 1e-6  # published: every expert keeps a chance
        rest = rest.scatter(1, top_TK, 0.0)
        sampled = torch.multinomial(rest, self.sample_topk)
        return torch.cat([top_TK, sampled], dim=-1)


@dataclass
class Routed:
    """A routing decision plus the expert-sorted index the scattered matmuls use."""

    router: RouterOutput
    index: molm_kernels.Routing
    valid_T: torch.Tensor | None  # False for padding tokens, left out of losses and statistics


class MoE(nn.Module):
    """A routed pair of expert projections: `map` (in -> hidden, per chosen expert) and `reduce`
    (hidden -> out, gated sum over the chosen experts). Key-compatible with the published `MoE`.

    As the SMoE feed-forward layer (`forward`): y = sum_e p_e W_out[e] act(W_in[e] x).
    As MoA's query/output projections, MoA calls `route`, `map`, then attention, then `reduce`.
    The router (`gate`) sets the number of experts, of inserted experts and k.
    """

    def __init__(self, gate: Router, in_features: int, hidden: int, out_features: int, activation: str | None):
        super().__init__()
        self.gate = gate
        self.k = gate.k
        self.experts = ParallelExperts(gate.num_experts, in_features, hidden, gate.num_new_experts)
        self.output_experts = ParallelExperts(gate.num_experts, hidden, out_features, gate.num_new_experts)
        self.activation = activation

    def route(self, x_TD: torch.Tensor, valid_T: torch.Tensor | None) -> Routed:
        r = self.gate(x_TD)
        return Routed(r, molm_kernels.route(r.experts_TK, r.probs_TE.shape[1]), valid_T)

    def map(self, x_TD: torch.Tensor, routed: Routed, grouped_out: bool = False) -> torch.Tensor:
        """Per-assignment hidden states: [N, hidden], flat (token-major) order unless grouped_out."""
        # K from the routing, not self.k: the expert-parallel dispatcher calls the experts on
        # received rows that carry one assignment each (K = 1).
        k = routed.router.experts_TK.shape[1]
        return molm_kernels.parallel_linear(x_TD, self.experts.full_weight(), k, routed.index, grouped_out=grouped_out)

    def reduce(self, h_N: torch.Tensor, routed: Routed, grouped_in: bool = False) -> torch.Tensor:
        """Gated sum over the K choices of each token: [T, out_features]."""
        gates_TK = routed.router.gates_TK.to(h_N.dtype)
        return molm_kernels.parallel_linear(h_N, self.output_experts.full_weight(), 1, routed.index,
                                       grouped_in=grouped_in, gates_TK=gates_TK)

    def expert_mlp(self, x_TD: torch.Tensor, routed: Routed) -> torch.Tensor:
        """The experts' computation, as if every expert were local (expert parallelism wraps it):
        reduce(act(map(x))), with the activation fused into the matmuls on GPU."""
        k = routed.router.experts_TK.shape[1]  # from the routing, as in `map`
        gates_TK = routed.router.gates_TK.to(x_TD.dtype)
        return molm_kernels.scattered_mlp(x_TD, self.experts.full_weight(), self.output_experts.full_weight(), k,
                                     routed.index, gates_TK, self.activation)

    def forward(self, x_TD: torch.Tensor, valid_T: torch.Tensor | None) -> tuple[torch.Tensor, Routed]:
        routed = self.route(x_TD, valid_T)
        return self.expert_mlp(x_TD, routed), routed


def config_router(cfg: ModelConfig, num_experts: int, num_new_experts: int, k: int) -> Router:
    """The published MLP router of a MoLM layer, sized from the config."""
    return Router(cfg.n_embd, num_experts, k, cfg.gating_size, num_new_experts=num_new_experts,
                  dropout=cfg.moe_pdrop, sample_topk=cfg.sample_topk)


def rotary_tables(length: int, hs: int, theta: float, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [length, hs] of the angles position * theta^(-2j/hs) for positions 0..length-1,
    duplicated over the two halves of a head (GPT-NeoX's half-split layout), in at least fp32
    (bf16 angles of positions in the thousands are off by whole radians)."""
    dtype = torch.float32 if like.element_size() < 4 else like.dtype
    inv_freq = theta ** (-torch.arange(0, hs, 2, device=like.device, dtype=dtype) / hs)
    angles_LJ = torch.arange(length, device=like.device).to(dtype)[:, None] * inv_freq[None, :]  # (L, hs/2)
    return angles_LJ.cos().repeat(1, 2), angles_LJ.sin().repeat(1, 2)


def rotary_embedding(x_BHLD: torch.Tensor, cos_LD: torch.Tensor, sin_LD: torch.Tensor) -> torch.Tensor:
    """Rotate the pairs of dimensions (j, j + hs/2) of each vector by the angles of `rotary_tables`
    (RoFormer's rotation), in the tables' precision; returns x's dtype."""
    hs = x_BHLD.shape[-1]
    x = x_BHLD.to(cos_LD.dtype)
    x1, x2 = x[..., : hs // 2], x[..., hs // 2:]
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x * cos_LD + rotated * sin_LD).to(x_BHLD.dtype)


def softmax_rope_attention(q_BHTD: torch.Tensor, k_BGSD: torch.Tensor, v_BGSD: torch.Tensor,
                           key_mask_BS: torch.Tensor | None, theta: float, dropout: float = 0.0) -> torch.Tensor:
    """Causal softmax attention with rotary positions: the baseline of `attention: softmax_rope`.

    Same layout as molm_kernels.stickbreaking_attention: the T queries are the last T of the S key
    positions (memory first), query head h reads key/value head h // (H / G). Keys are rotated here
    at positions 0..S-1 and queries at S-T..S-1, so the memory holds unrotated keys and only
    distances matter. Masked keys get no weight.
    """
    T, S = q_BHTD.shape[2], k_BGSD.shape[2]
    cos_SD, sin_SD = rotary_tables(S, q_BHTD.shape[-1], theta, q_BHTD)  # queries take the last T rows
    q_BHTD = rotary_embedding(q_BHTD, cos_SD[S - T:], sin_SD[S - T:])
    k_BGSD = rotary_embedding(k_BGSD, cos_SD, sin_SD)
    gqa = q_BHTD.shape[1] != k_BGSD.shape[1]
    if key_mask_BS is None and T == S:
        return F.scaled_dot_product_attention(q_BHTD, k_BGSD, v_BGSD, dropout_p=dropout, is_causal=True,
                                              enable_gqa=gqa)
    causal_TS = torch.ones(T, S, dtype=torch.bool, device=q_BHTD.device).tril(S - T)
    allowed = causal_TS[None, None]
    if key_mask_BS is not None:
        # A query whose visible keys are all masked (a padding query) keeps its own key: its row stays
        # finite (a NaN would reach real tokens through its value); real queries never see masked keys.
        pos_S = torch.arange(S, device=q_BHTD.device)
        self_TS = pos_S[None, :] == pos_S[S - T:, None]
        allowed = allowed & (key_mask_BS[:, None, None, :].bool() | self_TS)
    return F.scaled_dot_product_attention(q_BHTD, k_BGSD, v_BGSD, attn_mask=allowed, dropout_p=dropout,
                                          enable_gqa=gqa)


class MoA(nn.Module):
    """Mixture of stick-breaking attention heads with shared keys and values.

    Each chosen expert e_r gives a query q_r = Wq[e_r] x (nh heads); head h of every chosen expert
    attends over the shared key/value head h; y = sum_r g_r Wo[e_r] o_r. With `attention:
    softmax_rope` the heads attend by causal softmax with rotary positions instead (the baseline).
    """

    def __init__(self, cfg: ModelConfig, num_experts: int):
        super().__init__()
        gate = config_router(cfg, num_experts, cfg.n_new_att_experts, cfg.k_att)
        self.q_proj = MoE(gate, cfg.n_embd, cfg.att_hidden, cfg.n_embd, activation=None)
        self.kv_is_identity = cfg.kv_is_identity
        if cfg.kv_is_identity:
            # Published MoLM (one 1024-wide head): keys and values are the normed hidden states.
            self.k_proj, self.v_proj = nn.Identity(), nn.Identity()
        else:
            self.k_proj = nn.Linear(cfg.n_embd, cfg.att_hidden)
            self.v_proj = nn.Linear(cfg.n_embd, cfg.att_hidden)
        self.n_head = cfg.n_head
        self.attn_pdrop = cfg.attn_pdrop
        self.attention, self.rope_theta = cfg.attention, cfg.rope_theta

    def forward(
        self,
        x_BTD: torch.Tensor,
        valid_T: torch.Tensor | None,
        key_mask_BS: torch.Tensor | None,
        memory: LayerMemory | None,
        memory_length: int,
    ) -> tuple[torch.Tensor, Routed, LayerMemory]:
        B, T, D = x_BTD.shape
        nh, K = self.n_head, self.q_proj.k
        x_TD = x_BTD.reshape(B * T, D)

        # First half: route, then the per-expert query projection.
        routed = self.q_proj.route(x_TD, valid_T)
        q_N = self.q_proj.map(x_TD, routed)  # (B*T*K, A), token-major
        hs = q_N.shape[-1] // nh
        k_BTHD = self.k_proj(x_BTD).view(B, T, nh, hs)
        v_BTHD = self.v_proj(x_BTD).view(B, T, nh, hs)
        if memory is not None:
            k_BTHD = torch.cat([memory[0], k_BTHD], dim=1)  # (B, S, nh, hs)
            # Identity keys and values are one tensor, and so is their memory (new_memory below):
            # one concatenation where the memory holds them once.
            shared = self.kv_is_identity and memory[0] is memory[1]
            v_BTHD = k_BTHD if shared else torch.cat([memory[1], v_BTHD], dim=1)
        start = max(0, k_BTHD.shape[1] - memory_length)
        k_memory = k_BTHD[:, start:].detach()
        new_memory = (k_memory, k_memory if self.kv_is_identity else v_BTHD[:, start:].detach())

        # Query heads ordered (h, r) so that query head h*K + r reads kv head h: grouped-query
        # layout, the K chosen experts share one K/V without copies.
        q = q_N.view(B, T, K, nh, hs).permute(0, 3, 2, 1, 4).reshape(B, nh * K, T, hs)
        k_BHSD, v_BHSD = k_BTHD.transpose(1, 2), v_BTHD.transpose(1, 2)
        if self.attention == "softmax_rope":
            o = softmax_rope_attention(q, k_BHSD, v_BHSD, key_mask_BS, self.rope_theta,
                                       self.attn_pdrop if self.training else 0.0)
        else:
            o = molm_kernels.stickbreaking_attention(q, k_BHSD, v_BHSD, key_mask_BS, self.attn_pdrop,
                                                     self.training)  # (B, nh*K, T, hs)
        o_N = o.view(B, nh, K, T, hs).permute(0, 3, 2, 1, 4).reshape(B * T * K, nh * hs)

        # Second half: per-expert output projection and gated merge.
        y_TD = self.q_proj.reduce(o_N, routed)
        return y_TD.view(B, T, D), routed, new_memory


class Block(nn.Module):
    """Pre-LN block: h += MoA(LN1(h)); h += SMoE(LN2(h)). Layer `layer`'s expert counts come from
    the config (a pruned model has its own per layer)."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.attn = MoA(cfg, cfg.att_experts(layer))
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        gate = config_router(cfg, cfg.mlp_experts(layer), cfg.n_new_mlp_experts, cfg.k_mlp)
        self.mlpf = MoE(gate, cfg.n_embd, cfg.ffd_hidden, cfg.n_embd, activation=cfg.activation_function)
        self.resid_dropout = nn.Dropout(cfg.resid_pdrop)

    def forward(self, h_BTD, valid_T, key_mask_BS, memory, memory_length):
        B, T, D = h_BTD.shape
        a, routed_att, new_memory = self.attn(self.ln_1(h_BTD), valid_T, key_mask_BS, memory, memory_length)
        h_BTD = h_BTD + self.resid_dropout(a)
        m_TD, routed_mlp = self.mlpf(self.ln_2(h_BTD).reshape(B * T, D), valid_T)
        h_BTD = h_BTD + self.resid_dropout(m_TD.view(B, T, D))
        return h_BTD, (routed_att, routed_mlp), new_memory


@dataclass
class MoLMOutput:
    logits: torch.Tensor  # (B, T, V)
    loss: torch.Tensor | None = None  # lm_loss + aux_loss
    lm_loss: torch.Tensor | None = None  # mean cross entropy over labels != -100
    lm_loss_sum: torch.Tensor | None = None
    num_label_tokens: torch.Tensor | None = None
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)  # summed over routers and layers
    aux_loss: torch.Tensor | None = None  # the weighted sum of aux_losses (losses.weighted_aux_loss)
    memory: list[LayerMemory] | None = None
    expert_stats: dict[str, torch.Tensor] | None = None  # 'layer{N}.attn' -> assignment counts [E]


class MoLMTransformer(nn.Module):
    """Embedding, blocks and final norm; no positional encoding besides the attention's own
    (stick-breaking attention is order-aware by itself; the softmax baseline rotates its queries and
    keys). Its keys are the published `transformer.*`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.embd_pdrop)
        self.h = nn.ModuleList(Block(cfg, layer) for layer in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)

    def forward(self, input_ids, attention_mask, memory, memory_length):
        """Returns hidden states (B, T, D), per-layer (attn, mlp) routing, and the new memory."""
        B, T = input_ids.shape
        M = 0 if memory is None else memory[0][0].shape[1]
        key_mask_BS = valid_T = None
        if attention_mask is not None:
            if attention_mask.shape[1] == T and M:
                attention_mask = torch.cat([attention_mask.new_ones(B, M), attention_mask], dim=1)
            if attention_mask.shape[1] != M + T:
                raise ValueError(f"attention_mask has {attention_mask.shape[1]} columns; expected {T} "
                                 f"(segment) or {M + T} (memory + segment)")
            key_mask_BS = attention_mask.bool()
            valid_T = key_mask_BS[:, M:].reshape(B * T)
        h = self.drop(self.wte(input_ids))
        routing, new_memory = [], []
        for i, block in enumerate(self.h):
            h, routed, mem = block(h, valid_T, key_mask_BS, None if memory is None else memory[i], memory_length)
            routing.append(routed)
            new_memory.append(mem)
        return self.ln_f(h), routing, new_memory


def init_weights(module: nn.Module, std: float) -> None:
    """Published initialisation: linear and embedding weights normal(0, std), biases 0, LayerNorm
    (1, 0), expert weights uniform(-1/in, 1/in)."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, mean=0.0, std=std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, mean=0.0, std=std)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, ParallelExperts):
        module.reset_parameters()
    elif isinstance(module, Router) and module.new_weight is not None:
        nn.init.normal_(module.new_weight, mean=0.0, std=std)  # as the old rows of W_e (an nn.Linear weight)


class LMHead(nn.Linear):
    """The output layer: nn.Linear without bias (weight [V, D], key `lm_head.weight`). On GPU, for
    more than a few rows, the logits are computed into a vocabulary padded to a multiple of 64
    and returned as a view of the first V columns (same values): V = 50295 otherwise sends cuBLAS
    to a slow kernel (see molm_kernels.linear_padded_out). Decoding a few rows skips the padding, whose
    weight copy would cost more than the matmul it speeds up."""

    def __init__(self, n_embd: int, vocab_size: int):
        super().__init__(n_embd, vocab_size, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if h.is_cuda and h.numel() >= 64 * h.shape[-1]:
            return molm_kernels.linear_padded_out(h, self.weight)
        return super().forward(h)


class MoLM(nn.Module):
    """The ModuleFormer language model: what users ask of a model lives here (forward with losses,
    parameter counts, FLOPs per token, init, generate).

    `tp_plan` and `ep_plan` state how tensor and expert parallelism split this model, as data read
    by the generic apply functions of molm_megatron/parallel (module path pattern, fnmatch over the
    whole path -> style; the styles are defined there). Another model class (a converted dense
    model) supplies its own tables.
    """

    # Every parameter must fall under an entry (its module or the nearest ancestor that matches),
    # so a new parameter cannot be missed silently.
    tp_plan: ClassVar[dict[str, str]] = {
        "transformer.wte": "vocab",
        "transformer.h.*.ln_1": "replicate",
        "transformer.h.*.attn": "replicate",  # attention experts whole: attention sits between their projections
        "transformer.h.*.ln_2": "replicate",
        "transformer.h.*.mlpf": "expert_regions",
        "transformer.h.*.mlpf.gate": "replicate",  # identical routing on every TP rank
        "transformer.h.*.mlpf.experts": "expert_column",
        "transformer.h.*.mlpf.output_experts": "expert_row",
        "transformer.ln_f": "replicate",
        "lm_head": "vocab",
    }
    # Only the SMoE layers; MoA's experts stay whole on every rank.
    ep_plan: ClassVar[dict[str, str]] = {
        "transformer.h.*.mlpf": "dispatch",
    }

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.config = cfg
        self.transformer = MoLMTransformer(cfg)
        self.lm_head = LMHead(cfg.n_embd, cfg.vocab_size)  # untied, as published
        self.apply(lambda module: init_weights(module, cfg.initializer_range))

    def num_params(self, active: bool = False, embedding: bool = True) -> int:
        """Counted from the config (see ModelConfig.num_params), so it is the same on every rank."""
        return self.config.num_params(active=active, embedding=embedding)

    def training_spec(self) -> TrainingSpec:
        """What the trainer needs beyond the forward pass (block size, vocabulary, memory, FLOPs, ...)."""
        return self.config.training_spec()

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        memory: list[LayerMemory] | None = None,
        collect_expert_stats: bool = False,
        memory_length: int | None = None,
        all_aux_losses: bool = True,
    ) -> MoLMOutput:
        """input_ids [B, T]; labels [B, T] already shifted (the next tokens), -100 ignored;
        attention_mask [B, T] or [B, M + T] (1 = real, 0 = padding/reset memory: transparent);
        memory: the previous segment's `out.memory`. Keeps `memory_length` (default
        history_length) keys per layer in `out.memory`. `all_aux_losses=False` computes only the
        aux losses with a non-zero weight (`out.aux_losses` then holds just those)."""
        cfg = self.config
        memory_length = cfg.history_length if memory_length is None else memory_length
        h, routing, new_memory = self.transformer(input_ids, attention_mask, memory, memory_length)
        logits = self.lm_head(h)
        out = MoLMOutput(logits=logits, memory=new_memory)

        names = AUX_LOSS_NAMES if all_aux_losses else tuple(loss_weights(cfg))
        out.aux_losses = {name: at_least_fp32(logits.new_zeros(())) for name in names}
        for block, routed_pair in zip(self.transformer.h, routing):
            for moe, routed in zip((block.attn.q_proj, block.mlpf), routed_pair):
                r = routed.router
                losses = router_aux_losses(r.probs_TE, r.logits_TE, r.experts_TK, routed.valid_T, moe.gate.new_weight,
                                          names)
                for name, value in losses.items():
                    out.aux_losses[name] = out.aux_losses[name] + value
        out.aux_loss = weighted_aux_loss(out.aux_losses, cfg, at_least_fp32(logits.new_zeros(())))
        if collect_expert_stats:
            out.expert_stats = {}
            for i, routed_pair in enumerate(routing):
                for kind, routed in zip(("attn", "mlpf"), routed_pair):
                    r, valid = routed.router, routed.valid_T
                    # A scatter-add, not bincount over the valid rows: no size is read back to the
                    # host, so a CUDA graph can capture it.
                    ones_TK = torch.ones_like(r.experts_TK)
                    if valid is not None:
                        ones_TK = ones_TK * valid[:, None]
                    counts_E = r.experts_TK.new_zeros(r.probs_TE.shape[1])
                    out.expert_stats[f"layer{i}.{kind}"] = counts_E.scatter_add_(0, r.experts_TK.reshape(-1),
                                                                                 ones_TK.reshape(-1))

        if labels is not None:
            out.lm_loss_sum = self.cross_entropy_sum(logits, labels)
            out.num_label_tokens = (labels != -100).sum()
            out.lm_loss = out.lm_loss_sum / out.num_label_tokens.clamp(min=1)
            out.loss = out.lm_loss + out.aux_loss
        return out

    def cross_entropy_sum(self, logits_BTV: torch.Tensor, labels_BT: torch.Tensor) -> torch.Tensor:
        """Sum of the cross entropy over labels != -100. Tensor parallelism replaces it on the
        instance with a vocab-parallel one (its logits are then one vocabulary shard)."""
        # fp32: bf16 logits lose the small probabilities of a 50k vocabulary.
        return F.cross_entropy(at_least_fp32(logits_BTV).view(-1, logits_BTV.shape[-1]), labels_BT.reshape(-1),
                               ignore_index=-100, reduction="sum")

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        attention_mask: torch.Tensor | None = None,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        eos_token_id: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Greedy or sampled continuation with a KV cache (the model's memory); returns [B, T + new].

        The cache keeps every token, as the published model's does, so decoding equals the full
        forward at any length (training memory, by contrast, keeps `history_length` tokens).
        """
        B = input_ids.shape[0]
        keep = input_ids.shape[1] + max_new_tokens
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        out = self(input_ids, attention_mask=mask, memory_length=keep)
        tokens, done = input_ids, torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        for _ in range(max_new_tokens):
            logits = out.logits[:, -1].float()
            if do_sample:
                logits = logits / temperature
                if top_k is not None:
                    kth = logits.topk(min(top_k, logits.shape[-1])).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, -math.inf)
                nxt = torch.multinomial(logits.softmax(-1), 1, generator=generator)
            else:
                nxt = logits.argmax(-1, keepdim=True)
            if eos_token_id is not None:
                nxt = nxt.masked_fill(done[:, None], eos_token_id)
                done |= nxt[:, 0] == eos_token_id
            tokens = torch.cat([tokens, nxt], dim=1)
            if done.all():
                break
            mask = torch.cat([mask, mask.new_ones(B, 1)], dim=1)
            out = self(nxt, attention_mask=mask, memory=out.memory, memory_length=keep)
        return tokens
