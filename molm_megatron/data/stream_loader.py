"""The stream-ordered loader for Transformer-XL memory (docs/design.md, "Data order").

Memory only helps when segment t+1 of a batch row continues segment t of the same row, so batches
are cut the way Transformer-XL does (Dai et al., 2019, its `batchify`), per epoch:

1. The token source gives the epoch's documents in a seeded shuffled order; concatenated (each
   ends with the end-of-document id) they form one token stream of T tokens.
2. The stream is cut into P = dp_size * micro_batch_size consecutive parts of W * seq_len tokens,
   W = (T - 1) // (P * seq_len) windows each (the last < P * seq_len + 1 tokens wait for a later
   epoch, which reshuffles). Data-parallel rank r owns parts r*B .. r*B + B - 1 (B =
   micro_batch_size): ranks get disjoint data and all take W steps per epoch.
3. Step t gives row b window t of its part: input_ids = part[t*L : (t+1)*L], labels =
   part[t*L + 1 : (t+1)*L + 1], the next tokens (the label after a part's last token is the first
   token of the next part, still the same stream). reset_memory is True at t = 0: at the start and
   whenever an epoch is exhausted and the streams restart on the reshuffled next epoch.

Every row restarts at the same step, because all parts have the same length. The position is
(epoch, step) and the shuffle is a pure function of (seed, epoch), so `state_dict` is a few
integers and resuming reproduces the following batches exactly.

Stream g = dp_rank * micro_batch_size + b (row b of rank dp_rank) is part g of the cut whatever the
layout, so a checkpoint of another data-parallel size resumes exactly when dp_size x
micro_batch_size, the number of parts, is the same (`stream_origins`). With another number the parts
are cut elsewhere in the token stream and the positions saved have no counterpart: refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from molm_megatron.data.token_source import TokenSource

_STATE_VERSION = 1
_CONFIG_KEYS = ("micro_batch_size", "seq_len", "dp_rank", "dp_size", "seed")


@dataclass
class Batch:
    """One micro-batch of B rows (streams) and L tokens."""

    input_ids: torch.LongTensor
    """[B, L] tokens."""
    labels: torch.LongTensor
    """[B, L] next tokens: input shifted by one within the stream."""
    reset_memory: torch.BoolTensor
    """[B]; True where the row's stream (re)started: the previous segment's keys/values must not
    be used as memory for that row."""


class TransformerXLStreamLoader:
    """Endless iterator of `Batch`es in Transformer-XL stream order (module docstring)."""

    def __init__(self, token_source: TokenSource, micro_batch_size: int, seq_len: int, dp_rank: int = 0,
                 dp_size: int = 1, seed: int = 1234) -> None:
        for name, value in (("micro_batch_size", micro_batch_size), ("seq_len", seq_len), ("dp_size", dp_size)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank ({dp_rank}) must be in [0, dp_size ({dp_size}))")
        self.source = token_source
        self.micro_batch_size = micro_batch_size
        self.seq_len = seq_len
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.seed = seed
        self.epoch = 0
        self.step = 0
        self._loaded_epoch = -1

    # --- the epoch's stream ---------------------------------------------------------------

    def _load_epoch(self) -> None:
        if self._loaded_epoch == self.epoch:
            return
        keys, lengths = self.source.epoch_order(self.epoch, self.seed)
        self._keys = keys
        self._ends = np.cumsum(lengths)  # [num_docs] stream offset where each document ends
        total = int(self._ends[-1]) if len(self._ends) else 0
        parts = self.dp_size * self.micro_batch_size
        self._windows = (total - 1) // (parts * self.seq_len) if total else 0
        if self._windows < 1:
            raise ValueError(f"epoch {self.epoch} has {total} tokens; {parts} streams (dp_size {self.dp_size} x "
                             f"micro_batch_size {self.micro_batch_size}) of seq_len {self.seq_len} need at least "
                             f"{parts * self.seq_len + 1}")
        self._epoch_tokens = total
        first_part = self.dp_rank * self.micro_batch_size
        self._row_starts = (first_part + np.arange(self.micro_batch_size, dtype=np.int64)) * self._windows * self.seq_len
        self._loaded_epoch = self.epoch

    @property
    def windows_per_epoch(self) -> int:
        """Steps (micro-batches) in the current epoch."""
        self._load_epoch()
        return self._windows

    def _read(self, start: int, count: int) -> np.ndarray:
        """Tokens [start, start + count) of the epoch's stream."""
        doc = int(np.searchsorted(self._ends, start, side="right"))
        offset = start - (int(self._ends[doc - 1]) if doc else 0)
        pieces = []
        while count > 0:
            doc_len = int(self._ends[doc]) - (int(self._ends[doc - 1]) if doc else 0)
            take = min(count, doc_len - offset)
            pieces.append(self.source.read(int(self._keys[doc]), offset, take))
            count -= take
            doc += 1
            offset = 0
        return np.concatenate(pieces)

    # --- iteration --------------------------------------------------------------------------

    def __iter__(self) -> "TransformerXLStreamLoader":
        return self

    def __next__(self) -> Batch:
        self._load_epoch()
        if self.step == self._windows:
            self.epoch += 1
            self.step = 0
            self._load_epoch()
        starts = self._row_starts + self.step * self.seq_len
        tokens_BL1 = np.stack([self._read(int(s), self.seq_len + 1) for s in starts]).astype(np.int64)
        tokens_BL1 = torch.from_numpy(tokens_BL1)
        batch = Batch(
            input_ids=tokens_BL1[:, :-1].clone(),
            labels=tokens_BL1[:, 1:].clone(),
            reset_memory=torch.full((self.micro_batch_size,), self.step == 0, dtype=torch.bool),
        )
        self.step += 1
        return batch

    # --- checkpointing ----------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Plain ints and lists (JSON- and pickle-safe): config, epoch, step and, as a check, each
        stream's position in the epoch's token stream and the epoch's token count. The shuffle
        RNG is stateless: numpy default_rng seeded with (seed, prefix, pass)."""
        self._load_epoch()
        return {
            "version": _STATE_VERSION,
            **{k: getattr(self, k) for k in _CONFIG_KEYS},
            "epoch": self.epoch,
            "step": self.step,
            "stream_positions": [int(s) + self.step * self.seq_len for s in self._row_starts],
            "epoch_tokens": self._epoch_tokens,
        }

    def stream_origins(self, states: list[dict]) -> list[tuple[int, int]]:
        """Where each of this loader's streams was in a checkpoint of another data-parallel layout:
        (index in `states`, row) per row, `states` being every rank's saved loader state (ranks of one
        data-parallel rank hold equal states). ValueError naming the field when the streams cannot
        continue here."""
        first = states[0]
        assert len({(s["epoch"], s["step"]) for s in states}) == 1, "ranks saved different stream positions"
        saved, now = first["dp_size"] * first["micro_batch_size"], self.dp_size * self.micro_batch_size
        if saved != now:
            hint = (f" (here: train.micro_batch_size {saved // self.dp_size})" if saved % self.dp_size == 0 else "")
            raise ValueError(
                f"stream loader state: the checkpoint reads {saved} streams (data-parallel size {first['dp_size']} x "
                f"train.micro_batch_size {first['micro_batch_size']}) but this run reads {now} (data-parallel size "
                f"{self.dp_size} x train.micro_batch_size {self.micro_batch_size}); the token stream would be cut "
                f"into other parts, where the saved positions mean nothing. Keep data-parallel size x "
                f"train.micro_batch_size at {saved}{hint}, or start a new checkpoint.dir")
        index = {}
        for i, s in enumerate(states):
            index.setdefault(s["dp_rank"], i)
        streams = range(self.dp_rank * self.micro_batch_size, (self.dp_rank + 1) * self.micro_batch_size)
        return [(index[g // first["micro_batch_size"]], g % first["micro_batch_size"]) for g in streams]

    def reshard_state(self, states: list[dict]) -> dict:
        """The state this loader would have saved at the checkpoint, from every rank's saved loader
        state of another data-parallel layout (see `stream_origins`)."""
        origins = self.stream_origins(states)
        # The rest (seed, seq_len, the epoch's tokens) is checked by load_state_dict as on any resume.
        return {**states[0], **{key: getattr(self, key) for key in ("micro_batch_size", "dp_rank", "dp_size")},
                "stream_positions": [states[i]["stream_positions"][row] for i, row in origins]}

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where `state` was taken; the config and the data must match."""
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"stream loader state version {state.get('version')!r}, expected {_STATE_VERSION}")
        for key in _CONFIG_KEYS:
            if state[key] != getattr(self, key):
                raise ValueError(f"stream loader state: {key} is {state[key]} in the checkpoint but {getattr(self, key)} now")
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        now = self.state_dict()
        for key in ("epoch_tokens", "stream_positions"):
            if now[key] != state[key]:
                raise ValueError(f"stream loader state: {key} differs from the checkpoint ({state[key]} there, "
                                 f"{now[key]} now): the data or the data spec changed")


def validation_batches(token_source: TokenSource, micro_batch_size: int, seq_len: int, dp_rank: int = 0,
                       dp_size: int = 1, seed: int = 1234) -> Iterator[Batch]:
    """One pass over a held-out source in stream order (epoch 0's windows), then stop.

    Rows start with reset_memory True and then carry memory, as in training.
    """
    loader = TransformerXLStreamLoader(token_source, micro_batch_size, seq_len, dp_rank, dp_size, seed)
    for _ in range(loader.windows_per_epoch):
        yield next(loader)
