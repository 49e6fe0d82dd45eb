"""Write a trained, expanded model as one GGUF file that llama.cpp-style runtimes load.

The expanded model is an ordinary Llama (or Qwen2) with more layers, so the file is what
llama.cpp's own ``convert_hf_to_gguf.py`` would write for it:

* architecture metadata from the model's config, ``block_count`` being the expanded layer count;
* the tensors under llama.cpp's names, taken from the ``gguf`` package's
  :class:`gguf.TensorNameMap` (``model.layers.7.self_attn.q_proj.weight`` -> ``blk.7.attn_q.weight``);
  for Llama, the Q and K projections permuted the way llama.cpp's rotary embedding expects them
  (the interleaved-pairs layout; transformers' GGUF loader permutes them back), while Qwen2 keeps
  Hugging Face's layout (llama.cpp runs it with the NeoX rotary layout);
* 1-D tensors (norms) in float32, the matrices in float16 (``f16``) or 8-bit blocks (``q8_0``;
  a matrix whose rows are not a whole number of 32-value blocks falls back to float16, as in
  llama.cpp's converter); a tied output head is not written (runtimes reuse ``token_embd``);
* the tokenizer (see :func:`tokenizer_fields`): copied key by key from a ``.gguf`` base (the
  packaged ``smollm2-135m`` is one), or built from a Hugging Face folder's GPT-2-style byte-level
  BPE ``tokenizer.json`` with the ``gguf`` package's own ``BpeVocab`` and ``SpecialVocab``;
* ``fedbe.export``: the export record (round, base fingerprint, blocks) as a JSON string.

Llama and Qwen2 are written (:data:`ARCHITECTURES`); anything else, and any feature GGUF readers
of those architectures would silently drop (biases on a Llama, rope scaling, Qwen2's sliding
window), is refused with an error that says so.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from transformers import PretrainedConfig, PreTrainedModel

from fedbe.errors import FedbeError
from fedbe.sources import ModelSource, hub_cache_folder

log = logging.getLogger(__name__)

GGUF_TYPES: dict[str, tuple[gguf.GGMLQuantizationType, gguf.LlamaFileType]] = {
    "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}


@dataclass(frozen=True)
class Architecture:
    """How one Hugging Face ``model_type`` is written: its llama.cpp architecture, whether its Q/K
    rows are permuted for llama.cpp's rotary layout, whether q/k/v biases belong to it."""

    arch: gguf.MODEL_ARCH
    permute_qk: bool
    qkv_bias: bool


ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture(gguf.MODEL_ARCH.LLAMA, permute_qk=True, qkv_bias=False),
    "qwen2": Architecture(gguf.MODEL_ARCH.QWEN2, permute_qk=False, qkv_bias=True),
}
EXPORT_KEY = "fedbe.export"
TOKENIZER_PREFIX = "tokenizer."

# The pre-tokenizers of a byte-level BPE tokenizer.json that llama.cpp knows by name. llama.cpp's
# converter recognises a pre-tokenizer by hashing what it makes of a test text against a list it
# keeps; the gguf package does not ship that list, so fedbe recognises the structures instead.
_GPT2_BYTE_LEVEL = {"type": "ByteLevel", "use_regex": True}
_DIGITS = {"type": "Digits", "individual_digits": True}


class GGUFExportError(FedbeError):
    """The model or its tokenizer can not be written as GGUF."""


@dataclass(frozen=True)
class MetadataField:
    """One GGUF key-value pair; ``sub_type`` is the element type of an array."""

    key: str
    value: Any
    type: gguf.GGUFValueType
    sub_type: gguf.GGUFValueType | None = None


