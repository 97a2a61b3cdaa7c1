"""A finished multi-process run exits cleanly.

Without the process groups shut down before interpreter teardown, a Gloo worker thread can release
a collective's last tensor while Python finalises and the rank aborts with "terminate called
without an active exception" after its work is done (tests/training/exit_worker.py without the
shutdown aborted in 14 of 20 four-rank launches; a training run's single end-of-run collective
makes it rarer, not absent). Three launches of the worker must all exit 0.
"""

from __future__ import annotations

import sys

from tests.training.procs import run


def test_finished_ranks_exit_without_abort(tmp_path):
    for attempt in range(3):
        log = tmp_path / f"launch{attempt}.txt"
        code = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4",
                    "tests/training/exit_worker.py"], log, timeout=120)
        text = log.read_text()
        assert code == 0 and "terminate called" not in text, f"launch {attempt}:\n{text[-3000:]}"
