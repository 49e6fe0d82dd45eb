"""Resuming a run: a state directory written for another base model is refused before anything runs."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from coordinator.checkpoint import CheckpointStore, Snapshot
from coordinator.config import load_run_config
from coordinator.daemon import Coordinator
from fedbe.blocks import get_block_state
from fedbe.errors import BaseModelMismatchError
from fedbe.expansion import expand_model, plan_expansion
from fedbe.fingerprint import base_fingerprint
from fedbe.sources import build_tiny_model


def test_a_state_directory_of_another_base_is_a_base_model_mismatch(tmp_path: Path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"model": "tiny:llama", "state_dir": "state"}), encoding="utf-8")
    cfg = load_run_config(config)
    model = build_tiny_model("llama")
    actual = base_fingerprint(model)
    registry = expand_model(model, plan_expansion(4, 1, "interleave"))
    store = CheckpointStore(cfg.state_dir)
    store.save(Snapshot(
        round=1, global_state=get_block_state(model, registry), expansion=registry.to_dict(),
        base_fingerprint="llama-4L-00000000deadbeef", model_source="tiny:llama", config_digest="0",
    ))  # fmt: skip
    coordinator = Coordinator(cfg, SimpleNamespace(), store)  # type: ignore[arg-type]  # setup() never connects
    with pytest.raises(BaseModelMismatchError) as info:
        coordinator.setup()
    assert (info.value.found, info.value.expected) == (actual, "llama-4L-00000000deadbeef")
    message = str(info.value)
    assert "llama-4L-00000000deadbeef" in message and actual in message
    assert "fresh state_dir" in message
