"""Run the lensforge CLI with a per-step callback, for tests that interrupt a run.

    python tests/cli_launcher.py [--sleep S] [--die-after K] -- <lensforge args>

`--sleep S` pauses S seconds after every optimizer step, so a kill -9 sent from outside
lands mid-run. `--die-after K` makes rank 0 exit at once with status 75 (os._exit: no
cleanup, like a crash) right after checkpoint K is on disk. Under torchrun, point
torchrun at this file instead of `-m lensforge`.

The callback goes in through `train(on_step=...)`: production code holds no test hooks.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time

import lensforge.cli.cmd_train as cmd_train
from lensforge.cli.main import main
from lensforge.training import StepEvent

DIED = 75  # the exit status of --die-after, distinct from lensforge's own 0/1/2


def step_callback(sleep: float, die_after: int | None):
    """on_step for `train`: pace each step, or crash rank 0 after checkpoint `die_after`."""

    def on_step(event: StepEvent) -> None:
        if event.step == 0:  # the initial state, before any optimizer step
            return
        if die_after is not None and event.step == die_after and event.rank == 0:
            if not event.checkpointed:  # a test bug: the crash must follow a checkpoint
                raise SystemExit(f"--die-after {die_after}: step {die_after} wrote no checkpoint")
            sys.stdout.flush()  # os._exit skips flushing, and tests read stdout
            os._exit(DIED)
        if sleep:
            time.sleep(sleep)

    return on_step


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sleep", type=float, default=0.0)
    parser.add_argument("--die-after", type=int, default=None)
    parser.add_argument("cli_args", nargs=argparse.REMAINDER)
    opts = parser.parse_args(argv)
    cli_args = opts.cli_args[1:] if opts.cli_args[:1] == ["--"] else opts.cli_args
    # cmd_train calls the name `train` it imported; rebind that name to one with the hook.
    cmd_train.train = functools.partial(cmd_train.train,
                                        on_step=step_callback(opts.sleep, opts.die_after))
    return main(cli_args)


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
