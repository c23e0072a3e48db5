"""The real CLI where, on rank 1 only, the disk fills while checkpoint step-20 is written: in accelerate's part
($FULL_IN=state: the other rank would wait in DCP's collective) or inside DCP's own write ($FULL_IN=dcp).
`python -m tests.programs.fill_disk_on_rank_1 train ...` under accelerate launch."""

from __future__ import annotations

import errno
import os
import sys


def full(path) -> None:
    raise OSError(errno.ENOSPC, "No space left on device", str(path))


def main() -> int:
    import accelerate.accelerator as accelerator
    import torch.distributed.checkpoint.filesystem as dcp_files

    rank1 = os.environ["RANK"] == "1"
    if os.environ["FULL_IN"] == "state":
        real_state = accelerator.save_accelerator_state

        def save_state(output_dir, *args, **kwargs):
            if rank1 and "step-00000020" in str(output_dir):
                full(output_dir)
            return real_state(output_dir, *args, **kwargs)

        accelerator.save_accelerator_state = save_state
    else:
        real_write = dcp_files._FileSystemWriter.write_data

        def write_data(self, *args, **kwargs):
            if rank1 and "step-00000020" in str(self.path):
                full(self.path)
            return real_write(self, *args, **kwargs)

        dcp_files._FileSystemWriter.write_data = write_data
    from uptrain_gqa.cli import main as cli

    return cli(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
