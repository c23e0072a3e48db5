"""Model cards name the source, G, method, α and tokens; licences travel; --push-to-hub uploads the
folder to a private repo (against a stand-in for the Hub API: the tests never reach the network)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

import pytest
import yaml
from huggingface_hub import ModelCard

from uptrain_gqa.io.hub import push_folder


class FakeHub:
    """Records what uptrain asks of huggingface_hub.HfApi, and keeps a copy of what it uploads."""

    calls: ClassVar[list[tuple[str, dict]]] = []

    def create_repo(self, repo_id: str, **kwargs) -> None:
        self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))

    def upload_folder(self, *, folder_path: str, repo_id: str, **kwargs) -> None:
        files = sorted(p.name for p in Path(folder_path).iterdir())
        self.calls.append(("upload_folder", {"repo_id": repo_id, "files": files, **kwargs}))


@pytest.fixture
def hub(monkeypatch) -> type[FakeHub]:
    import huggingface_hub

    FakeHub.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHub)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return FakeHub


@pytest.mark.writes_tiny_build
def test_the_trained_models_card_names_source_g_method_alpha_and_tokens(run_cli, tiny_run: dict, hub) -> None:
    (tiny_run["model"] / "LICENSE").write_text("the source's terms")
    config = tiny_run["root"] / "run.yaml"
    cfg = {**tiny_run["config"], "budget": {"fraction": 0.05, "original_tokens": 100_000}}
    config.write_text(yaml.safe_dump(cfg))
    code, _, err = run_cli("train", config, "--push-to-hub", "someone/tiny-gqa2")
    assert code == 0, err
    model = Path(cfg["out"]) / "model"
    card = ModelCard.load(model / "README.md")
    assert card.data.base_model is None and "uptrain" in card.data.tags  # a local source has no Hub id to name
    for fact in ("8 KV heads", "Converted to:** 2 KV heads by `mean`", "tokens:** 5,120", "fraction of the original"):
        assert fact in card.text, fact
    assert "0.0512" in card.text  # α = 5,120 / 100,000
    assert (model / "LICENSE").read_text() == "the source's terms"
    create, upload = hub.calls
    assert create == ("create_repo", {"repo_id": "someone/tiny-gqa2", "private": True, "exist_ok": True,
                                      "repo_type": "model"})  # fmt: skip
    assert upload[1]["repo_id"] == "someone/tiny-gqa2" and "README.md" in upload[1]["files"]
    assert "model.safetensors" in upload[1]["files"] and f"pushed {model}" in err


def test_push_is_refused_before_any_work_when_it_cannot_work(run_cli, tiny_run: dict, monkeypatch) -> None:
    config = tiny_run["root"] / "run.yaml"
    config.write_text(yaml.safe_dump(tiny_run["config"]))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, err = run_cli("train", config, "--push-to-hub", "someone/x")
    assert code == 1 and "HF_HUB_OFFLINE is set" in err
    assert not Path(tiny_run["config"]["out"]).exists(), "refused before training"
    monkeypatch.delenv("HF_HUB_OFFLINE")
    code, _, err = run_cli("train", config, "--push-to-hub", "not a repo")
    assert code == 1 and "give a repo id like your-name/model-gqa8" in err
    for name in ("me/a--b", "me/a..b", "me/-x", "me/x.", "me/" + "x" * 120, "me/x.git"):  # the Hub's own rules
        code, _, err = run_cli("train", config, "--push-to-hub", name)
        assert code == 1 and f"--push-to-hub {name}: " in err and len(err.strip().splitlines()) == 1, err
        assert not Path(tiny_run["config"]["out"]).exists(), "refused before training"


class TransportError(Exception):
    """As the Hub client's HTTP library names its network errors (not OSErrors)."""


class ConnectError(TransportError):
    pass


@pytest.mark.parametrize("error", [ConnectionError, ConnectError])
def test_an_unreachable_hub_says_the_folder_is_complete(tmp_path: Path, monkeypatch, error: type) -> None:
    import huggingface_hub

    class Offline(FakeHub):
        def create_repo(self, repo_id: str, **kwargs) -> None:
            raise error("[Errno -2] Name or service not known")

    monkeypatch.setattr(huggingface_hub, "HfApi", Offline)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    from uptrain_gqa.errors import UptrainError

    with pytest.raises(UptrainError, match=r"cannot reach the Hugging Face Hub .* is complete locally"):
        push_folder(tmp_path, "someone/x")


