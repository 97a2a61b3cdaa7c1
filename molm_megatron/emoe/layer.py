"""The EMoE feed-forward layer: a dense model's FFN split into experts, gated by averaged keys.

Qiu et al., "Unlocking Emergent Modularity in Large Language Models" (NAACL 2024). The FFN's
d_ff neurons were permuted (molm_megatron.emoe.convert) so that expert e owns the contiguous
slice [e * F, (e + 1) * F) of them, F = d_ff / E. The gate adds no parameter ("avg-k"):
score_e(x) = x . mean_{i in e} k_i (+ mean_{i in e} b_i), the mean of the expert's key vectors
(rows of the first projection; Llama: gate_proj) read from the CURRENT weights, so the gate
follows fine-tuning. The top-k experts are used, each with weight 1; no auxiliary loss and no
gradient through the choice. The choice is MoLM's `Router` with this scorer and unit gates (the
softmax it applies is monotone, so its top-k are the scores' top-k). With k = E the layer is the
dense FFN.

Two computations of one layer, equal in value and gradient:
- "masked": the dense FFN with the neurons of unchosen experts zeroed after the activation (the
  reference, O(d_ff) per token);
- "sparse": only the chosen experts, through the scattered-expert kernels (`molm_kernels.scattered_mlp`:
  Triton on CUDA, the PyTorch reference elsewhere), reading the dense weights as per-expert
  views (no copies) when F is a multiple of 16, else as zero-padded copies (`kernel_weights`).

The layer keeps the dense module's children under their own names (`c_fc`/`c_proj`,
`dense_h_to_4h`/`dense_4h_to_h`, `gate_proj`/`up_proj`/`down_proj`), so its state dict is the dense
one, key for key.

Legend: T tokens, D model width, E experts, F neurons per expert, K = top_k.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

import molm_kernels
from molm_megatron.model.model import Router

COMPUTATIONS = ("sparse", "masked")

# Expert widths F the kernels read in place: Triton vectorises a load only when its strides and
# offsets are multiples of 16 elements, and F is a stride of the per-expert views and of the
# [T*K, F] intermediates (F = 172 for Llama-7B at 64 experts, 100 for GPT-2-XL).
KERNEL_WIDTH_MULTIPLE = 16

# Hugging Face activation names -> the kernels' names for the same function.
ACTIVATION_ALIASES = {"gelu_new": "gelu_new", "gelu_pytorch_tanh": "gelu_new", "gelu": "gelu", "relu": "relu",
                      "silu": "silu", "swish": "silu"}


@dataclass(frozen=True)
class FFNSpec:
    """Where a dense architecture keeps its FFN and how the weights are laid out."""

    blocks: str  # attribute path of the list of blocks
    first: str  # the first projection: its neurons' input weights are the key vectors
    second: str  # the output projection
    up: str | None  # the GLU form's up projection (Llama), None otherwise
    conv1d: bool  # GPT-2's Conv1D stores weight [in, out]; nn.Linear stores [out, in]
    activation_field: str  # config field naming the activation
    dropout: str | None  # the MLP's output dropout module, if it has one


# By `config.model_type`: the architectures EMoE converts.
ARCHITECTURES: dict[str, FFNSpec] = {
    "gpt2": FFNSpec("transformer.h", "c_fc", "c_proj", None, True, "activation_function", "dropout"),
    "gpt_neox": FFNSpec("gpt_neox.layers", "dense_h_to_4h", "dense_4h_to_h", None, False, "hidden_act", None),
    "llama": FFNSpec("model.layers", "gate_proj", "down_proj", "up_proj", False, "hidden_act", None),
}


def check_architecture(config, where: str | None = None) -> None:
    """ValueError (prefixed with `where`, a file or class name) unless `config` (a transformers
    config) is one of the ARCHITECTURES."""
    if config.model_type not in ARCHITECTURES:
        raise ValueError(f"{where + ': ' if where else ''}model_type {config.model_type!r} is not supported by EMoE "
                         f"(supported: {', '.join(ARCHITECTURES)})")


def kernel_activation(name: str) -> str:
    """The kernels' name for a Hugging Face activation name; ValueError if there is none."""
    if name not in ACTIVATION_ALIASES:
        raise ValueError(f"activation {name!r} is not supported by EMoE (supported: {sorted(ACTIVATION_ALIASES)})")
    return ACTIVATION_ALIASES[name]


def keys_FD(proj: nn.Module, conv1d: bool) -> torch.Tensor:
    """The key vectors of a first (or up) projection: one row per neuron, [d_ff, D] (a view)."""
    return proj.weight.t() if conv1d else proj.weight


