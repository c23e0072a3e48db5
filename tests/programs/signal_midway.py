"""The real CLI, which sends itself a real signal once 3 tensors are written:
`python -m tests.programs.signal_midway SIGNAME convert ...`."""

from __future__ import annotations

import os
import signal
import sys

from tests.programs import on_tensor_writes


def main() -> int:
    sig = getattr(signal, sys.argv[1])

    def at_the_third(writer) -> None:
        if writer.bytes_written and writer._next == 3:
            os.kill(os.getpid(), sig)

    on_tensor_writes(at_the_third, after=True)
    from uptrain_gqa.cli import main as cli

    return cli(sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
