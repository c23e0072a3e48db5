"""`--method svd` and `--grouping similarity`: exact where the math says exact, never worse than mean.

Sources are built so the answer is known: heads that differ only by maps the merge may fold
(per rotary pair a complex scalar on K, any d×d map on V) must come out with the source's logits;
heads identical across non-adjacent positions must be found by similarity grouping.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from tests.families import CASES, Case, build, kv_views, load
from uptrain_gqa import convert
from uptrain_gqa.conversion.least_squares import augment, identity_sigma, merge_k, merge_v, permute_rows, query_order
from uptrain_gqa.errors import UptrainError
from uptrain_gqa.io.folders import CONVERSION_RECORD
from uptrain_gqa.model.shape import ModelShape

PER_HEAD_NORMS = {"flat", "rows", "modules"}  # query/key norms with one entry per head
# cohere without q/k norms: keys are folded, with RoPE's interleaved pairs (2j, 2j+1)
FOLD_CASES = [*CASES, Case("cohere-interleaved-rope", "cohere", 2)]


def rotary(case: Case) -> tuple[int, bool]:
    """(rotary dims per head, interleaved pairs?) as the family's modelling code applies RoPE."""
    cfg = case.config()
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    factor = (getattr(cfg, "rope_parameters", None) or {}).get("partial_rotary_factor", 1.0)
    return int(d * factor) // 2 * 2, case.model_type == "cohere"


def has_k_norm(model, case: Case) -> bool:
    attn = model.model.layers[0].self_attn
    return case.k_norm is not None or getattr(attn, "k_norm", None) is not None or hasattr(attn, "k_layernorm")


