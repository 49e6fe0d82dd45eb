"""The coordinator's client registry: refusal of other bases, corrections from measurements."""

from __future__ import annotations

import pytest

from coordinator.registry import ClientRegistry
from fedbe.protocol import AnnounceMessage


def announce(cid: str, fingerprint: str = "llama-6L-abc", **overrides: object) -> AnnounceMessage:
    fields: dict[str, object] = dict(
        client_id=cid, profile_name="p", device_kind="cpu", device_name="x", precision="nf4",
        memory_budget_bytes=2**30, base_memory_bytes=2**28, block_memory_bytes=2**24,
        activation_bytes_per_layer=2**20, max_trainable_blocks=4, block_step_seconds=2.0,
        layer_forward_seconds=0.1, link_bandwidth_bps=1e8, batch_size=4, max_tokens=64, num_examples=10,
        label_histogram={"a": 5.0, "b": 5.0}, base_fingerprint=fingerprint,
    )  # fmt: skip
    fields.update(overrides)
    return AnnounceMessage(**fields)  # type: ignore[arg-type]


def test_a_client_with_another_base_is_refused_with_a_readable_reason() -> None:
    reg = ClientRegistry("llama-6L-abc")
    notice = reg.on_announce(announce("c1", fingerprint="llama-6L-zzz"))
    assert notice.code == "refused" and "llama-6L-zzz" in notice.reason and "llama-6L-abc" in notice.reason
    assert reg.eligible() == []
    assert reg.on_announce(announce("c2")).code == "accepted"
    assert [r.client_id for r in reg.eligible()] == ["c2"]


def test_with_configured_labels_a_client_announcing_others_is_refused_naming_them() -> None:
    reg = ClientRegistry("llama-6L-abc", labels=("a", "b", "c"))
    notice = reg.on_announce(announce("c1", label_histogram={"a": 3.0, "zz": 1.0}))
    assert notice.code == "refused" and "'zz'" in notice.reason and "a, b, c" in notice.reason
    assert reg.eligible() == [] and reg.record("c1").announce is None
    assert reg.on_announce(announce("c2", label_histogram={"a": 3.0, "c": 1.0})).code == "accepted"
    # the refused client comes in once it announces the federation's labels only
    assert reg.on_announce(announce("c1", label_histogram={"b": 4.0})).code == "accepted"
    assert [r.client_id for r in reg.eligible()] == ["c1", "c2"]
    # without configured labels any label is accepted (as before)
    assert (
        ClientRegistry("llama-6L-abc").on_announce(announce("c3", label_histogram={"zz": 1.0})).code
        == "accepted"
    )


def test_offline_clients_are_not_eligible_and_come_back_on_status() -> None:
    reg = ClientRegistry("llama-6L-abc")
    reg.on_announce(announce("c1"))
    reg.on_status("c1", "offline")
    assert reg.eligible() == []
    reg.on_status("c1", "online")
    assert [r.client_id for r in reg.eligible()] == ["c1"]


def test_step_model_from_the_announce_and_the_measured_speed() -> None:
    reg = ClientRegistry("llama-6L-abc")
    reg.on_announce(announce("c1"))
    rec = reg.clients["c1"]
    # 10 layers x 0.1 s forward = 1.0 s; top block step 2.0 s -> 1.0 s backward per layer
    assert rec.step_model(10) == pytest.approx((1.0, 1.0))
    assert rec.predicted_step_seconds(10, lowest_layer=7) == pytest.approx(1.0 + 3 * 1.0)
    # a round measured twice as slow as predicted: the EMA (0.5) moves the factor to 1.5
    reg.on_result("c1", 1, steps=2, wall_seconds=2 * 8.0, predicted_step=4.0, blocks=(1,))
    assert rec.speed_factor == pytest.approx(1.5)
    assert rec.predicted_step_seconds(10, lowest_layer=7) == pytest.approx(1.5 * 4.0)


def test_a_memory_failure_lowers_the_block_limit() -> None:
    reg = ClientRegistry("llama-6L-abc")
    reg.on_announce(announce("c1"))
    assert reg.clients["c1"].max_blocks() == 4
    reg.on_failure("c1", "refused_memory", assigned=3)
    assert reg.clients["c1"].max_blocks() == 2
    reg.on_failure("c1", "failed", assigned=2)  # other failures do not change the limit
    assert reg.clients["c1"].max_blocks() == 2 and reg.clients["c1"].failures == 2


def test_json_round_trip_keeps_history_and_marks_everyone_offline() -> None:
    reg = ClientRegistry("llama-6L-abc")
    reg.on_announce(announce("c1"))
    reg.on_failure("c1", "refused_memory", assigned=2)
    back = ClientRegistry.from_json("llama-6L-abc", reg.to_json())
    rec = back.clients["c1"]
    assert rec.announce == reg.clients["c1"].announce and rec.memory_limit_blocks == 1
    assert not rec.online and back.eligible() == []


def test_a_restored_registry_keeps_refusing_labels_outside_the_configured_ones() -> None:
    saved = ClientRegistry("llama-6L-abc")  # announced while no labels were configured
    saved.on_announce(announce("c1", label_histogram={"a": 3.0, "zz": 1.0}))
    saved.on_announce(announce("c2", label_histogram={"a": 3.0}))
    back = ClientRegistry.from_json("llama-6L-abc", saved.to_json(), labels=("a", "b"))
    for cid in ("c1", "c2"):
        back.on_status(cid, "online")
    assert [r.client_id for r in back.eligible()] == ["c2"]
    assert back.on_announce(announce("c3", label_histogram={"zz": 1.0})).code == "refused"
