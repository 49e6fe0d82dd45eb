"""Export a run's trained model as a plain Hugging Face checkpoint.

:func:`export_model` takes the latest committed snapshot of a state directory and rebuilds the
model the federation trained:

1. load the base model from the source recorded in the snapshot (``Snapshot.model_source``, the
   run's ``model`` field as the coordinator resolved it), or from ``model_source`` when given
   (the base moved, e.g. to another machine);
2. check that :func:`fedbe.fingerprint.base_fingerprint` of that freshly loaded base equals the
   snapshot's (blocks trained on one base are meaningless on another);
3. expand it with the recorded expansion (the plan is rebuilt from the registry's source layers,
   and the resulting registry must equal the recorded one) and copy the global block state in;
4. ``save_pretrained`` into a temporary sibling of ``out_dir``, plus the tokenizer when the source
   has a savable one (the byte tokenizer of ``tiny:*`` sources has none), plus ``fedbe-export.json``
   (round, fingerprint, model source, config digest, blocks), then rename it to ``out_dir``.

The result loads with plain ``transformers.AutoModelForCausalLM.from_pretrained(out_dir)``, no fedbe
needed; its config carries the ``fedbe_expansion`` record, so fedbe can find the new blocks again.
"""

from __future__ import annotations

import json
import logging
import shutil
import uuid
from pathlib import Path

from transformers import PreTrainedModel

from coordinator.checkpoint import CheckpointStore, Snapshot
from fedbe.blocks import set_block_state
from fedbe.errors import BaseModelMismatchError, FedbeError
from fedbe.expansion import BlockRegistry, ExpansionPlan, expand_model
from fedbe.fingerprint import base_fingerprint
from fedbe.sources import load_model, load_tokenizer, resolve_source

log = logging.getLogger(__name__)

EXPORT_RECORD = "fedbe-export.json"


class ExportError(FedbeError):
    """The trained model can not be rebuilt or written."""


def export_model(state_dir: str | Path, out_dir: str | Path, model_source: str | None = None) -> Path:
    """Write the model of the latest snapshot in ``state_dir`` to the new folder ``out_dir``; return it."""
    state_dir, out_dir = Path(state_dir), Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ExportError(f"{out_dir} already exists and is not an empty folder; choose a new output folder")
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
            found=fingerprint, expected=snapshot.base_fingerprint,
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
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".tmp-{out_dir.name}-{uuid.uuid4().hex[:8]}")
    try:
        model.save_pretrained(tmp)
        tokenizer = load_tokenizer(source)
        if hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(tmp)
        (tmp / EXPORT_RECORD).write_text(
            json.dumps(record, indent=1, sort_keys=True) + "\n", encoding="utf-8"
        )
        if out_dir.exists():
            out_dir.rmdir()  # empty (checked above)
        tmp.rename(out_dir)
    except OSError as exc:
        raise ExportError(f"could not write the exported model to {out_dir}: {exc}") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info(
        "exported round %d (%d new blocks over %s) to %s",
        snapshot.round,
        len(registry.blocks),
        fingerprint,
        out_dir,
    )
    return out_dir


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
