"""The real CLI, recording which training blocks this process read and how many data-parallel wrappers are alive
when the process group is destroyed: `python -m tests.programs.record_reads FOLDER train ...` writes
FOLDER/reads-RANK.json and FOLDER/ddp-alive-RANK.json at exit."""

from __future__ import annotations

import atexit
import gc
import json
import os
import sys
from pathlib import Path


def main() -> int:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    import uptrain_gqa.data.blocks as data

    folder, rank = sys.argv[1], os.environ.get("RANK", "0")
    reads, original = [], data.BlockData.micro_batch

    def micro_batch(self, i):
        reads.extend(self.ids(i).tolist())
        return original(self, i)

    data.BlockData.micro_batch = micro_batch
    atexit.register(lambda: Path(folder, f"reads-{rank}.json").write_text(json.dumps(reads)))

    alive, destroy = [], dist.destroy_process_group

    def counting_destroy(*args, **kwargs):
        gc.collect()
        alive.append(sum(isinstance(o, DistributedDataParallel) for o in gc.get_objects()))
        return destroy(*args, **kwargs)

    dist.destroy_process_group = counting_destroy
    atexit.register(lambda: Path(folder, f"ddp-alive-{rank}.json").write_text(json.dumps(alive)))
    from uptrain_gqa.cli import main as cli

    return cli(sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
