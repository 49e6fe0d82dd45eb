"""Export: the latest snapshot becomes a plain Hugging Face model that computes the trained model."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from coordinator.checkpoint import CheckpointStore, Snapshot
from coordinator.export import EXPORT_RECORD, ExportError, export_model
from fedbe.blocks import BlockState, get_block_state, set_block_state
from fedbe.errors import BaseModelMismatchError
from fedbe.expansion import BlockRegistry, expand_model, plan_expansion
from fedbe.fingerprint import base_fingerprint
from fedbe.sources import build_tiny_model

INPUT_IDS = torch.randint(3, 512, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def logits(model: PreTrainedModel) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=INPUT_IDS).logits


def trained_run(
    state_dir: Path, fingerprint: str | None = None
) -> tuple[PreTrainedModel, BlockRegistry, Snapshot]:
    """What a run leaves behind: tiny:llama with 2 interleaved blocks whose weights moved away from zero."""
    model = build_tiny_model("llama")  # exactly what load_model("tiny:llama") builds
    fp = base_fingerprint(model)
    registry = expand_model(model, plan_expansion(4, 2, "interleave"))
    g = torch.Generator().manual_seed(1)
    trained: BlockState = {
        b: {n: t + 0.05 * torch.randn(t.shape, generator=g) for n, t in ts.items()}
        for b, ts in get_block_state(model, registry).items()
    }
    set_block_state(model, registry, trained)
    snapshot = Snapshot(
        round=5,
        global_state=trained,
        expansion=registry.to_dict(),
        base_fingerprint=fingerprint or fp,
        model_source="tiny:llama",
        config_digest="0123456789abcdef",
    )
    CheckpointStore(state_dir).save(snapshot)
    return model, registry, snapshot


def test_export_loads_with_plain_transformers_and_computes_the_trained_model(tmp_path: Path) -> None:
    trained, registry, _ = trained_run(tmp_path / "state")
    out = export_model(tmp_path / "state", tmp_path / "export")
    assert out == tmp_path / "export"
    exported = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert exported.config.num_hidden_layers == 6
    assert exported.config.fedbe_expansion == registry.to_dict()
    got = logits(exported)
    torch.testing.assert_close(got, logits(trained), rtol=0, atol=1e-6)
    base = build_tiny_model("llama")
    assert (got - logits(base)).abs().max() > 1e-3  # the new blocks changed what the model computes
    record = json.loads((out / EXPORT_RECORD).read_text())
    assert record == {
        "round": 5,
        "base_fingerprint": base_fingerprint(base),
        "model_source": "tiny:llama",
        "config_digest": "0123456789abcdef",
        "blocks": registry.to_dict(),
    }
    assert not list(tmp_path.glob(".tmp-*"))


def test_fingerprint_mismatch_is_a_clear_error(tmp_path: Path) -> None:
    trained_run(tmp_path / "state", fingerprint="llama-4L-00000000deadbeef")
    with pytest.raises(
        BaseModelMismatchError, match=r"fingerprint llama-4L-\w{16}, but .* trained on llama-4L-00000000deadbeef"
    ) as info:
        export_model(tmp_path / "state", tmp_path / "export")
    assert info.value.expected == "llama-4L-00000000deadbeef"
    assert info.value.found == base_fingerprint(build_tiny_model("llama"))
    assert not (tmp_path / "export").exists()


def test_another_base_model_is_refused(tmp_path: Path) -> None:
    _, _, snapshot = trained_run(tmp_path / "state")
    with pytest.raises(
        BaseModelMismatchError, match=rf"tiny:mistral .*trained on {snapshot.base_fingerprint}\. Pass the base"
    ):
        export_model(tmp_path / "state", tmp_path / "export", model_source="tiny:mistral")


def test_nothing_to_export_and_occupied_output(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="holds no snapshot yet"):
        export_model(tmp_path / "empty", tmp_path / "export")
    trained_run(tmp_path / "state")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="not an empty folder"):
        export_model(tmp_path / "state", tmp_path / "busy")
    assert (tmp_path / "busy" / "keep.txt").read_text() == "mine"
