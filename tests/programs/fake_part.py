"""A stand-in for one part of benchmarks/gpu_check.py, run as `python -m tests.programs.fake_part MODE --json FILE`.

ok: writes its figures; fail: says why on stderr and exits 1; hang: writes partial figures, starts a
grandchild in a session of its own (as torchrun starts its workers), writes its pid into $FAKE_PART_PIDS,
then waits.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path


def main() -> None:
    mode, figures = sys.argv[1], Path(sys.argv[sys.argv.index("--json") + 1])
    if mode == "ok":
        figures.write_text(json.dumps({"value": 1}))
    elif mode == "fail":
        sys.exit("fake_part: error: the device fell over")
    elif mode == "hang":
        figures.write_text(json.dumps({"value": 0.5}))
        sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
        Path(os.environ["FAKE_PART_PIDS"]).write_text(f"{os.getpid()} {sleeper.pid}")
        time.sleep(600)


if __name__ == "__main__":
    main()
