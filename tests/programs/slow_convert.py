"""The real CLI, with every tensor write slowed down so that two conversions overlap:
`python -m tests.programs.slow_convert convert ...`."""

from __future__ import annotations

import sys
import time

from tests.programs import on_tensor_writes


def main() -> int:
    on_tensor_writes(lambda writer: time.sleep(0.15), after=False)
    from uptrain_gqa.cli import main as cli

    return cli(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
