"""Every supported family: convert a tiny sharded checkpoint and check it against transformers."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tests.families import CASES, Case, build, kv_views, load, make_heads_identical, mean_pool, tensors
from uptrain_gqa import convert
from uptrain_gqa.evaluation.generation import returned_cache
from uptrain_gqa.io.folders import CONVERSION_RECORD


@dataclass
class Converted:
    case: Case
    src: Path
    out: Path
    ident_src: Path
    ident_out: Path


@pytest.fixture(scope="module", params=CASES, ids=[c.id for c in CASES])
def converted(request, tmp_path_factory) -> Converted:
    case: Case = request.param
    root = tmp_path_factory.mktemp(case.id)
    build(case).save_pretrained(root / "src", max_shard_size="30KB")
    ident = build(case, seed=1)
    make_heads_identical(ident, case)
    ident.save_pretrained(root / "ident-src", max_shard_size="30KB")
    assert len(list((root / "src").glob("*.safetensors"))) > 1, "the source must be sharded"
    for src, out in (("src", "out"), ("ident-src", "ident-out")):
        convert(src=str(root / src), out=str(root / out), num_kv_heads=case.groups, max_shard_size="40KB")
    return Converted(case, root / "src", root / "out", root / "ident-src", root / "ident-out")


def test_kv_heads_equal_mean_pool_reference(converted: Converted) -> None:
    case = converted.case
    source, result = load(converted.src), load(converted.out)
    assert result.config.num_key_value_heads == case.groups
    for layer in range(source.config.num_hidden_layers):
        before, after = kv_views(source, case, layer), kv_views(result, case, layer)
        assert before.keys() == after.keys()
        for role, view in before.items():
            assert after[role].shape[0] == case.groups
            torch.testing.assert_close(after[role], mean_pool(view, case.groups), rtol=0, atol=1e-6, msg=role)
        if case.layout == "stacked":  # the query rows of a fused projection pass through untouched
            q_rows = source.config.hidden_size  # H · head_dim for phi3
            w_before = source.model.layers[layer].self_attn.qkv_proj.weight
            w_after = result.model.layers[layer].self_attn.qkv_proj.weight
            assert torch.equal(w_after[:q_rows], w_before[:q_rows])


def test_other_tensors_are_byte_identical(converted: Converted) -> None:
    case = converted.case
    before, after = tensors(converted.src), tensors(converted.out)
    rewritten = {name for name in before if re.search(case.rewritten, name)}
    assert rewritten, "the case's pattern must match the attention tensors"
    assert set(after) <= set(before)
    assert set(before) - set(after) <= rewritten  # only per-head modules beyond G may go
    for name in rewritten & set(after):
        assert not torch.equal(after[name], before[name]), f"{name} was expected to be rewritten"
    for name in set(after) - rewritten:
        assert after[name].dtype == before[name].dtype, name
        assert after[name].shape == before[name].shape, name
        assert torch.equal(after[name].view(torch.uint8), before[name].view(torch.uint8)), name


def test_config_changes_only_the_kv_field(converted: Converted) -> None:
    before = json.loads((converted.src / "config.json").read_text())
    after = json.loads((converted.out / "config.json").read_text())
    diff = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    assert diff == {"num_key_value_heads"}
    assert after["num_key_value_heads"] == converted.case.groups


def test_identical_heads_keep_the_logits(converted: Converted) -> None:
    """A source whose heads already agree within each group loses nothing by pooling."""
    ids = torch.randint(3, converted.case.config().vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ident_src, ident_out = load(converted.ident_src)(ids).logits, load(converted.ident_out)(ids).logits
        rand_src, rand_out = load(converted.src)(ids).logits, load(converted.out)(ids).logits
    assert (ident_out - ident_src).abs().max() <= 1e-5
    # control: pooling heads that differ does move the logits, so the check above can fail
    assert (rand_out - rand_src).abs().max() > 1e-3


def test_generate_caches_g_heads_per_layer(converted: Converted) -> None:
    model = load(converted.out)
    ids = torch.tensor([[1, 5, 7, 9, 11]])
    out = model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    assert out.sequences.shape == (1, 9)
    layers = returned_cache(out).layers
    assert len(layers) == model.config.num_hidden_layers
    for layer in layers:
        assert layer.keys.shape[1] == converted.case.groups
        assert layer.values.shape[1] == converted.case.groups


def test_report_describes_the_conversion(converted: Converted) -> None:
    report = json.loads((converted.out / CONVERSION_RECORD).read_text())
    case, cfg = converted.case, converted.case.config()
    kv = cfg.num_key_value_heads
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    assert report["source"] == {"path": str(converted.src.resolve())}
    assert (report["source_num_kv_heads"], report["num_kv_heads"]) == (kv, case.groups)
    assert report["kv_cache_bytes_per_token"] == {
        "before": 2 * cfg.num_hidden_layers * kv * d * 4,
        "after": 2 * cfg.num_hidden_layers * case.groups * d * 4,
    }
    assert report["parameters"]["before"] == load(converted.src).num_parameters()
    assert report["parameters"]["after"] == load(converted.out).num_parameters()
    flat = [h for g in report["group_map"] for h in g["query_heads"]]
    assert flat == list(range(cfg.num_attention_heads))
    r = cfg.num_attention_heads // case.groups
    assert all(g["query_heads"][0] // r == g["kv_head"] for g in report["group_map"])
