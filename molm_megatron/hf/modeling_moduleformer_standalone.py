"""ModuleFormer (MoLM) for Hugging Face transformers alone: the `modeling_moduleformer.py` of every export.

Exports carry it as `modeling_moduleformer.py` beside a copy of configuration_moduleformer.py and
name both in `config.json`'s `auto_map`, so

    AutoModelForCausalLM.from_pretrained(export, trust_remote_code=True)

works where only torch and transformers are installed. It is the one copy of the model semantics
outside molm_megatron/model (plain PyTorch, no Triton), kept equal to it by tests/hf, which compare
its logits and generations with the training model's. Inference only: no dropout except the
router's (inactive in eval), no auxiliary losses. Semantics (Shen et al., "ModuleFormer:
Modularity Emerges from Mixture-of-Experts", 2023; the published checkpoints' keys):

- pre-LN blocks h += MoA(LN1(h)); h += SMoE(LN2(h)); no positional encoding; untied lm_head;
- router: p = softmax(W_e GELU(W_in x + b)) over all experts, top-k of p, gates = the chosen p
  (not renormalised);
- SMoE: y = sum_e p_e W_out[e] act(W_in[e] x);
- MoA: per chosen expert a query Wq[e] x and an output projection Wo[e]; keys and values shared;
- stick-breaking attention: log A_ij = logsigmoid(l_ij) + sum_{j<m<=i} logsigmoid(-l_im), in fp32.

Legend: B batch, T tokens, M cached tokens, S = M + T keys, D n_embd, E experts, K experts per
token, nh heads, hs head size.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_moduleformer import ModuleFormerConfig

# Published keys the model does not use (precomputed attention buffers): ignored on load.
UNUSED_PUBLISHED_BUFFERS = (r"transformer\.h\.\d+\.attn\.mask", r"transformer\.h\.\d+\.attn\.cum_weight")
ACTIVATIONS = {"gelu_new": lambda x: F.gelu(x, approximate="tanh"), "gelu": F.gelu, "relu": F.relu, "silu": F.silu}


def check_loading_info(cls_name: str, source, info: dict) -> None:
    """Raise ValueError when from_pretrained left weights missing (randomly initialised) or reshaped."""
    missing = sorted(info.get("missing_keys", ()))
    mismatched = sorted(str(m) for m in info.get("mismatched_keys", ()))
    if not (missing or mismatched):
        return
    problems = []
    if missing:
        more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
        problems.append(f"weights missing from the checkpoint: {', '.join(missing[:10])}{more}")
    if mismatched:
        problems.append(f"weights of another shape: {', '.join(mismatched[:10])}")
    unexpected = sorted(info.get("unexpected_keys", ()))
    if unexpected:
        problems.append(f"tensors the model does not have: {', '.join(unexpected[:10])}")
    raise ValueError(f"{source}: {cls_name}: {'; '.join(problems)}; refusing to fill them with random values")


class ParallelExperts(nn.Module):
    """E linear maps in one tensor, weight [E, in, out] (y = x @ W[e])."""

    def __init__(self, num_experts: int, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, in_features, out_features))

    def forward(self, x_NI: torch.Tensor, experts_N: torch.Tensor) -> torch.Tensor:
        y_NO = x_NI.new_empty(x_NI.shape[0], self.weight.shape[2])
        for e in range(self.weight.shape[0]):
            rows = (experts_N == e).nonzero().squeeze(1)
            if rows.numel():
                y_NO[rows] = x_NI[rows] @ self.weight[e]
        return y_NO


class MoE(nn.Module):
    """Router plus a pair of expert projections: `map` (in -> hidden per chosen expert) and `reduce`
    (hidden -> out, gated sum over the K choices); `forward` is the SMoE layer."""

    def __init__(self, config: ModuleFormerConfig, num_experts: int, k: int, hidden: int, activation: str | None):
        super().__init__()
        self.k = k
        self.gate = nn.Module()
        # Indices 0 and 3 are the published keys (2 is the router dropout).
        self.gate.w_gate = nn.Sequential(nn.Linear(config.n_embd, config.gating_size), nn.GELU(),
                                         nn.Dropout(config.moe_pdrop),
                                         nn.Linear(config.gating_size, num_experts, bias=False))
        self.experts = ParallelExperts(num_experts, config.n_embd, hidden)
        self.output_experts = ParallelExperts(num_experts, hidden, config.n_embd)
        self.activation = ACTIVATIONS[activation] if activation else None

    def route(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # fp32 softmax and top-k, as in training: bf16 near-ties would flip expert choices.
        logits_TE = self.gate.w_gate(x_TD)
        probs_TE = (logits_TE.float() if logits_TE.element_size() < 4 else logits_TE).softmax(-1)
        gates_TK, experts_TK = probs_TE.topk(self.k, dim=-1)
        return gates_TK, experts_TK

    def map(self, x_TD: torch.Tensor, experts_TK: torch.Tensor) -> torch.Tensor:
        """[T*K, hidden], token-major."""
        return self.experts(x_TD.repeat_interleave(self.k, dim=0), experts_TK.reshape(-1))

    def reduce(self, h_NH: torch.Tensor, gates_TK: torch.Tensor, experts_TK: torch.Tensor) -> torch.Tensor:
        T, K = gates_TK.shape
        y_NO = self.output_experts(h_NH, experts_TK.reshape(-1))
        return torch.bmm(gates_TK.unsqueeze(1).to(y_NO.dtype), y_NO.view(T, K, -1)).squeeze(1)  # (T, D)

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        gates_TK, experts_TK = self.route(x_TD)
        return self.reduce(self.activation(self.map(x_TD, experts_TK)), gates_TK, experts_TK)


def stickbreaking_attention(q_BHTD, k_BGSD, v_BGSD, key_mask_BS):
    """o [B, H, T, hs]; query head h reads key/value head h // (H / G); queries are the last T keys."""
    B, H, T, hs = q_BHTD.shape
    G, S = k_BGSD.shape[1], k_BGSD.shape[2]
    acc = torch.float64 if q_BHTD.dtype == torch.float64 else torch.float32
    q = q_BHTD.to(acc).view(B, G, H // G, T, hs)
    k, v = k_BGSD.to(acc), v_BGSD.to(acc)
    logits = torch.einsum("bgrtd,bgsd->bgrts", q, k) / math.sqrt(hs)
    pos_q = torch.arange(T, device=q.device) + (S - T)
    visible = torch.arange(S, device=q.device)[None, :] <= pos_q[:, None]  # (T, S) causal
    if key_mask_BS is not None:
        visible = (visible[None] & key_mask_BS.bool()[:, None, :])[:, None, None]  # padding is transparent
    logits = logits.masked_fill(~visible, -math.inf)
    log_not_beta = F.logsigmoid(-logits)
    after_j = log_not_beta.flip(-1).cumsum(-1).flip(-1) - log_not_beta  # sum over keys after j
    att = (F.logsigmoid(logits) + after_j).exp()
    return torch.einsum("bgrts,bgsd->bgrtd", att, v).reshape(B, H, T, hs).to(q_BHTD.dtype)


class MoA(nn.Module):
    """Mixture of stick-breaking attention heads; keys/values shared by the experts."""

    def __init__(self, config: ModuleFormerConfig, num_experts: int):
        super().__init__()
        self.q_proj = MoE(config, num_experts, config.k_att, config.att_hidden, activation=None)
        if config.n_head == 1 and config.att_hidden == config.n_embd:
            self.k_proj, self.v_proj = nn.Identity(), nn.Identity()  # the published MoLM
        else:
            self.k_proj = nn.Linear(config.n_embd, config.att_hidden)
            self.v_proj = nn.Linear(config.n_embd, config.att_hidden)
        self.n_head = config.n_head

    def forward(self, x_BTD, key_mask_BS, memory):
        B, T, D = x_BTD.shape
        nh, K = self.n_head, self.q_proj.k
        x_TD = x_BTD.reshape(B * T, D)
        gates_TK, experts_TK = self.q_proj.route(x_TD)
        q_N = self.q_proj.map(x_TD, experts_TK)  # (B*T*K, A)
        hs = q_N.shape[-1] // nh
        k_BTHD = self.k_proj(x_BTD).view(B, T, nh, hs)
        v_BTHD = self.v_proj(x_BTD).view(B, T, nh, hs)
        new_kv = (k_BTHD, v_BTHD)
        if memory is not None:
            k_BTHD = torch.cat([memory[0], k_BTHD], dim=1)
            v_BTHD = torch.cat([memory[1], v_BTHD], dim=1)
        # Query head h*K + r (expert choice r) reads key/value head h.
        q = q_N.view(B, T, K, nh, hs).permute(0, 3, 2, 1, 4).reshape(B, nh * K, T, hs)
        o = stickbreaking_attention(q, k_BTHD.transpose(1, 2), v_BTHD.transpose(1, 2), key_mask_BS)
        o_N = o.view(B, nh, K, T, hs).permute(0, 3, 2, 1, 4).reshape(B * T * K, nh * hs)
        return self.q_proj.reduce(o_N, gates_TK, experts_TK).view(B, T, D), new_kv


class Block(nn.Module):
    def __init__(self, config: ModuleFormerConfig, layer: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = MoA(config, config.experts("att", layer))
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlpf = MoE(config, config.experts("mlp", layer), config.k_mlp, config.ffd_hidden,
                        config.activation_function)

    def forward(self, h_BTD, key_mask_BS, memory):
        B, T, D = h_BTD.shape
        a, new_kv = self.attn(self.ln_1(h_BTD), key_mask_BS, memory)
        h_BTD = h_BTD + a
        return h_BTD + self.mlpf(self.ln_2(h_BTD).reshape(B * T, D)).view(B, T, D), new_kv


class ModuleFormerModel(nn.Module):
    def __init__(self, config: ModuleFormerConfig):
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.h = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)

    def forward(self, input_ids, attention_mask, memory):
        B, T = input_ids.shape
        M = 0 if memory is None else memory[0][0].shape[1]
        key_mask_BS = None
        if attention_mask is not None:
            if attention_mask.shape[1] == T and M:
                attention_mask = torch.cat([attention_mask.new_ones(B, M), attention_mask], dim=1)
            key_mask_BS = attention_mask.bool()
        h = self.wte(input_ids)
        new_kv = []
        for i, block in enumerate(self.h):
            h, kv = block(h, key_mask_BS, None if memory is None else memory[i])
            new_kv.append(kv)
        return self.ln_f(h), new_kv


class ModuleFormerPreTrainedModel(PreTrainedModel):
    config_class = ModuleFormerConfig
    base_model_prefix = "transformer"
    _no_split_modules = ["Block"]
    _keys_to_ignore_on_load_unexpected = list(UNUSED_PUBLISHED_BUFFERS)

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, ParallelExperts):
            bound = 1.0 / module.weight.shape[1]
            nn.init.uniform_(module.weight, -bound, bound)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """transformers' from_pretrained, but a weight missing from the checkpoint is an error."""
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(pretrained_model_name_or_path, *args, output_loading_info=True,
                                              **kwargs)
        check_loading_info(cls.__name__, pretrained_model_name_or_path, info)
        return (model, info) if want_info else model


