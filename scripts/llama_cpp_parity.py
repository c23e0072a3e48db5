"""uptrain's output in llama.cpp: make a GGUF with llama.cpp's own converter and check that llama.cpp runs
it as transformers does.

The converter (`convert_hf_to_gguf.py`, with its `conversion/` and `gguf-py/` folders) is the one vendored
in the source distribution of the installed `llama-cpp-python` (`pip install -e '.[llamacpp]'`, which
compiles llama.cpp: about 6 minutes on 2 cores); it is fetched once with `pip download` into uptrain's
cache folder. The model then runs in `llama-cpp-python` with an f32 KV cache, and this reports the KV
heads llama.cpp reads from the file, the log-probabilities of both engines on the same tokens, their
perplexities, and the greedy continuation of each.

    python -m scripts.llama_cpp_parity OUT                 # OUT: a folder `uptrain convert` wrote
    python -m scripts.llama_cpp_parity OUT --text FILE --tokens 512 --json parity.json

tests/io/test_llama_cpp.py runs the same functions on tiny GQA and MQA conversions (`make test-all`).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

import torch

from uptrain_gqa.data.corpora import cache_dir

VOCAB_SPM = "models/ggml-vocab-llama-spm.gguf"
"""A vocabulary-only GGUF (Llama-2's 32,000 tokens) that llama.cpp ships for its tokenizer tests."""
_WANTED = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", VOCAB_SPM)


def llama_cpp_tree(root: Path | None = None) -> Path:
    """The llama.cpp folder vendored in the installed llama-cpp-python's source distribution (converter,
    gguf-py, the test vocabulary): from uptrain's cache, else fetched with `pip download` and unpacked aside
    and renamed into place, so an interrupted fetch leaves nothing half-written."""
    try:
        version = importlib.metadata.version("llama-cpp-python")
    except importlib.metadata.PackageNotFoundError:
        raise SystemExit("llama-cpp-python is not installed: pip install -e '.[llamacpp]'") from None
    folder = (root or cache_dir()) / f"llama.cpp-{version}"
    if (folder / "convert_hf_to_gguf.py").exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent) as tmp:
        pip = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:"]
        subprocess.run([*pip, "-d", tmp, f"llama-cpp-python=={version}"], check=True)
        archive = next(Path(tmp).glob("*.tar.gz"))
        prefix = archive.name.removesuffix(".tar.gz") + "/vendor/llama.cpp/"
        with tarfile.open(archive) as tar:
            members = [
                m for m in tar.getmembers() if m.name.startswith(prefix) and m.name[len(prefix) :].startswith(_WANTED)
            ]
            tar.extractall(tmp, members=members, filter="data")
        os.replace(Path(tmp) / prefix, folder)
    return folder


def to_gguf(model: Path, out: Path, tree: Path, outtype: str = "f32") -> Path:
    """`model` (a Hugging Face folder) as a GGUF file `out`, written by llama.cpp's converter."""
    cmd = [sys.executable, str(tree / "convert_hf_to_gguf.py"), str(model), "--outfile", str(out)]
    done = subprocess.run([*cmd, "--outtype", outtype], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"llama.cpp's converter failed on {model}:\n{done.stderr[-3000:]}")
    return out


def _greedy_llama_cpp(llm: Any, prompt: list[int], new: int) -> list[int]:
    llm.reset()
    llm.eval(prompt)
    out = []
    for _ in range(new):
        token = int(llm.scores[llm.n_tokens - 1].argmax())
        out.append(token)
        llm.eval([token])
    return out


def compare(model: Path, gguf: Path, ids: list[int], new_tokens: int = 16, threads: int = 2) -> dict[str, Any]:
    """transformers (float32) and llama.cpp (the GGUF, f32 KV cache) on the same token ids: the KV heads each
    reads, the largest log-probability difference, argmax agreement, perplexities and greedy continuations."""
    import llama_cpp
    from transformers import AutoConfig, AutoModelForCausalLM

    llm = llama_cpp.Llama(
        model_path=str(gguf),
        n_ctx=len(ids) + new_tokens,
        n_batch=len(ids),
        n_threads=threads,
        logits_all=True,
        type_k=llama_cpp.GGML_TYPE_F32,  # the default f16 cache would round what is compared
        type_v=llama_cpp.GGML_TYPE_F32,
        verbose=False,
    )
    llm.eval(ids)
    cpp = torch.log_softmax(torch.from_numpy(llm.scores[: len(ids)].copy()).double(), -1)  # (T, V)
    hf_model = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    with torch.no_grad():
        hf = torch.log_softmax(hf_model(torch.tensor([ids])).logits[0].double(), -1)  # (T, V)
        prompt = torch.tensor([ids[: len(ids) // 2]])
        hf_greedy = hf_model.generate(prompt, do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    target = torch.tensor(ids[1:])
    config = AutoConfig.from_pretrained(model)
    arch = llm.metadata["general.architecture"]
    return {
        "kv_heads_config": config.num_key_value_heads,
        "kv_heads_gguf": int(llm.metadata[f"{arch}.attention.head_count_kv"]),
        "tokens": len(ids),
        "max_abs_logprob_diff": float((cpp - hf).abs().max()),
        "argmax_agreement": float((cpp.argmax(-1) == hf.argmax(-1)).double().mean()),
        "perplexity_transformers": math.exp(-float(hf[:-1].gather(1, target[:, None]).mean())),
        "perplexity_llama_cpp": math.exp(-float(cpp[:-1].gather(1, target[:, None]).mean())),
        "greedy_transformers": hf_greedy[0, prompt.shape[1] :].tolist(),
        "greedy_llama_cpp": _greedy_llama_cpp(llm, prompt[0].tolist(), new_tokens),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("model", type=Path, help="a Hugging Face folder (what `uptrain convert` wrote)")
    ap.add_argument("--text", type=Path, help="text to score (default: the demo corpus's first held-out play)")
    ap.add_argument("--tokens", type=int, default=512, help="tokens of the text to score (default: 512)")
    ap.add_argument("--outtype", default="f32", help="the GGUF's weight type: f32, bf16, f16, q8_0")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    from transformers import AutoTokenizer

    from uptrain_gqa.data.corpora import fetch

    text = args.text or sorted((fetch() / "heldout").glob("*.txt"))[0]
    ids = AutoTokenizer.from_pretrained(args.model)(text.read_text(encoding="utf-8"))["input_ids"][: args.tokens]
    with tempfile.TemporaryDirectory() as tmp:
        gguf = to_gguf(args.model, Path(tmp) / "model.gguf", llama_cpp_tree(), args.outtype)
        figures = {
            "model": str(args.model),
            "text": str(text),
            "outtype": args.outtype,
            **compare(args.model, gguf, ids),
        }
    figures["greedy_same"] = figures["greedy_transformers"] == figures["greedy_llama_cpp"]
    print(json.dumps(figures, indent=1))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1) + "\n")


if __name__ == "__main__":
    main()
