"""Export a run's trained model as a Hugging Face checkpoint or as one GGUF file.

Both formats rebuild the model the federation trained from the latest committed snapshot of a state
directory (:func:`trained_model`), then write it:

1. load the base model from the source recorded in the snapshot (``Snapshot.model_source``, the
   run's ``model`` field as the coordinator resolved it), or from ``model_source`` when given
   (the base moved, e.g. to another machine);
2. check that :func:`fedbe.fingerprint.base_fingerprint` of that freshly loaded base equals the
   snapshot's (blocks trained on one base are meaningless on another);
3. expand it with the recorded expansion (the plan is rebuilt from the registry's source layers,
   and the resulting registry must equal the recorded one) and copy the global block state in.

:func:`export_model` (``--format hf``) then runs ``save_pretrained`` into a temporary sibling of
``out_dir``, plus the tokenizer when the source has a savable one (the byte tokenizer of ``tiny:*``
sources has none), plus ``fedbe-export.json`` (round, fingerprint, model source, config digest,
blocks), and renames it to ``out_dir``. The result loads with plain
``transformers.AutoModelForCausalLM.from_pretrained(out_dir)``, no fedbe needed; its config carries
the ``fedbe_expansion`` record, so fedbe can find the new blocks again.

:func:`export_gguf` (``--format gguf``) writes one ``.gguf`` file instead (see
:mod:`coordinator.gguf_export`): llama.cpp-style runtimes load it, and so does
``AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)``; the same record is in its
``fedbe.export`` key. Llama and Qwen2 bases only, and a real tokenizer is needed (not ``tiny:*``).
"""

from __future__ import annotations

import json
import logging
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel

from coordinator.checkpoint import CheckpointStore, Snapshot
from coordinator.gguf_export import GGUF_TYPES, check_supported, tokenizer_fields, write_gguf
from fedbe.blocks import set_block_state
from fedbe.errors import BaseModelMismatchError, FedbeError
from fedbe.expansion import BlockRegistry, ExpansionPlan, expand_model
from fedbe.fingerprint import base_fingerprint
from fedbe.sources import ModelSource, load_model, load_tokenizer, resolve_source

log = logging.getLogger(__name__)

EXPORT_RECORD = "fedbe-export.json"


class ExportError(FedbeError):
    """The trained model can not be rebuilt or written."""


@dataclass(frozen=True)
class TrainedModel:
    """The expanded base with the trained blocks in, and what an export records about it."""

    model: PreTrainedModel
    source: ModelSource
    registry: BlockRegistry
    record: dict[str, Any]


def trained_model(state_dir: str | Path, model_source: str | None = None) -> TrainedModel:
    """Rebuild the model of the latest snapshot in ``state_dir`` (steps 1-3 above)."""
    state_dir = Path(state_dir)
    snapshot = CheckpointStore(state_dir).load_latest()
    if snapshot is None:
        raise ExportError(f"{state_dir} holds no snapshot yet: export after at least one completed round")
    source = resolve_source(model_source or snapshot.model_source)
    model = load_model(source)
    fingerprint = base_fingerprint(model)
    if fingerprint != snapshot.base_fingerprint:
        raise BaseModelMismatchError(
            f"the base model {source.describe()} has fingerprint {fingerprint}, but the run in {state_dir} was "
            f"trained on {snapshot.base_fingerprint}. Pass the base model the run used (model_source / --model).",
            found=fingerprint,
            expected=snapshot.base_fingerprint,
        )
    registry = _expand(model, snapshot)
    set_block_state(model, registry, snapshot.global_state)
    record = {
        "round": snapshot.round,
        "base_fingerprint": snapshot.base_fingerprint,
        "model_source": source.spec,
        "config_digest": snapshot.config_digest,
        "blocks": registry.to_dict(),
    }
    return TrainedModel(model, source, registry, record)


def export_model(state_dir: str | Path, out_dir: str | Path, model_source: str | None = None) -> Path:
    """Write the model of the latest snapshot in ``state_dir`` to the new folder ``out_dir``; return it."""
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ExportError(f"{out_dir} already exists and is not an empty folder; choose a new output folder")
    trained = trained_model(state_dir, model_source)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".tmp-{out_dir.name}-{uuid.uuid4().hex[:8]}")
    try:
        trained.model.save_pretrained(tmp)
        tokenizer = load_tokenizer(trained.source)
        if hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(tmp)
        (tmp / EXPORT_RECORD).write_text(
            json.dumps(trained.record, indent=1, sort_keys=True) + "\n", encoding="utf-8"
        )
        if out_dir.exists():
            out_dir.rmdir()  # empty (checked above)
        tmp.rename(out_dir)
    except OSError as exc:
        raise ExportError(f"could not write the exported model to {out_dir}: {exc}") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _log_export(trained, out_dir)
    return out_dir


def export_gguf(
    state_dir: str | Path, out_file: str | Path, model_source: str | None = None, gguf_type: str = "f16"
) -> Path:
    """Write the model of the latest snapshot in ``state_dir`` to the new GGUF file ``out_file``
    (``gguf_type`` one of :data:`coordinator.gguf_export.GGUF_TYPES`); return it."""
    out_file = Path(out_file)
    if out_file.suffix.lower() != ".gguf":
        raise ExportError(f"{out_file}: a GGUF export is one file; name it NAME.gguf")
    if out_file.exists():
        raise ExportError(f"{out_file} already exists; choose a new output file")
    if gguf_type not in GGUF_TYPES:
        raise ExportError(f"unknown GGUF type {gguf_type!r}; choose one of {', '.join(GGUF_TYPES)}")
    trained = trained_model(state_dir, model_source)
    check_supported(trained.model)
    tokenizer = tokenizer_fields(trained.source, trained.model.config.vocab_size)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_file.with_name(f".tmp-{out_file.name}-{uuid.uuid4().hex[:8]}")
    try:
        write_gguf(trained.model, tmp, gguf_type, tokenizer, trained.record)
        tmp.rename(out_file)
    except OSError as exc:
        raise ExportError(f"could not write the exported model to {out_file}: {exc}") from exc
    finally:
        tmp.unlink(missing_ok=True)
    _log_export(trained, out_file)
    return out_file


def _log_export(trained: TrainedModel, out: Path) -> None:
    log.info(
        "exported round %d (%d new blocks over %s) to %s",
        trained.record["round"],
        len(trained.registry.blocks),
        trained.record["base_fingerprint"],
        out,
    )


def _expand(model: PreTrainedModel, snapshot: Snapshot) -> BlockRegistry:
    """Expand ``model`` exactly as the run did; the outcome must match the recorded registry."""
    recorded = snapshot.registry
    plan = ExpansionPlan(recorded.base_num_layers, tuple(b.source_layer for b in recorded.blocks))
    registry = expand_model(model, plan)
    if registry != recorded:
        raise ExportError(
            f"re-expanding the base gave blocks at layers {list(registry.new_layer_indices)}, but the run "
            f"recorded {list(recorded.new_layer_indices)}; the snapshot's expansion record is inconsistent"
        )
    return registry