class ModuleFormerForCausalLM(ModuleFormerPreTrainedModel, GenerationMixin):
    """The causal LM with the HF cache. molm_megatron's own class derives from this one and puts its
    training layers in `build_layers` / `run_layers`; everything else is shared."""

    def __init__(self, config: ModuleFormerConfig):
        super().__init__(config)
        self.transformer, self.lm_head = self.build_layers(config)
        self.post_init()

    def build_layers(self, config: ModuleFormerConfig) -> tuple[nn.Module, nn.Module]:
        """The `transformer` (embedding, blocks, final norm) and the untied `lm_head`."""
        if config.attention != "stickbreaking":
            raise ValueError(f"config.json: attention {config.attention!r}: this code implements the published "
                             "stick-breaking attention only; load the model with molm_megatron installed")
        return ModuleFormerModel(config), nn.Linear(config.n_embd, config.vocab_size, bias=False)

    def run_layers(self, input_ids, attention_mask, memory):
        """Hidden states [B, T, D] and this call's (keys, values) per layer, each [B, T, nh, hs]."""
        return self.transformer(input_ids, attention_mask, memory)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer.wte

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.transformer.wte = value

    def forward(self, input_ids, attention_mask=None, past_key_values: Cache | None = None, labels=None,
                use_cache=None, return_dict=None, **kwargs) -> CausalLMOutputWithPast:
        """Causal LM; `labels` are the inputs (shifted inside, as HF models do)."""
        use_cache = self.config.use_cache if use_cache is None else use_cache
        memory = None
        if past_key_values is not None and past_key_values.get_seq_length() > 0:
            # DynamicCache layers hold [B, nh, S, hs]; the blocks take [B, S, nh, hs].
            memory = [(layer.keys.transpose(1, 2), layer.values.transpose(1, 2)) for layer in past_key_values.layers]
        h, new_kv = self.run_layers(input_ids, attention_mask, memory)
        logits = self.lm_head(h)
        if use_cache:
            past_key_values = DynamicCache(config=self.config) if past_key_values is None else past_key_values
            for i, (k, v) in enumerate(new_kv):
                past_key_values.update(k.transpose(1, 2), v.transpose(1, 2), i)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                   labels[:, 1:].reshape(-1), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=past_key_values if use_cache else None)
