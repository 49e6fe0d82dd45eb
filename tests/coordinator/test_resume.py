"""Resuming a run: a state directory written for another base model is refused before anything runs;
a private run goes on with the privacy it has spent."""

from __future__ import annotations

import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from coordinator.checkpoint import CheckpointStore, Snapshot, rng_state_to_json
from coordinator.config import config_digest, load_run_config
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


def test_a_private_run_resumes_with_its_privacy_history_and_budget(tmp_path: Path) -> None:
    from coordinator.privacy import RoundPrivacy, epsilon  # noqa: PLC0415
    from fedbe.errors import ConfigError  # noqa: PLC0415

    spent = [epsilon([RoundPrivacy(0.5, 1.0)] * n, 1e-5) for n in (2, 3)]
    privacy = {"noise_multiplier": 1.0, "clip_norm": 0.1, "epsilon_budget": sum(spent) / 2}
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"model": "tiny:llama", "state_dir": "state", "clients_per_round": 2,
                                      "privacy": privacy}), encoding="utf-8")  # fmt: skip
    cfg = load_run_config(config)
    model = build_tiny_model("llama")
    fingerprint = base_fingerprint(model)
    registry = expand_model(model, plan_expansion(4, 1, "interleave"))
    conn = SimpleNamespace(publish=lambda *args, **kwargs: None)

    def resume(round_: int, history: tuple[RoundPrivacy, ...]) -> Coordinator:
        store = CheckpointStore(tmp_path / f"state-{round_}-{len(history)}")
        store.save(Snapshot(
            round=round_, global_state=get_block_state(model, registry), expansion=registry.to_dict(),
            base_fingerprint=fingerprint, model_source="tiny:llama", config_digest=config_digest(cfg),
            rng_state=rng_state_to_json(random.Random(0).getstate()), privacy_history=history,
        ))  # fmt: skip
        coordinator = Coordinator(cfg, conn, store)  # type: ignore[arg-type]
        coordinator.setup()
        return coordinator

    # two private rounds done: the third (2 of 4 clients) would pass the budget, so the run is over
    coordinator = resume(2, (RoundPrivacy(0.5, 1.0),) * 2)
    assert coordinator.ledger is not None and coordinator.ledger.history == [RoundPrivacy(0.5, 1.0)] * 2
    assert not coordinator.privacy_allows(eligible=4) and coordinator.budget_spent
    # a round that ran without privacy is covered by no epsilon: adding privacy later is refused
    with pytest.raises(ConfigError, match="1 of its 2 rounds ran without privacy"):
        resume(2, (RoundPrivacy(0.5, 1.0),))