def in_weight_EDF(proj: nn.Module, conv1d: bool, num_experts: int) -> torch.Tensor:
    """A first (or up) projection's weight as per-expert [E, D, F] matrices (a strided view)."""
    w = proj.weight
    if conv1d:  # [D, d_ff]
        D, d_ff = w.shape
        return w.view(D, num_experts, d_ff // num_experts).permute(1, 0, 2)
    d_ff, D = w.shape  # [d_ff, D]
    return w.view(num_experts, d_ff // num_experts, D).transpose(1, 2)


def out_weight_EFD(proj: nn.Module, conv1d: bool, num_experts: int) -> torch.Tensor:
    """The output projection's weight as per-expert [E, F, D] matrices (a view)."""
    w = proj.weight
    if conv1d:  # [d_ff, D]
        d_ff, D = w.shape
        return w.view(num_experts, d_ff // num_experts, D)
    D, d_ff = w.shape  # [D, d_ff]
    return w.view(D, num_experts, d_ff // num_experts).permute(1, 2, 0)


def permute_neurons_(mlp: nn.Module, spec: FFNSpec, perm: torch.Tensor) -> None:
    """Reorder the FFN's neurons in place (new neuron i = old neuron perm[i]): the first and up
    projections' output units and biases, the second projection's input units. The function
    the FFN computes is unchanged."""
    neuron_dim_in = 1 if spec.conv1d else 0  # where d_ff sits in a first/up projection's weight
    with torch.no_grad():
        for name in (spec.first, spec.up):
            if name is None:
                continue
            proj = getattr(mlp, name)
            proj.weight.copy_(proj.weight.index_select(neuron_dim_in, perm))
            if proj.bias is not None:
                proj.bias.copy_(proj.bias[perm])
        second = getattr(mlp, spec.second)
        second.weight.copy_(second.weight.index_select(1 - neuron_dim_in, perm))


class EMoEMLP(nn.Module):
    """A dense FFN as E experts of d_ff / E neurons with the avg-k gate (module docstring)."""

    def __init__(self, mlp: nn.Module, spec: FFNSpec, activation: str, num_experts: int, top_k: int,
                 computation: str = "sparse"):
        super().__init__()
        # The dense module's children under their own names: same state-dict keys as dense.
        for name, child in mlp.named_children():
            self.add_module(name, child)
        self.spec = spec
        self.activation = kernel_activation(activation)
        if spec.up is not None and getattr(self, spec.up).bias is not None:
            raise ValueError(f"a bias on {spec.up} (mlp_bias) is not supported by EMoE's GLU form")
        d_ff = keys_FD(getattr(self, spec.first), spec.conv1d).shape[0]
        if d_ff % num_experts:
            raise ValueError(f"d_ff ({d_ff}) must be divisible by the number of experts ({num_experts})")
        self.num_experts = num_experts
        d_model = keys_FD(getattr(self, spec.first), spec.conv1d).shape[1]
        # No parameters of its own (no state-dict keys): the scores come from the FFN's weights.
        self.router = Router(d_model, num_experts, top_k, scorer=self.scores, unit_gates=True)
        self.set_routing(top_k, computation)
        self.collect_counts = False
        self.counts_E: torch.Tensor | None = None  # tokens per expert since the last reset (when collecting)
        self.count_mask_T: torch.Tensor | None = None  # False for tokens left out of the counts (padding)

    def set_routing(self, top_k: int, computation: str) -> None:
        """Change k or the computation (both leave the weights as they are)."""
        if not 1 <= top_k <= self.num_experts:
            raise ValueError(f"top_k ({top_k}) must be between 1 and the number of experts ({self.num_experts})")
        if computation not in COMPUTATIONS:
            raise ValueError(f"computation must be one of {COMPUTATIONS}, got {computation!r}")
        self.top_k, self.computation = top_k, computation
        self.router.k = top_k

    @torch.no_grad()
    def scores(self, x_TD: torch.Tensor) -> torch.Tensor:
        """avg-k scores [T, E] = x . mean(K_e) + mean(b_e), from the current weights, at least fp32."""
        first = getattr(self, self.spec.first)
        centroid_ED = in_weight_EDF(first, self.spec.conv1d, self.num_experts).mean(dim=2)
        scores_TE = x_TD.to(centroid_ED.dtype) @ centroid_ED.t()
        if first.bias is not None:
            scores_TE = scores_TE + first.bias.view(self.num_experts, -1).mean(dim=1)
        return scores_TE.float() if scores_TE.element_size() < 4 else scores_TE

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x_TD = x.reshape(-1, shape[-1])
        # The top-k experts of each token, [T, K]; their gates are 1 (no gradient: a discrete choice).
        experts_TK = self.router(x_TD).experts_TK
        if self.collect_counts:
            counted = experts_TK if self.count_mask_T is None else experts_TK[self.count_mask_T]
            counts = torch.bincount(counted.reshape(-1), minlength=self.num_experts)
            self.counts_E = counts if self.counts_E is None else self.counts_E + counts
        y_TD = self.sparse(x_TD, experts_TK) if self.computation == "sparse" else self.masked(x_TD, experts_TK)
        if self.spec.dropout is not None:
            y_TD = getattr(self, self.spec.dropout)(y_TD)
        return y_TD.view(shape)

    def masked(self, x_TD: torch.Tensor, experts_TK: torch.Tensor) -> torch.Tensor:
        """The dense FFN with the unchosen experts' neurons zeroed (the reference)."""
        spec, E = self.spec, self.num_experts
        act = molm_kernels.ACTIVATIONS[self.activation]
        h_TF = act(getattr(self, spec.first)(x_TD))
        if spec.up is not None:
            h_TF = h_TF * getattr(self, spec.up)(x_TD)
        mask_TE = torch.zeros(x_TD.shape[0], E, dtype=h_TF.dtype, device=h_TF.device)
        mask_TE.scatter_(1, experts_TK, 1.0)
        h_TF = (h_TF.view(-1, E, h_TF.shape[1] // E) * mask_TE[:, :, None]).view_as(h_TF)  # (T, E, F) -> (T, d_ff)
        return getattr(self, spec.second)(h_TF)

    def kernel_weights(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        """The experts' (w1 [E, D, F'], w3 [E, D, F'] or None, w2 [E, F', D], b1 [E, F'] or None)
        for the scattered kernels. F' = F when F is a multiple of KERNEL_WIDTH_MULTIPLE: views of the
        dense weights. Otherwise F' is F rounded up and these are copies (in the weights' storage
        order), whose extra neurons have zero weights and bias: their activation is act(0) = 0
        (gelu, relu, silu) and their zero output rows add nothing, so values and the real weights'
        gradients are unchanged.
        The copies cost one read and write of the FFN weights per call (0.3 GB for Llama-7B's)."""
        spec, E = self.spec, self.num_experts
        first, second = getattr(self, spec.first), getattr(self, spec.second)
        up = None if spec.up is None else getattr(self, spec.up)
        pad = -(keys_FD(first, spec.conv1d).shape[0] // E) % KERNEL_WIDTH_MULTIPLE
        if pad == 0:
            return (in_weight_EDF(first, spec.conv1d, E), None if up is None else in_weight_EDF(up, spec.conv1d, E),
                    out_weight_EFD(second, spec.conv1d, E), None if first.bias is None else first.bias.view(E, -1))

        def padded_EFD(proj: nn.Module, neuron_dim: int) -> torch.Tensor:
            """[E, F', D]: the neuron dimension split into (E, F) and F padded where it lies in
            storage (a copy in storage order, no transpose), then viewed expert-first."""
            w = proj.weight.unflatten(neuron_dim, (E, -1))
            w = nn.functional.pad(w, (0, 0, 0, pad) if neuron_dim == 0 else (0, pad))
            return w if neuron_dim == 0 else w.permute(1, 2, 0)

        # Where d_ff lies: nn.Linear weights are [out, in], GPT-2's Conv1D [in, out].
        in_dim, out_dim = (1, 0) if spec.conv1d else (0, 1)
        w3_EDF = None if up is None else padded_EFD(up, in_dim).transpose(1, 2)
        b1_EF = None if first.bias is None else nn.functional.pad(first.bias.view(E, -1), (0, pad))
        return padded_EFD(first, in_dim).transpose(1, 2), w3_EDF, padded_EFD(second, out_dim), b1_EF

    def sparse(self, x_TD: torch.Tensor, experts_TK: torch.Tensor) -> torch.Tensor:
        """Only the chosen experts, through the scattered-expert kernels."""
        w1_EDF, w3_EDF, w2_EFD, b1_EF = self.kernel_weights()
        gates_TK = torch.ones(experts_TK.shape, dtype=x_TD.dtype, device=x_TD.device)  # weight 1 each
        routing = molm_kernels.route(experts_TK, self.num_experts)
        y_TD = molm_kernels.scattered_mlp(x_TD, w1_EDF, w2_EFD, self.top_k, routing, gates_TK, self.activation,
                                          b1_EF=b1_EF, w3_EIF=w3_EDF)
        # The output bias belongs to the whole FFN (added once, not per expert).
        second = getattr(self, self.spec.second)
        return y_TD if second.bias is None else y_TD + second.bias
