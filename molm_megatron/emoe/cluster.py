"""Balanced clustering of an FFN's key vectors into equal experts, with a per-layer label cache.

EMoE (Qiu et al., 2024) groups the d_ff neurons of a dense FFN by balanced k-means on their
L2-normalised key vectors (the rows of the first projection), every group exactly d_ff / E
neurons: `k-means-constrained` (a min-cost-flow assignment step inside Lloyd's iterations), as
the authors' code uses, with a fixed seed. On real models this is the slow part (a Llama-7B layer
is 11008 keys of 4096 dims), so labels are cached per layer, keyed by a hash of the keys and the
clustering settings.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from molm_megatron.outputs import atomic_write


def balanced_kmeans(keys_FD: torch.Tensor, num_experts: int, seed: int, n_init: int = 10,
                    max_iter: int = 300) -> np.ndarray:
    """Labels [d_ff] in [0, num_experts), each label used exactly d_ff / num_experts times, from
    balanced k-means on the L2-normalised rows of keys_FD."""
    from k_means_constrained import KMeansConstrained

    d_ff = keys_FD.shape[0]
    if d_ff % num_experts:
        raise ValueError(f"d_ff ({d_ff}) must be divisible by the number of experts ({num_experts})")
    if num_experts == 1:
        return np.zeros(d_ff, dtype=np.int64)
    size = d_ff // num_experts
    x = torch.nn.functional.normalize(keys_FD.detach().float(), dim=1).cpu().numpy().astype(np.float64)
    km = KMeansConstrained(n_clusters=num_experts, size_min=size, size_max=size, random_state=seed, n_init=n_init,
                           max_iter=max_iter)
    labels = km.fit_predict(x).astype(np.int64)
    counts = np.bincount(labels, minlength=num_experts)
    assert (counts == size).all(), f"k-means-constrained returned unbalanced clusters {counts.tolist()}"
    return labels


def expert_permutation(labels: np.ndarray) -> torch.Tensor:
    """The neuron order that makes each expert a contiguous slice: new neuron i = old perm[i]
    (experts in label order, neurons of one expert in their original order)."""
    return torch.from_numpy(np.argsort(labels, kind="stable"))


def cached_labels(cache_dir: Path | None, layer: int, keys_FD: torch.Tensor, num_experts: int, seed: int,
                  n_init: int, max_iter: int) -> tuple[np.ndarray, bool]:
    """(labels, whether they came from the cache). The file name holds the settings and a hash
    of the keys, so a changed model or setting never reuses stale labels (and nothing is
    overwritten: a new key is a new file)."""
    if cache_dir is None:
        return balanced_kmeans(keys_FD, num_experts, seed, n_init, max_iter), False
    keys = keys_FD.detach().float().contiguous().cpu().numpy()
    digest = hashlib.sha256(keys.tobytes() + str(keys.shape).encode()).hexdigest()[:16]
    path = cache_dir / f"layer{layer}-experts{num_experts}-seed{seed}-init{n_init}-iter{max_iter}-{digest}.npy"
    if path.exists():
        return np.load(path), True
    labels = balanced_kmeans(keys_FD, num_experts, seed, n_init, max_iter)
    def save(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.save would append ".npy" to a temporary's name
            np.save(f, labels)

    atomic_write(path, save)
    return labels, False
