"""Fuzzing the message handlers (not only the decoder): random and mutated frames on every topic.

The coordinator's round collector and lifecycle pump, and the fake fleet's task handler (the same
protocol path as the edge agent's) get random bytes and valid frames with flipped, inserted or cut
bytes. Whatever arrives: no exception escapes, no message takes long, memory stays bounded, and
every rejected update is counted by its reason.
"""

from __future__ import annotations

import queue
import time
import tracemalloc
from typing import Any

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coordinator.inbox import Inbox, MessagePump, RoundCollector
from coordinator.registry import ClientRegistry
from edge_client.fake import FakeFleet
from fedbe import protocol
from fedbe.compression import Level, compress_state
from fedbe.protocol import ClientTopic, Topics
from fedbe.recipe import Recipe

LAYOUT = {0: {"w": (4, 8)}, 1: {"w": (4, 8)}}
MAX_BYTES = 64 * 1024
TOPICS = Topics("fuzz")


def _update(round_: int = 3, client: str = "a") -> bytes:
    compressed, _ = compress_state({0: {"w": torch.randn(4, 8) * 1e-3}}, Level.INT8)
    return protocol.encode(
        protocol.UpdateMessage(round_, client, "t", Level.INT8, compressed, 8, 2, 1.0, 0.1, 1)
    )


def _task() -> bytes:
    compressed, _ = compress_state({0: {"w": torch.randn(4, 8)}}, Level.FP32)
    recipe = Recipe(steps=2, lr=1e-3, batch_size=4, max_tokens=32, distill_lambda=0.0)
    return protocol.encode(protocol.TaskMessage(3, "t", "a", (0,), Level.FP32, compressed, Level.INT8, recipe,
                                                10.0, 1, False))  # fmt: skip


SEEDS = [
    _update(),
    protocol.encode(protocol.TaskErrorMessage(3, "t", "a", "refused_memory", "too big")),
    protocol.encode(protocol.StatusMessage("a", "online", 3, "fine")),
    protocol.encode(
        protocol.AnnounceMessage(
            "a", "p", "cpu", "x", "fp32", 1, 1, 1, 1, 1, 0.1, 0.1, 1.0, 1, 8, 3, {"x": 1.0}, "fp"
        )
    ),  # fmt: skip
    _task(),
]


@st.composite
def frames(draw: st.DrawFn) -> bytes:
    """Random bytes, or a valid frame with a few bytes flipped, inserted, deleted or the tail cut."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=600))
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "cut", "length"]))
        i = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete" and data:
            del data[i]
        elif op == "cut":
            del data[i:]
        elif op == "length" and len(data) >= 12:  # lie about the body length (a huge allocation if trusted)
            data[8:12] = draw(st.sampled_from([b"\xff\xff\xff\x7f", b"\x00\x00\x00\x10"]))
    return bytes(data)


class FakeConn:
    def __init__(self) -> None:
        self.inbox: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.published: list[tuple[str, bytes]] = []

    def publish(self, topic: str, payload: bytes, **kw: Any) -> None:
        self.published.append((topic, payload))


def _bounded(call: Any) -> None:
    """Run ``call``: under a second and under 16 MiB of new allocations, whatever the input."""
    tracemalloc.start()
    started = time.monotonic()
    try:
        call()
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert time.monotonic() - started < 1.0
    assert peak < 16 * 2**20, f"handler allocated {peak} bytes"


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(frames(), min_size=1, max_size=4), st.sampled_from(["a", "b", "z"]))
def test_round_collector_survives_any_frames_and_counts_each_rejection(
    batch: list[bytes], client: str
) -> None:
    counted: list[str] = []
    c = RoundCollector(
        3, {"a": (0,), "b": (0, 1)}, LAYOUT, MAX_BYTES, lambda cid, f: None, {}, counted.append
    )
    for frame in batch:
        _bounded(lambda frame=frame: c.offer_update(client, frame))
        _bounded(lambda frame=frame: c.offer_error(client, frame))
    # a task error that does not decode (or names another client) is counted, but is no rejected update
    errors = [r for r in counted if r.startswith("invalid_error_") or r == "error_for_other_client"]
    assert [r for r in counted if r not in errors] == [r["reason"] for r in c.rejected]
    assert all(r["reason"] and r["detail"] for r in c.rejected)
    assert len(c.updates) <= 1


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frames(), st.sampled_from([ClientTopic.ANNOUNCE, ClientTopic.STATUS]))
def test_lifecycle_pump_survives_any_frames(frame: bytes, kind: ClientTopic) -> None:
    conn = FakeConn()
    inbox = Inbox(conn, TOPICS)  # type: ignore[arg-type]
    pump = MessagePump(inbox, ClientRegistry("fp"), conn, TOPICS)  # type: ignore[arg-type]
    _bounded(lambda: pump.handle_lifecycle("a", kind, frame))
    rejected = sum(inbox.rejections.values())
    handled = bool(conn.published) or "a" in pump.clients.clients  # answered, or the status was recorded
    assert rejected <= 1 and (rejected or handled), (inbox.rejections, conn.published)  # used or counted


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frames(), st.sampled_from(["task", "notice"]))
def test_fake_client_task_handler_survives_any_frames(frame: bytes, kind: str) -> None:
    fleet = FakeFleet("mqtt://127.0.0.1:1", ["a"], "fuzz")
    sent: list[tuple[str, bytes]] = []
    fleet.clients["a"].conn.publish = lambda topic, payload, **kw: sent.append((topic, payload))  # type: ignore[method-assign]
    _bounded(lambda: fleet.handle(f"{TOPICS.root}/clients/a/{kind}", frame))
    for _, payload in sent:  # whatever it answered is itself a valid message
        protocol.decode(payload)