def check_supported(model: PreTrainedModel) -> None:
    """Raise :class:`GGUFExportError` unless :func:`write_gguf` can write ``model`` faithfully."""
    config = model.config
    spec = ARCHITECTURES.get(config.model_type)
    if spec is None:
        raise GGUFExportError(
            f"GGUF export supports the {' and '.join(ARCHITECTURES)} architectures, not "
            f"{config.model_type!r}; export this model with --format hf"
        )
    if not spec.qkv_bias and (getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False)):
        raise GGUFExportError(
            f"this {config.model_type} model has attention or MLP biases, which GGUF readers of that "
            "architecture do not load; export it with --format hf"
        )
    if getattr(config, "use_sliding_window", False):
        raise GGUFExportError(
            f"this {config.model_type} model uses sliding-window attention, which GGUF readers of that "
            "architecture do not apply (they attend to the whole context); export it with --format hf"
        )
    rope_type = _rope_parameters(config).get("rope_type", "default")
    if rope_type != "default":
        raise GGUFExportError(
            f"rope scaling {rope_type!r} is not supported by fedbe's GGUF export (only plain rotary "
            "embeddings); export this model with --format hf"
        )


def write_gguf(
    model: PreTrainedModel,
    path: Path,
    gguf_type: str,
    tokenizer: Sequence[MetadataField],
    record: dict[str, Any],
) -> None:
    """Write ``model`` with the ``tokenizer`` metadata and the export ``record`` to the file ``path``."""
    check_supported(model)
    if gguf_type not in GGUF_TYPES:
        raise GGUFExportError(f"unknown GGUF type {gguf_type!r}; choose one of {', '.join(GGUF_TYPES)}")
    config = model.config
    _check_vocab(tokenizer, config.vocab_size)
    spec = ARCHITECTURES[config.model_type]
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[spec.arch])
    try:
        for field in architecture_fields(config, writer.arch, gguf_type):
            writer.add_key_value(field.key, field.value, field.type, field.sub_type)
        for field in tokenizer:
            writer.add_key_value(field.key, field.value, field.type, field.sub_type)
        writer.add_string(EXPORT_KEY, json.dumps(record, sort_keys=True))
        for name, data, raw_dtype in gguf_tensors(model, spec, gguf_type):
            writer.add_tensor(name, data, raw_dtype=raw_dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()


def architecture_fields(config: PretrainedConfig, arch: str, gguf_type: str) -> list[MetadataField]:
    """The ``general.*`` and ``<arch>.*`` keys llama.cpp reads for a Llama or Qwen2."""
    u32, f32 = gguf.GGUFValueType.UINT32, gguf.GGUFValueType.FLOAT32
    keys = gguf.Keys
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    rope_theta = _rope_parameters(config).get("rope_theta", getattr(config, "rope_theta", 10000.0))
    fields = [
        MetadataField(
            keys.General.NAME,
            f"fedbe {config.model_type} {config.num_hidden_layers}L",
            gguf.GGUFValueType.STRING,
        ),
        MetadataField(keys.General.FILE_TYPE, int(GGUF_TYPES[gguf_type][1]), u32),
        MetadataField(keys.General.QUANTIZATION_VERSION, gguf.GGML_QUANT_VERSION, u32),
        MetadataField(keys.LLM.CONTEXT_LENGTH.format(arch=arch), config.max_position_embeddings, u32),
        MetadataField(keys.LLM.EMBEDDING_LENGTH.format(arch=arch), config.hidden_size, u32),
        MetadataField(keys.LLM.BLOCK_COUNT.format(arch=arch), config.num_hidden_layers, u32),
        MetadataField(keys.LLM.FEED_FORWARD_LENGTH.format(arch=arch), config.intermediate_size, u32),
        MetadataField(keys.LLM.VOCAB_SIZE.format(arch=arch), config.vocab_size, u32),
        MetadataField(keys.Attention.HEAD_COUNT.format(arch=arch), config.num_attention_heads, u32),
        MetadataField(keys.Attention.HEAD_COUNT_KV.format(arch=arch), kv_heads, u32),
        MetadataField(keys.Attention.LAYERNORM_RMS_EPS.format(arch=arch), float(config.rms_norm_eps), f32),
        MetadataField(keys.Rope.FREQ_BASE.format(arch=arch), float(rope_theta), f32),
        MetadataField(keys.Rope.DIMENSION_COUNT.format(arch=arch), head_dim, u32),
    ]
    if head_dim != config.hidden_size // config.num_attention_heads:
        fields += [
            MetadataField(keys.Attention.KEY_LENGTH.format(arch=arch), head_dim, u32),
            MetadataField(keys.Attention.VALUE_LENGTH.format(arch=arch), head_dim, u32),
        ]
    return fields


def gguf_tensors(
    model: PreTrainedModel, spec: Architecture, gguf_type: str
) -> Iterator[tuple[str, np.ndarray, gguf.GGMLQuantizationType]]:
    """Each tensor of ``model`` as (llama.cpp name, data in its GGUF encoding, GGUF type)."""
    config = model.config
    names = gguf.get_tensor_name_map(spec.arch, config.num_hidden_layers)
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    matrix_type = GGUF_TYPES[gguf_type][0]
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # tied: the runtime reuses token_embd.weight
        found = names.get_type_and_name(hf_name, try_suffixes=(".weight", ".bias"))
        if found is None:
            raise GGUFExportError(
                f"the {config.model_type} model has a tensor {hf_name!r} that has no llama.cpp name in the "
                "gguf package's tensor map; export it with --format hf"
            )
        kind, name = found
        data = tensor.detach().to(torch.float32).cpu().numpy()
        if spec.permute_qk and kind == gguf.MODEL_TENSOR.ATTN_Q:
            data = permute_for_rope(data, config.num_attention_heads)
        elif spec.permute_qk and kind == gguf.MODEL_TENSOR.ATTN_K:
            data = permute_for_rope(data, kv_heads)
        yield name, *_encode(data, matrix_type)


def permute_for_rope(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder a Q or K projection's rows from Hugging Face's rotary layout (each head's first half,
    then its second half) to llama.cpp's (pairs of adjacent rows), as ``convert_hf_to_gguf.py`` does."""
    rows = weight.shape[0]
    return (
        weight.reshape(n_heads, 2, rows // n_heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def _encode(
    data: np.ndarray, matrix_type: gguf.GGMLQuantizationType
) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    if data.ndim <= 1:
        return data.astype(np.float32), gguf.GGMLQuantizationType.F32
    try:
        return gguf.quants.quantize(data, matrix_type), matrix_type
    except gguf.quants.QuantError:  # rows not a whole number of blocks
        return data.astype(np.float16), gguf.GGMLQuantizationType.F16


def _rope_parameters(config: PretrainedConfig) -> dict[str, Any]:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return dict(params)


def _check_vocab(tokenizer: Sequence[MetadataField], vocab_size: int) -> None:
    tokens = next((f.value for f in tokenizer if f.key == gguf.Keys.Tokenizer.LIST), None)
    if tokens is None:
        raise GGUFExportError("the tokenizer metadata has no token list (tokenizer.ggml.tokens)")
    if len(tokens) != vocab_size:
        raise GGUFExportError(
            f"the tokenizer has {len(tokens)} tokens but the model's embedding has {vocab_size} rows; "
            "llama.cpp needs them equal. Pass the base model whose tokenizer belongs to it (--model)"
        )


# --- the tokenizer ------------------------------------------------------------------------------


def tokenizer_fields(source: ModelSource, vocab_size: int) -> list[MetadataField]:
    """The ``tokenizer.*`` GGUF keys for the base model of ``source``."""
    if source.kind == "gguf":
        assert source.path is not None and source.gguf_file is not None
        return tokenizer_fields_from_gguf(source.path / source.gguf_file)
    if source.kind == "tiny":
        raise GGUFExportError(
            f"{source.spec} has fedbe's byte tokenizer for tests, which has no GGUF form; a GGUF file "
            "needs a real tokenizer. Export with --format hf, or run on a real base (smollm2-135m, a "
            ".gguf file or a Hugging Face folder)"
        )
    folder = source.path if source.kind == "folder" else hub_cache_folder(source.spec)
    assert folder is not None
    return tokenizer_fields_from_hf(folder, vocab_size)


def tokenizer_fields_from_gguf(path: Path) -> list[MetadataField]:
    """Every ``tokenizer.*`` key of the GGUF file ``path``, with its exact types."""
    reader = gguf.GGUFReader(path)
    fields = []
    for key, field in reader.fields.items():
        if not key.startswith(TOKENIZER_PREFIX):
            continue
        vtype = field.types[0]
        sub_type = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        fields.append(MetadataField(key, field.contents(), vtype, sub_type))
    if not any(f.key == gguf.Keys.Tokenizer.LIST for f in fields):
        raise GGUFExportError(
            f"{path} holds no tokenizer (no {gguf.Keys.Tokenizer.LIST}); pass a GGUF base with one"
        )
    return fields


def tokenizer_fields_from_hf(folder: Path, vocab_size: int) -> list[MetadataField]:
    """A GPT-2-style byte-level BPE ``tokenizer.json`` as GGUF keys, as llama.cpp's converter
    writes them: tokens padded to ``vocab_size`` with ``[PADn]``, the added special tokens typed
    CONTROL and other added tokens USER_DEFINED, the merges, special ids and chat template."""
    tokenizer_json = folder / "tokenizer.json"
    if not tokenizer_json.is_file():
        what = (
            "a SentencePiece tokenizer.model"
            if (folder / "tokenizer.model").is_file()
            else "no tokenizer.json"
        )
        raise GGUFExportError(
            f"{folder} has {what}; fedbe's GGUF export builds tokenizers only from a byte-level BPE "
            "tokenizer.json. Pass the base as a .gguf file (its tokenizer is copied), or use --format hf"
        )
    spec = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    pre = _pre_tokenizer_name(spec.get("pre_tokenizer"), folder)
    try:
        vocab = gguf.vocab.BpeVocab(folder)
    except (FileNotFoundError, ValueError) as exc:
        raise GGUFExportError(
            f"the tokenizer in {folder} is not a GPT-2-style byte-level BPE ({exc}); pass the base as a "
            ".gguf file (its tokenizer is copied), or use --format hf"
        ) from exc
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    tokens: list[str] = []
    types: list[int] = []
    for token_id, (text, _, _) in enumerate(vocab.all_tokens()):
        if token_id >= vocab_size:
            raise GGUFExportError(
                f"the tokenizer in {folder} has more tokens than the model's {vocab_size} embedding rows"
            )
        tokens.append(text.decode("utf-8") if isinstance(text, bytes) else text)
        if token_id in added:
            special = added[token_id].get("special", False)
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
    for token_id in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{token_id}]")
        types.append(gguf.TokenType.USER_DEFINED)
    # SpecialVocab's own add_to_gguf writes to a GGUFWriter; a throwaway one collects its keys.
    special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=vocab_size)
    collector = gguf.GGUFWriter(None, "llama")
    special.add_to_gguf(collector, quiet=True)
    string, array, i32 = gguf.GGUFValueType.STRING, gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.INT32
    fields = [
        MetadataField(gguf.Keys.Tokenizer.MODEL, "gpt2", string),
        MetadataField(gguf.Keys.Tokenizer.PRE, pre, string),
        MetadataField(gguf.Keys.Tokenizer.LIST, tokens, array, string),
        MetadataField(gguf.Keys.Tokenizer.TOKEN_TYPE, [int(t) for t in types], array, i32),
    ]
    for key, value in collector.kv_data[0].items():
        if key.startswith(TOKENIZER_PREFIX):
            fields.append(MetadataField(key, value.value, value.type, value.sub_type))
    return fields


def _pre_tokenizer_name(pre_tokenizer: dict[str, Any] | None, folder: Path) -> str:
    """llama.cpp's name for the pre-tokenizer of a tokenizer.json, for the structures fedbe knows."""
    steps = (
        pre_tokenizer.get("pretokenizers", [])
        if pre_tokenizer and pre_tokenizer.get("type") == "Sequence"
        else [pre_tokenizer]
    )
    if len(steps) == 1 and _matches(steps[0], _GPT2_BYTE_LEVEL):
        return "gpt-2"
    if len(steps) == 2 and _matches(steps[0], _DIGITS) and _matches(steps[1], _GPT2_BYTE_LEVEL):
        return "smollm"
    raise GGUFExportError(
        f"the pre-tokenizer of {folder / 'tokenizer.json'} ({json.dumps(pre_tokenizer)}) is not one fedbe "
        "can name for llama.cpp (GPT-2 byte-level, or digits then GPT-2 byte-level as SmolLM's); pass the "
        "base as a .gguf file (its tokenizer is copied), or use --format hf"
    )


def _matches(step: dict[str, Any] | None, pattern: dict[str, Any]) -> bool:
    return step is not None and all(step.get(k) == v for k, v in pattern.items())
