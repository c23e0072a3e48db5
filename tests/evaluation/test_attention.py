"""uptrain_sdpa: the same logits as transformers' sdpa, and a decode step that reads each shared K/V
head once — without repeat_kv even under torch.compile, where transformers' sdpa repeats them."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, StaticCache
from transformers.integrations import sdpa_attention

from uptrain_gqa.evaluation.attention import register
from uptrain_gqa.evaluation.generation import cache_keyword

CONFIG = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
              num_key_value_heads=2, vocab_size=96, max_position_embeddings=128)  # fmt: skip


@pytest.fixture
def model() -> LlamaForCausalLM:
    register()
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**CONFIG)).eval()


def decode(model, impl: str, compiled: bool = False, steps: int = 4) -> torch.Tensor:
    """Logits of a 20-token prefill and `steps` greedy decode steps with a static cache, (steps+1, B, V)."""
    model.set_attn_implementation(impl)
    cache = StaticCache(config=model.config, max_cache_len=32)
    ids = torch.randint(0, CONFIG["vocab_size"], (3, 20), generator=torch.Generator().manual_seed(1))
    step = torch.compile(model.forward, fullgraph=True, dynamic=False) if compiled else model.forward
    keyword = cache_keyword(model)  # past_key_values, or cache where transformers renamed it
    with torch.no_grad():
        out = model(ids, **{keyword: cache}, use_cache=True, cache_position=torch.arange(20))
        logits = [out.logits[:, -1]]
        for i in range(steps):
            nxt = logits[-1].argmax(-1, keepdim=True)
            out = step(nxt, **{keyword: cache}, use_cache=True, cache_position=torch.tensor([20 + i]))
            logits.append(out.logits[:, -1])
    return torch.stack(logits)


def test_the_same_logits_as_transformers_sdpa(model) -> None:
    torch.testing.assert_close(decode(model, "uptrain_sdpa"), decode(model, "sdpa"), atol=1e-5, rtol=1e-5)


@pytest.mark.slow  # torch.compile on a CPU: ~26 s; the eager decode parity above runs by default
def test_a_compiled_decode_step_never_repeats_kv(model, monkeypatch) -> None:
    repeats = []
    original = sdpa_attention.repeat_kv

    def counted(hidden, n_rep):
        repeats.append(n_rep)  # runs while dynamo traces: one entry per repeat in the compiled graph
        return original(hidden, n_rep)

    monkeypatch.setattr(sdpa_attention, "repeat_kv", counted)
    torch._dynamo.reset()
    reference = decode(model, "sdpa", compiled=True, steps=2)
    assert repeats, "transformers' sdpa repeats K/V in a compiled decode step (else this test proves nothing)"
    repeats.clear()
    torch._dynamo.reset()
    ours = decode(model, "uptrain_sdpa", compiled=True, steps=2)
    assert repeats == [], "uptrain_sdpa reads the G cached heads as they are"
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)
