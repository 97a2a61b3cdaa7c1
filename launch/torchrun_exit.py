"""torchrun, exiting with its training processes' status instead of a traceback.

    python launch/torchrun_exit.py [torchrun arguments ...] SCRIPT.py [script arguments ...]

torchrun itself exits 1 with a ChildFailedError traceback whenever a worker fails, and with a
SignalException traceback when it is stopped by a signal it forwarded; the workers' own exit codes
(2 bad configuration, 3 non-finite, 75 preempted after a checkpoint) and their one-line error
messages are lost among its lines. This runs torchrun's own `run` and maps its outcome:

- a worker failed: exit with its exit code (the first failure's; 128 + N for death by signal N),
  after the worker has printed its own message;
- stopped by SIGUSR1 or SIGTERM (forwarded to the workers, which checkpoint and stop): exit 75,
  the code the SLURM scripts and users requeue or rerun on; by another signal N: 128 + N.

launch/node_launch.sh runs it in place of `python -m torch.distributed.run`.
"""

from __future__ import annotations

import signal
import sys

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import parse_args, run

EXIT_PREEMPTED = 75  # EX_TEMPFAIL, as pretrain.py exits after a preemption checkpoint


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except ChildFailedError as e:
        failure = e.get_first_failure()[1]
        return failure.exitcode if failure.exitcode > 0 else 128 - failure.exitcode
    except SignalException as e:
        if e.sigval in (signal.SIGUSR1, signal.SIGTERM):
            return EXIT_PREEMPTED
        return 128 + int(e.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
