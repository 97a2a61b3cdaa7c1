"""Expert statistics during evaluation: how many tokens every router sent to each of its experts.

The counts are what pruning by frequency reads (frequency = count / assignments). They come from
the routers' own outputs, captured by forward hooks, because lm-evaluation-harness hands the model
right-padded batches without saying where the padding starts: the caller names the real tokens
afterwards (`add_rows`), so padding is never counted, as in the model's `collect_expert_stats`.

File format (JSON), keyed like `MoLMOutput.expert_stats`:

    {"tokens": 12345,                                   # real tokens routed (each router sees all)
     "counts": {"layer0.attn": [..E ints..], "layer0.mlpf": [...], ...},
     "assignments": {"layer0.attn": 24690, ...}}       # sum of counts = tokens * k of that router
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from molm_megatron.emoe.training import EMoECausalLM
from molm_megatron.model import MoLM


def router_modules(model: MoLM | EMoECausalLM) -> dict[str, torch.nn.Module]:
    """'layer{N}.attn' / 'layer{N}.mlpf' -> that router (the names of `out.expert_stats`); an EMoE
    model's are its EMoE layers' gates (none in a dense model)."""
    if isinstance(model, EMoECausalLM):
        return {f"layer{i}.mlpf": layer.router for i, layer in model.emoe_layers().items()}
    routers = {}
    for i, block in enumerate(model.transformer.h):
        routers[f"layer{i}.attn"] = block.attn.q_proj.gate
        routers[f"layer{i}.mlpf"] = block.mlpf.gate
    return routers


class ExpertCounter:
    """Accumulates per-expert token counts of `model`'s routers over the forwards run inside `capture()`."""

    def __init__(self, model: MoLM | EMoECausalLM):
        self.tokens = 0
        self.counts: dict[str, torch.Tensor] = {}
        self._captured: dict[str, list[torch.Tensor]] = {}
        self._capturing = False
        routers = router_modules(model)
        self._names = list(routers)  # file order: layer by layer, attention before MLP
        for name, router in routers.items():
            router.register_forward_hook(self._hook(name))

    def _hook(self, name: str):
        def hook(module, inputs, out) -> None:
            if self._capturing:
                self._captured.setdefault(name, []).append(out.experts_TK)
                if name not in self.counts:
                    self.counts[name] = torch.zeros(out.probs_TE.shape[1], dtype=torch.long)
        return hook

    @contextlib.contextmanager
    def capture(self):
        """Record the routing of the forwards inside; `routes(B)` returns it."""
        self._captured, self._capturing = {}, True
        try:
            yield
        finally:
            self._capturing = False

    def routes(self, batch_size: int) -> dict[str, torch.Tensor]:
        """The captured routing as [B, T, K] expert ids per router, the captured forwards (Transformer-XL
        segments of one batch, in order) concatenated along T."""
        return {name: torch.cat([e.view(batch_size, -1, e.shape[-1]) for e in parts], dim=1)
                for name, parts in self._captured.items()}

    def add(self, experts: dict[str, torch.Tensor]) -> None:
        """Count the given tokens' choices: router -> expert ids [..., K] of real tokens only."""
        num_tokens = None
        for name, e in experts.items():
            self.counts[name] += torch.bincount(e.reshape(-1), minlength=self.counts[name].numel()).cpu()
            num_tokens = e.reshape(-1, e.shape[-1]).shape[0]
        self.tokens += num_tokens or 0

    def add_rows(self, routes: dict[str, torch.Tensor], valid_BT: torch.Tensor) -> None:
        """Count the tokens where valid_BT [B, T] is True."""
        valid_BT = valid_BT.to(next(iter(routes.values())).device)
        self.add({name: e[valid_BT] for name, e in routes.items()})

    def to_dict(self) -> dict:
        names = [n for n in self._names if n in self.counts]
        return {"tokens": self.tokens, "counts": {n: self.counts[n].tolist() for n in names},
                "assignments": {n: int(self.counts[n].sum()) for n in names}}

    def save(self, path: str | Path) -> None:
        """Write the JSON file atomically."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        tmp.replace(path)
