"""The real CLI, where rank 0 sends SIGTERM to its launcher during optimizer step $STOP_AT_STEP, as Slurm would:
`python -m tests.programs.stop_at_step train ...` (under torchrun or accelerate launch)."""

from __future__ import annotations

import os
import signal
import sys


def main() -> int:
    import uptrain_gqa.training.loop as loop

    stop_at, original = int(os.environ["STOP_AT_STEP"]), loop.Trainer.step

    def step(self):
        if self.state.step == stop_at - 1 and self.acc.is_main_process:
            os.kill(os.getppid(), signal.SIGTERM)
        return original(self)

    loop.Trainer.step = step
    from uptrain_gqa.cli import main as cli

    return cli(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
