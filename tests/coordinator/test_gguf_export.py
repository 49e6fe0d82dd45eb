"""GGUF export: the file loads with transformers' GGUF loader and computes the trained model.

The test model is tiny:llama's config with SmolLM2's real tokenizer (49,152 tokens, read offline
from the packaged GGUF) saved as a Hugging Face folder, so both the architecture and the tokenizer
go through the same paths as a real base.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

from coordinator.checkpoint import CheckpointStore, Snapshot
from coordinator.cli import build_parser, main
from coordinator.export import EXPORT_RECORD, ExportError, export_gguf, export_model
from coordinator.gguf_export import (
    EXPORT_KEY,
    GGUF_TYPES,
    GGUFExportError,
    check_supported,
    permute_for_rope,
    tokenizer_fields_from_gguf,
    tokenizer_fields_from_hf,
    write_gguf,
)
from fedbe.blocks import BlockState, get_block_state, set_block_state
from fedbe.expansion import expand_model, plan_expansion
from fedbe.fingerprint import base_fingerprint
from fedbe.sources import build_tiny_model, load_model, smollm2_gguf_path

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Federated blocks, round 12: 3.5% better?"]
# max |logit difference| / max |logit| of the HF export; measured 6e-4 (f16) and 1.7e-2 (q8_0).
TOLERANCE = {"f16": 2e-3, "q8_0": 5e-2}
# share of positions whose most likely next token agrees; measured 1.0 (f16) and 0.93 (q8_0).
ARGMAX_AGREEMENT = {"f16": 0.95, "q8_0": 0.8}


@dataclass(frozen=True)
class Run:
    root: Path
    state: Path
    hf_export: Path
    tokenizer: object


def _save_run(state: Path, model: PreTrainedModel, source: str) -> None:
    """What a run over ``model`` leaves behind: 2 interleaved blocks whose weights moved away from zero."""
    fingerprint = base_fingerprint(model)
    registry = expand_model(model, plan_expansion(model.config.num_hidden_layers, 2, "interleave"))
    g = torch.Generator().manual_seed(1)
    trained: BlockState = {
        b: {n: t + 0.05 * torch.randn(t.shape, generator=g) for n, t in ts.items()}
        for b, ts in get_block_state(model, registry).items()
    }
    set_block_state(model, registry, trained)
    CheckpointStore(state).save(
        Snapshot(
            round=5,
            global_state=trained,
            expansion=registry.to_dict(),
            base_fingerprint=fingerprint,
            model_source=source,
            config_digest="0123456789abcdef",
        )
    )


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """A tiny Llama with SmolLM2's tokenizer as a Hugging Face folder, a run over it, its HF export."""
    root = tmp_path_factory.mktemp("gguf")
    packaged = smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(str(packaged.parent), gguf_file=packaged.name)
    base = build_tiny_model("llama", vocab_size=len(tokenizer))
    base.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    _save_run(root / "state", load_model(str(root / "base")), str(root / "base"))
    return Run(root, root / "state", export_model(root / "state", root / "hf"), tokenizer)


def _logits(model: PreTrainedModel, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids).logits


@pytest.mark.parametrize("gguf_type", ["f16", "q8_0"])
def test_gguf_loads_with_transformers_and_computes_the_trained_model(run: Run, gguf_type: str) -> None:
    out = export_gguf(run.state, run.root / f"model-{gguf_type}.gguf", gguf_type=gguf_type)
    loaded = AutoModelForCausalLM.from_pretrained(
        str(out.parent), gguf_file=out.name, dtype=torch.float32
    ).eval()
    assert loaded.config.num_hidden_layers == 6

    reference = AutoModelForCausalLM.from_pretrained(str(run.hf_export)).eval()
    input_ids = run.tokenizer(TEXTS, return_tensors="pt", padding=True)["input_ids"]  # type: ignore[operator]
    want, got = _logits(reference, input_ids), _logits(loaded, input_ids)
    assert (got - want).abs().max() <= TOLERANCE[gguf_type] * want.abs().max()
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= ARGMAX_AGREEMENT[gguf_type]

    reader = gguf.GGUFReader(out)
    types = {t.name: t.tensor_type for t in reader.tensors}
    matrix = gguf.GGMLQuantizationType.F16 if gguf_type == "f16" else gguf.GGMLQuantizationType.Q8_0
    assert types["blk.5.attn_q.weight"] == types["token_embd.weight"] == matrix
    assert types["blk.5.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    assert "output.weight" not in types  # tied embeddings
    record = json.loads(reader.fields[EXPORT_KEY].contents())
    assert record == json.loads((run.hf_export / EXPORT_RECORD).read_text())

    text = "Hello world 2024, <|im_start|>user"
    again = AutoTokenizer.from_pretrained(str(out.parent), gguf_file=out.name)
    assert again(text)["input_ids"] == run.tokenizer(text)["input_ids"]  # type: ignore[operator]


def test_qwen2_keeps_its_layout_and_biases(run: Run, tmp_path: Path) -> None:
    base = build_tiny_model("qwen2", vocab_size=len(run.tokenizer), use_sliding_window=False)  # type: ignore[arg-type]
    base.save_pretrained(tmp_path / "base")
    run.tokenizer.save_pretrained(tmp_path / "base")  # type: ignore[attr-defined]
    _save_run(tmp_path / "state", load_model(str(tmp_path / "base")), str(tmp_path / "base"))
    out = export_gguf(tmp_path / "state", tmp_path / "qwen2.gguf")
    loaded = AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file=out.name, dtype=torch.float32
    ).eval()
    assert (loaded.config.model_type, loaded.config.num_hidden_layers) == ("qwen2", 6)
    reference = AutoModelForCausalLM.from_pretrained(str(export_model(tmp_path / "state", tmp_path / "hf")))
    input_ids = run.tokenizer(TEXTS, return_tensors="pt", padding=True)["input_ids"]  # type: ignore[operator]
    want, got = _logits(reference.eval(), input_ids), _logits(loaded, input_ids)
    assert (got - want).abs().max() <= TOLERANCE["f16"] * want.abs().max()
    assert "blk.5.attn_q.bias" in {t.name for t in gguf.GGUFReader(out).tensors}


