"""Where do a converted model's first uptraining gradients come from? Gradient norms per kind of parameter.

Uptraining an MQA SmolLM2 had pre-clip gradient norms of 3-18 (a peak of 92) against at most 1.6 for the
source itself on the same tokens (docs/results.md). This loads each model given, runs the same batches of
text through it with the training loss (next-token cross-entropy), and prints the gradient norm of every kind
of parameter (q/k/v/o projections, MLP, norms, embeddings), summed over layers, and the layers whose
attention gradients are largest; no weights change.

    python -m experiments.gradient_probe SOURCE MQA [...] --text 'PLAYS/*.txt' --batches 4
"""

from __future__ import annotations

import argparse
import math
import re
from collections import defaultdict
from pathlib import Path

import torch


def kind_of(name: str) -> str:
    """q_proj / k_proj / v_proj / o_proj / mlp / norm / embeddings, from a parameter's name."""
    for part in ("q_proj", "k_proj", "v_proj", "o_proj"):
        if f".{part}." in name:
            return part
    if ".mlp." in name:
        return "mlp"
    if "norm" in name:
        return "norm"
    return "embeddings"


def probe(path: Path, batches: list[torch.Tensor]) -> tuple[dict[str, float], dict[str, float], list[float]]:
    """(gradient norm per kind over all batches' mean loss, weight norm per kind, attention gradient norm per
    layer)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.train()
    model.zero_grad()
    losses = []
    for ids in batches:
        loss = model(input_ids=ids, labels=ids).loss / len(batches)
        loss.backward()
        losses.append(float(loss) * len(batches))
    grads: dict[str, float] = defaultdict(float)
    weights: dict[str, float] = defaultdict(float)
    layers: dict[int, float] = defaultdict(float)
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        kind = kind_of(name)
        grads[kind] += float(p.grad.pow(2).sum())
        weights[kind] += float(p.detach().pow(2).sum())
        m = re.search(r"layers\.(\d+)\.self_attn", name)
        if m:
            layers[int(m.group(1))] += float(p.grad.pow(2).sum())
    grads["total"] = sum(grads.values())
    print(f"{path}: loss {sum(losses) / len(losses):.3f}")
    return (
        {k: math.sqrt(v) for k, v in grads.items()},
        {k: math.sqrt(v) for k, v in weights.items()},
        [math.sqrt(layers[i]) for i in sorted(layers)],
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", type=Path)
    ap.add_argument("--text", required=True, help="files (glob) the batches are read from")
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=4)
    args = ap.parse_args()
    from transformers import AutoTokenizer

    from uptrain_gqa.data.config import DataConfig
    from uptrain_gqa.data.documents import token_stream

    torch.set_num_threads(2)
    tokenizer = AutoTokenizer.from_pretrained(args.models[0])
    n = args.batches * args.batch_size * args.seq_len
    stream, _ = token_stream(DataConfig(files=[args.text]), tokenizer, n)
    blocks = stream[: n // args.seq_len * args.seq_len].reshape(-1, args.batch_size, args.seq_len)
    results = {str(m): probe(m, list(blocks)) for m in args.models}
    kinds = ["total", "q_proj", "k_proj", "v_proj", "o_proj", "mlp", "norm", "embeddings"]
    print("\ngradient norm (weight norm) per kind of parameter, mean loss over the batches:\n")
    print("| model | " + " | ".join(kinds) + " |")
    print("|---|" + "---|" * len(kinds))
    for m, (g, w, _) in results.items():
        cells = [f"{g.get(k, 0):.3f}" + (f" ({w[k]:.1f})" if k in w else "") for k in kinds]
        print(f"| {Path(m).name} | " + " | ".join(cells) + " |")
    print("\nattention gradient norm per layer (the 5 largest):\n")
    for m, (_, _, per_layer) in results.items():
        top = sorted(range(len(per_layer)), key=lambda i: -per_layer[i])[:5]
        print(f"{Path(m).name}: " + ", ".join(f"layer {i} {per_layer[i]:.3f}" for i in top))


if __name__ == "__main__":
    main()