def make_foldable(model, case: Case, seed: int = 0) -> None:
    """Within each group: V heads = random d×d maps of the first head; K heads = per-rotary-pair
    complex scalars (and a map on non-rotary dims) of the first head, or copies where a key norm
    sits between the projection and RoPE (folding does not apply there)."""
    g = torch.Generator().manual_seed(seed)
    rot, interleaved = rotary(case)
    fold_k = not has_k_norm(model, case)
    for layer in range(model.config.num_hidden_layers):
        views = kv_views(model, case, layer)
        d = views["k.weight"].shape[1]
        re = torch.arange(0, rot, 2) if interleaved else torch.arange(rot // 2)
        im = re + 1 if interleaved else re + rot // 2
        rest = torch.arange(rot, d)
        r = views["k.weight"].shape[0] // case.groups
        # one map per head, shared by its weight and bias rows (they are one augmented row)
        v_maps = [torch.randn(d, d, generator=g) / d**0.5 for _ in range(r)]
        phases = [
            torch.polar(0.5 + torch.rand(len(re), generator=g), 6 * torch.rand(len(re), generator=g)) for _ in range(r)
        ]
        k_maps = [torch.randn(len(rest), len(rest), generator=g) / max(len(rest), 1) ** 0.5 for _ in range(r)]
        for role, view in views.items():
            grouped = view.unflatten(0, (case.groups, -1))  # (G, r, d, *in)
            for j in range(1, r):
                first = grouped[:, 0]
                if role.startswith("v"):
                    grouped[:, j] = torch.einsum("ab,gb...->ga...", v_maps[j], first)
                elif not fold_k or role == "k_norm":
                    grouped[:, j] = first
                else:
                    c = phases[j].view(-1, *([1] * (first.dim() - 2)))
                    z = torch.complex(first[:, re], first[:, im]) * c
                    grouped[:, j, re], grouped[:, j, im] = z.real, z.imag
                    if len(rest):
                        grouped[:, j, rest] = torch.einsum("ab,gb...->ga...", k_maps[j], first[:, rest])
            if role == "k_norm" and case.k_norm == "modules":  # kv_views stacks a copy: write back
                for h, m in enumerate(model.model.layers[layer].self_attn.k_layernorm.norms):
                    m.weight.data.copy_(view[h])


def logits(folder, vocab: int) -> torch.Tensor:
    ids = torch.randint(3, vocab, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return load(folder)(ids).logits


@pytest.mark.parametrize("case", FOLD_CASES, ids=[c.id for c in FOLD_CASES])
def test_svd_folds_allowed_maps_exactly(case: Case, tmp_path) -> None:
    model = build(case)
    make_foldable(model, case)
    model.save_pretrained(tmp_path / "src")
    convert(src=str(tmp_path / "src"), out=str(tmp_path / "svd"), num_kv_heads=case.groups, method="svd",
            calibration="none")  # fmt: skip
    convert(src=str(tmp_path / "src"), out=str(tmp_path / "mean"), num_kv_heads=case.groups)
    vocab = case.config().vocab_size
    src, svd, mean = (logits(tmp_path / f, vocab) for f in ("src", "svd", "mean"))
    assert (svd - src).abs().max() <= 2e-4 * (1 + src.abs().max())
    assert (mean - src).abs().max() > 1e-2  # control: mean pooling cannot undo the maps
    report = json.loads((tmp_path / "svd" / CONVERSION_RECORD).read_text())
    assert report["method"] == "svd" and len(report["merge_errors"]) == case.config().num_hidden_layers
    for layer in report["merge_errors"]:
        assert layer["k"]["folded"] == (not has_k_norm(model, case))
        for side in ("k", "v"):
            assert layer[side]["error"] <= layer[side]["mean_pooling_error"] + 1e-6


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_similarity_grouping_finds_scattered_twins(case: Case, tmp_path) -> None:
    """Head j copies head j mod G: contiguous groups mix different heads, similarity groups don't."""
    model = build(case)
    for layer in range(model.config.num_hidden_layers):
        for role, view in kv_views(model, case, layer).items():
            if role != "k_norm":
                view[case.groups :] = view[: case.groups].repeat(
                    view.shape[0] // case.groups - 1, *[1] * (view.dim() - 1)
                )
    model.save_pretrained(tmp_path / "src")
    if case.k_norm in PER_HEAD_NORMS:
        with pytest.raises(UptrainError, match="similarity cannot reorder the per-head"):
            convert(
                src=str(tmp_path / "src"), out=str(tmp_path / "out"), num_kv_heads=case.groups, grouping="similarity"
            )
        assert not (tmp_path / "out").exists()
        return
    convert(src=str(tmp_path / "src"), out=str(tmp_path / "out"), num_kv_heads=case.groups, grouping="similarity",
            calibration="none")  # fmt: skip
    convert(src=str(tmp_path / "src"), out=str(tmp_path / "contig"), num_kv_heads=case.groups)
    vocab = case.config().vocab_size
    src, out, contig = (logits(tmp_path / f, vocab) for f in ("src", "out", "contig"))
    if case.groups == 1:  # MQA: one group holds every head, whatever the order
        assert (out - contig).abs().max() <= 1e-4 * (1 + contig.abs().max())
        return
    assert (out - src).abs().max() <= 1e-4 * (1 + src.abs().max())
    assert (contig - src).abs().max() > 1e-2


def test_permuting_heads_changes_no_output(tmp_path) -> None:
    """G = H: the permutation alone (query rows, o_proj columns, K/V rows) is exact."""
    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
                      num_key_value_heads=4, vocab_size=96, attention_bias=True)  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    ids = torch.randint(3, 96, (2, 16))
    with torch.no_grad():
        before = model(ids).logits
        for layer in model.model.layers:
            a, order = layer.self_attn, [2, 0, 3, 1]
            qo = query_order(order, 2)
            for proj, o in ((a.q_proj, qo), (a.k_proj, order), (a.v_proj, order)):
                proj.weight.copy_(permute_rows(proj.weight, o, 8))
                proj.bias.copy_(permute_rows(proj.bias, o, 8))
            a.o_proj.weight.copy_(permute_rows(a.o_proj.weight.T, qo, 8).T)
        after = model(ids).logits
    assert (after - before).abs().max() <= 1e-5


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("rotary_dim,pairs", [(16, "half"), (8, "half"), (16, "interleaved")])
def test_merge_error_never_above_mean_pooling(seed: int, rotary_dim: int, pairs: str) -> None:
    g = torch.Generator().manual_seed(seed)
    shape = ModelShape(layers=1, hidden=32, heads=8, kv_heads=4, head_dim=16, rotary_dim=rotary_dim)
    groups = [1, 2][seed % 2]
    k, v = (augment(torch.randn(64, 32, generator=g), torch.randn(64, generator=g)) for _ in range(2))
    q, o = augment(torch.randn(128, 32, generator=g), None), torch.randn(32, 128, generator=g)
    x = torch.randn(500, 32, generator=g) @ torch.randn(32, 32, generator=g)  # correlated inputs
    xt = torch.cat([x, torch.ones(500, 1)], 1)
    for sigma in (identity_sigma(32), xt.T @ xt / 500):
        _, _, k_err, k_mean = merge_k(k, q, shape, groups, pairs, sigma)
        _, _, v_err, v_mean = merge_v(v, o, shape, groups, sigma)
        assert k_err <= k_mean + 1e-6 and v_err <= v_mean + 1e-6
        assert k_err < 0.99 * k_mean and v_err < 0.99 * v_mean  # and strictly better on random heads


def test_calibrated_svd_through_the_cli(llama, tmp_path, run_cli) -> None:
    """--calibration runs the source on text, weights the merge by Σ, and says so in the report."""
    from uptrain_gqa.synthetic import save_word_tokenizer, write_corpus

    save_word_tokenizer(llama)
    text = write_corpus(tmp_path / "calib.jsonl", docs=40, fmt="jsonl")
    code, _, err = run_cli("convert", str(llama), str(tmp_path / "out"), "--num-kv-heads", "2", "--method", "svd",
                           "--grouping", "similarity", "--calibration", str(text), "--calibration-tokens", "500",
                           "--quiet")  # fmt: skip
    assert code == 0, err
    report = json.loads((tmp_path / "out" / CONVERSION_RECORD).read_text())
    calib = report["calibration"]
    assert calib["data"] == [str(text)] and calib["kind"] == "text" and calib["tokens"] == 500
    own, *broad = calib["sources"]  # uptrain:broad mixed in by default, half the tokens
    assert (own["data"], own["kind"], own["label"], own["tokens"]) == (str(text), "files", "calib", 250)
    assert {s["data"].split(".")[0] for s in broad} == {"uptrain:broad"} and sum(s["tokens"] for s in broad) == 250
    assert calib["tokens_used"] == 500 and calib["device"].startswith("cpu") and report["grouping"] == "similarity"
    for layer in report["merge_errors"]:
        assert sorted(h for grp in layer["groups"] for h in grp) == list(range(8))
        for side in ("k", "v"):
            assert layer[side]["error"] < layer[side]["mean_pooling_error"]
    load(tmp_path / "out")  # loads unchanged
    code, _, err = run_cli("convert", str(llama), str(tmp_path / "bad"), "--num-kv-heads", "2", "--method", "svd",
                           "--calibration", str(tmp_path / "missing.txt"))  # fmt: skip
    assert code == 1 and "missing.txt" in err and not (tmp_path / "bad").exists()


@pytest.mark.parametrize("rotary_dim", [16, 8])
def test_merged_heads_keep_the_scales_of_the_heads_they_replace(rotary_dim: int) -> None:
    """The shared head is re-expressed so its maps preserve norms on average: it does not take o_proj's scale (V
    times o_proj's norm, o_proj divided by it, made uptraining steps on o_proj outsized), and merging identical
    heads gives back a head of the same norm with the queries and o_proj unchanged in norm."""
    g = torch.Generator().manual_seed(0)
    shape = ModelShape(layers=1, hidden=32, heads=8, kv_heads=4, head_dim=16, rotary_dim=rotary_dim)
    v = augment(torch.randn(64, 32, generator=g), None)
    o = torch.randn(32, 128, generator=g)
    sigma = identity_sigma(32)
    v_new, o_new, _, _ = merge_v(v, o, shape, 1, sigma)
    v_big, o_big, _, _ = merge_v(v, 1000 * o, shape, 1, sigma)
    torch.testing.assert_close(v_big, v_new, rtol=1e-3, atol=1e-3)  # o_proj's scale stays in o_proj
    torch.testing.assert_close(o_big, 1000 * o_new, rtol=1e-3, atol=1e-2)
    assert 0.5 < v_new.norm() / (v.norm() / 2) < 2  # one head of the four's typical norm
    one = v[:16].repeat(4, 1)  # four copies of one head (GQA -> fewer heads that repeat_kv made equal)
    v_same, o_same, err, _ = merge_v(one, o, shape, 1, sigma)
    assert err < 1e-6 and float(v_same.norm()) == pytest.approx(float(v[:16].norm()), rel=1e-4)
    assert float(o_same.norm()) == pytest.approx(float(o.norm()), rel=1e-4)  # the maps folded into it are rotations
    k = v[:16].repeat(4, 1)
    q = augment(torch.randn(128, 32, generator=g), None)
    k_same, q_same, _, _ = merge_k(k, q, shape, 1, "half", sigma)
    assert float(k_same.norm()) == pytest.approx(float(k[:16].norm()), rel=1e-4)
    assert float(q_same.norm()) == pytest.approx(float(q.norm()), rel=1e-4)
