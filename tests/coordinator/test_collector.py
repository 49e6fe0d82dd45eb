"""The round collector: which replies count, which are rejected and why, and durability order."""

from __future__ import annotations

import torch

from coordinator.inbox import RoundCollector
from fedbe import protocol
from fedbe.compression import Level, compress_state

LAYOUT = {0: {"w": (2, 3)}, 1: {"w": (2, 3)}}


def update(
    client: str, round_: int, blocks: dict[int, tuple[int, int]] | None = None, scale: float = 1.0
) -> bytes:
    shapes = blocks or {0: (2, 3)}
    state = {b: {"w": torch.full(s, scale)} for b, s in shapes.items()}
    compressed, _ = compress_state(state, Level.FP32)
    msg = protocol.UpdateMessage(round_, client, f"t-{client}", Level.FP32, compressed, 8, 2, 1.0, 0.5, 1)
    return protocol.encode(msg)


def collector(persisted: list[str]) -> RoundCollector:
    return RoundCollector(
        3, {"a": (0,), "b": (0, 1)}, LAYOUT, 1 << 20, lambda cid, frame: persisted.append(cid), already={}
    )


def test_valid_updates_are_persisted_before_they_count_and_the_round_knows_who_is_pending() -> None:
    persisted: list[str] = []
    c = collector(persisted)
    assert c.pending(offline=set()) == {"a", "b"}
    c.offer_update("a", update("a", 3))
    assert persisted == ["a"] and set(c.updates) == {"a"}
    assert c.pending(offline=set()) == {"b"}
    assert c.pending(offline={"b"}) == set()  # an offline client leaves the round


def test_every_kind_of_bad_update_is_rejected_with_a_reason() -> None:
    persisted: list[str] = []
    c = collector(persisted)
    c.offer_update("a", update("a", 2))  # replay from an earlier round
    c.offer_update("a", update("b", 3))  # names another client
    c.offer_update("a", update("a", 3, {1: (2, 3)}))  # a block it was not assigned
    c.offer_update("a", update("a", 3, {0: (3, 2)}))  # wrong shape
    c.offer_update("b", update("b", 3))  # only one of its two blocks
    c.offer_update("z", update("z", 3))  # a client with no task
    c.offer_update("a", b"FBEW not a frame")
    reasons = [r["reason"] for r in c.rejected]
    assert reasons == ["wrong_round", "wrong_client", "unassigned_block", "shape_mismatch", "blocks_mismatch",
                       "unassigned_client", "version"]  # fmt: skip
    assert persisted == [] and c.updates == {}
    assert [m.round for m in c.late] == [2]  # kept for folding, if the config says so
    c.offer_update("a", update("a", 3))
    c.offer_update("a", update("a", 3, scale=2.0))  # a second update for the same round
    assert c.rejected[-1]["reason"] == "duplicate" and persisted == ["a"]
    assert float(c.updates["a"].blocks[0]["w"].data.max()) == 1.0


def test_task_errors_count_as_answers_and_recovered_updates_are_not_persisted_again() -> None:
    persisted: list[str] = []
    err = protocol.encode(protocol.TaskErrorMessage(3, "t-b", "b", "refused_memory", "too big"))
    c = RoundCollector(3, {"a": (0,), "b": (0, 1)}, LAYOUT, 1 << 20, lambda cid, f: persisted.append(cid),
                       already={"a": update("a", 3)})  # fmt: skip
    assert set(c.updates) == {"a"} and persisted == []
    c.offer_error("b", err)
    assert c.errors["b"].code == "refused_memory" and c.pending(offline=set()) == set()
