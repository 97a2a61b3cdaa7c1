"""The Transformer-XL memory of B parallel streams (Dai et al., 2019): the previous window's
detached keys/values per layer and which of their positions are valid.

Training, validation and perplexity evaluation each hold one `StreamMemory` and call, per window,
`inputs(reset_B, T)` (what the model's `memory` and `attention_mask` take) then `remember(out.memory,
mask)`. A row whose stream restarts (`reset_B`) has its memory masked out rather than dropped, so
the rows of a batch keep one shape. State survives a checkpoint through state_dict/load_state_dict,
and follows its streams to another data-parallel layout (`rows_state`). Tensor-parallel ranks hold
equal copies: attention experts, keys and values are replicated over them.

Legend: B rows (streams), M memory tokens per row, T window tokens, S = M + T keys.
"""

from __future__ import annotations

import torch


class StreamMemory:
    """Memory of the previous window per row, and its valid mask [B, M]; empty until the first window."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # per layer (k, v), [B, M, nh, hs] each
        self.valid_BM: torch.Tensor | None = None  # False where a restarted row's memory is stale

    def reset(self) -> None:
        """Forget everything (e.g. after a non-finite step: never carry its keys/values on)."""
        self.kv = self.valid_BM = None

    def inputs(self, reset_B: torch.Tensor, T: int) -> tuple[list | None, torch.Tensor | None]:
        """`memory` and `attention_mask` [B, M + T] for the next window of T tokens; the rows in
        `reset_B` start a new stream, so their memory is masked. (None, None) when empty."""
        if self.kv is None:
            return None, None
        keep_BM = self.valid_BM & ~reset_B.to(self.valid_BM.device)[:, None]
        return self.kv, torch.cat([keep_BM, keep_BM.new_ones(keep_BM.shape[0], T)], dim=1)

    def remember(self, memory: list | None, mask_BS: torch.Tensor | None) -> None:
        """Keep the model's `out.memory` and which of its positions are valid: the last M positions
        of the window's key mask (all valid when the window had none). A model that keeps no memory
        returns None: nothing is kept, and every window is read on its own."""
        if memory is None:
            self.reset()
            return
        M = memory[0][0].shape[1]
        if mask_BS is None:
            self.valid_BM = torch.ones(memory[0][0].shape[0], M, dtype=torch.bool, device=memory[0][0].device)
        else:
            self.valid_BM = mask_BS[:, mask_BS.shape[1] - M:]
        self.kv = memory

    def state_dict(self) -> dict:
        """CPU copies (a checkpoint must not depend on the device it was written from); values that
        are the keys' own tensor (MoLM's identity keys and values) are stored once, as None."""
        if self.kv is None:
            return {"kv": None, "valid": None}
        return {"kv": [(k.cpu(), None if v is k else v.cpu()) for k, v in self.kv], "valid": self.valid_BM.cpu()}

    def load_state_dict(self, state: dict) -> None:
        if state["kv"] is None:
            self.reset()
            return
        self.kv = []
        for k, v in state["kv"]:
            k = k.to(self.device)
            self.kv.append((k, k if v is None else v.to(self.device)))
        self.valid_BM = state["valid"].to(self.device)


def rows_state(states: list[dict], origins: list[tuple[int, int]]) -> dict:
    """A `StreamMemory` state whose row b is row `origins[b][1]` of the saved state `states[origins[b][0]]`:
    the memory of each stream, gathered from the ranks of another layout (the loader's `stream_origins`)."""
    picked = [(states[i]["kv"], states[i]["valid"], row) for i, row in origins]
    if any(kv is None for kv, _, _ in picked):  # saved before the first window, or after a reset
        return {"kv": None, "valid": None}

    def rows(n: int, j: int) -> torch.Tensor | None:  # layer n's keys (j = 0) or values (1), [B, M, nh, hs]
        if picked[0][0][n][j] is None:  # values stored as None: they are the keys (state_dict)
            return None
        return torch.cat([layers[n][j][row:row + 1] for layers, _, row in picked])

    return {"kv": [(rows(n, 0), rows(n, 1)) for n in range(len(picked[0][0]))],
            "valid": torch.cat([valid[row:row + 1] for _, valid, row in picked])}
