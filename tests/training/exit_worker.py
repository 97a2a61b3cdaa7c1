"""Rank side of test_distributed_exit.py: start torch.distributed the way every entry point does
(`init_distributed`), run a burst of asynchronous Gloo collectives on temporary tensors in several
groups, and return without destroying anything, as a finished training script does.

    torchrun --nproc_per_node 4 tests/training/exit_worker.py
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from molm_megatron.training.trainer import init_distributed


def main() -> None:
    init_distributed(torch.device("cpu"), "auto")
    pairs = [dist.new_group(ranks) for ranks in ([0, 1], [2, 3], [0, 2], [1, 3])]
    mine = [group for group in pairs if dist.get_rank(group) >= 0]
    # The collectives' inputs are temporaries: Gloo's worker threads hold their last references.
    works = [dist.all_reduce(torch.randn(1 << 16), group=group, async_op=True) for group in mine for _ in range(50)]
    for work in works:
        work.wait()


if __name__ == "__main__":
    main()