def test_a_gguf_base_lends_its_tokenizer_keys_unchanged(run: Run, tmp_path: Path) -> None:
    base = load_model(str(run.root / "base"))
    write_gguf(base, tmp_path / "base.gguf", "f16", tokenizer_fields_from_hf(run.root / "base", 49152), {})
    _save_run(tmp_path / "state", load_model(str(tmp_path / "base.gguf")), str(tmp_path / "base.gguf"))
    out = export_gguf(tmp_path / "state", tmp_path / "out.gguf", gguf_type="q8_0")
    assert tokenizer_fields_from_gguf(out) == tokenizer_fields_from_gguf(tmp_path / "base.gguf")
    reader = gguf.GGUFReader(out)
    assert reader.fields["llama.block_count"].contents() == 6


def test_permutation_is_what_transformers_undoes() -> None:
    weight = np.arange(8 * 3 * 5, dtype=np.float32).reshape(8 * 3, 5)  # 3 heads of dim 8
    permuted = permute_for_rope(weight, 3)
    assert not np.array_equal(permuted, weight)
    undone = LlamaTensorProcessor()._reverse_permute_weights(permuted, 3)
    np.testing.assert_array_equal(undone, weight)


def test_a_tiny_source_has_no_tokenizer_for_gguf(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _save_run(tmp_path / "state", build_tiny_model("llama"), "tiny:llama")
    with pytest.raises(GGUFExportError, match=r"tiny:llama has fedbe's byte tokenizer .* --format hf"):
        export_gguf(tmp_path / "state", tmp_path / "out.gguf")
    state, out = str(tmp_path / "state"), str(tmp_path / "out.gguf")
    assert main(["export", "--state", state, "--out", out, "--format", "gguf", "--gguf-type", "q8_0"]) == 1
    assert "byte tokenizer" in capsys.readouterr().err
    assert main(["export", "--state", state, "--out", str(tmp_path / "hf"), "--gguf-type", "q8_0"]) == 1
    assert "--gguf-type applies to --format gguf only" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".tmp-*"))
    assert not (tmp_path / "hf").exists()


def test_unsupported_architecture_and_output_names_are_refused(tmp_path: Path) -> None:
    with pytest.raises(
        GGUFExportError, match=r"supports the llama and qwen2 architectures, not 'gpt2'; .* hf"
    ):
        check_supported(build_tiny_model("gpt2"))
    with pytest.raises(GGUFExportError, match=r"qwen2 model uses sliding-window attention, .* --format hf"):
        check_supported(build_tiny_model("qwen2"))  # tiny:qwen2 slides its window on some layers
    with pytest.raises(ExportError, match=r"one file; name it NAME\.gguf"):
        export_gguf(tmp_path / "state", tmp_path / "out")
    with pytest.raises(ExportError, match=r"unknown GGUF type 'q4_k'; choose one of f16, q8_0"):
        export_gguf(tmp_path / "state", tmp_path / "out.gguf", gguf_type="q4_k")
    (tmp_path / "taken.gguf").write_bytes(b"mine")
    with pytest.raises(ExportError, match="already exists"):
        export_gguf(tmp_path / "state", tmp_path / "taken.gguf")
    assert (tmp_path / "taken.gguf").read_bytes() == b"mine"


def test_a_pre_tokenizer_llama_cpp_can_not_name_is_refused(run: Run, tmp_path: Path) -> None:
    folder = tmp_path / "tok"
    run.tokenizer.save_pretrained(folder)  # type: ignore[attr-defined]
    spec = json.loads((folder / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = {"type": "Whitespace"}
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(GGUFExportError, match=r"pre-tokenizer .*Whitespace.* not one fedbe can name"):
        tokenizer_fields_from_hf(folder, 49152)


def test_the_cli_offers_every_gguf_type() -> None:
    subcommands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    option = next(a for a in subcommands.choices["export"]._actions if a.dest == "gguf_type")
    assert tuple(option.choices or ()) == tuple(GGUF_TYPES)