def test_a_converted_models_card_keeps_the_sources_licence_and_card(run_cli, tmp_path: Path, hub) -> None:
    from uptrain_gqa.synthetic import save_tiny_llama

    src = save_tiny_llama(tmp_path / "src", shard=None)
    (src / "README.md").write_text("---\nlicense: llama2\n---\n\n# The source\n\nIntended use: research.\n")
    (src / "LICENSE.txt").write_text("the source's terms")
    out = tmp_path / "out"
    code, _, err = run_cli("convert", src, out, "--num-kv-heads", "2", "--quiet", "--push-to-hub", "someone/src-gqa2")
    assert code == 0, err
    card = ModelCard.load(out / "README.md")
    assert card.data.license == "llama2" and card.data.base_model is None  # a local folder is no Hub id
    assert "Converted to:** 2 KV heads by `mean`" in card.text and "Intended use: research." in card.text
    assert (out / "LICENSE.txt").read_text() == "the source's terms"
    record = json.loads((out / "uptrain_conversion.json").read_text())
    assert record["environment"]["versions"]["torch"]
    assert [c[0] for c in hub.calls] == ["create_repo", "upload_folder"] and hub.calls[0][1]["private"] is True


def test_a_source_card_that_is_not_utf8_is_kept_and_loses_nothing(run_cli, tmp_path: Path) -> None:
    """A Latin-1 README.md: the conversion finished, then UnicodeDecodeError lost it."""
    from uptrain_gqa.synthetic import save_tiny_llama

    src = save_tiny_llama(tmp_path / "src", shard=None)
    (src / "README.md").write_bytes("# Modèle source\n\nUsage: recherche, café.\n".encode("latin-1"))
    out = tmp_path / "out"
    code, _, err = run_cli("convert", src, out, "--num-kv-heads", "2", "--quiet")
    assert code == 0, err
    assert "Usage: recherche, caf\ufffd." in (out / "README.md").read_text()


def test_a_converted_models_card_is_hub_metadata_naming_the_real_base_model(run_cli, tmp_path: Path) -> None:
    """base_model is the Hub id the source's config was saved with (or --base-model), never a local folder's
    name; the card's metadata parses as huggingface_hub's; the method, calibration and refinement are in words,
    with a usage snippet; the source's own uptrain_* records are not copied."""
    from huggingface_hub import ModelCardData, metadata_load
    from huggingface_hub.utils import validate_repo_id

    from uptrain_gqa.synthetic import save_tiny_llama

    src = save_tiny_llama(tmp_path / "src", shard=None)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "_name_or_path": "someorg/tiny-mha"}))
    (src / "uptrain_train.yaml").write_text("another run's config")
    out = tmp_path / "out"
    code, _, err = run_cli("convert", src, out, "--num-kv-heads", "2", "--method", "svd", "--calibration", "random",
                           "--calibration-tokens", "256", "--refine-steps", "2")  # fmt: skip
    assert code == 0, err
    meta = metadata_load(out / "README.md")
    data = ModelCardData(**meta)
    validate_repo_id(data.base_model)
    assert data.base_model == "someorg/tiny-mha" and data.library_name == "transformers"
    text = ModelCard.load(out / "README.md").text
    for fact in ("## Usage", "AutoModelForCausalLM.from_pretrained", "2 KV heads by `svd`", "256 random tokens",
                 "trained for 2 steps"):  # fmt: skip
        assert fact in text, fact
    assert not (out / "uptrain_train.yaml").exists()
    code, _, err = run_cli("convert", src, tmp_path / "named", "--num-kv-heads", "2", "--base-model", "org/real")
    assert code == 0 and ModelCard.load(tmp_path / "named" / "README.md").data.base_model == "org/real", err
    code, _, err = run_cli("convert", src, tmp_path / "bad", "--num-kv-heads", "2", "--base-model", "not a/repo id")
    assert code == 1 and err.count("\n") == 1 and "--base-model 'not a/repo id' is not a Hub model id" in err
    assert not (tmp_path / "bad").exists()
