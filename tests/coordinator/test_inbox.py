"""What the coordinator does with a message that does not decode, on each topic a client publishes:
counted under its own topic and logged with the topic, the sender and the decoder's reason."""

from __future__ import annotations

import logging
import queue
from typing import Any

import pytest

from coordinator.inbox import BAD_MESSAGE_LOG_SECONDS, Inbox, MessagePump, RoundCollector
from coordinator.registry import ClientRegistry
from fedbe import protocol
from fedbe.errors import CodecError
from fedbe.protocol import ClientTopic, Topics

TOPICS = Topics("garbage")
GARBAGE = b"\x00\x01 definitely not a frame"


class FakeConn:
    def __init__(self) -> None:
        self.inbox: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.published: list[tuple[str, bytes]] = []

    def publish(self, topic: str, payload: bytes, **kw: Any) -> None:
        self.published.append((topic, payload))


def _parts() -> tuple[FakeConn, Inbox, MessagePump, RoundCollector]:
    conn = FakeConn()
    inbox = Inbox(conn, TOPICS)  # type: ignore[arg-type]
    pump = MessagePump(inbox, ClientRegistry("fp"), conn, TOPICS)  # type: ignore[arg-type]
    collector = RoundCollector(3, {"mallory": (0,)}, {0: {"w": (2,)}}, 1 << 20, lambda cid, f: None, {},
                               inbox.count, inbox.bad)  # fmt: skip
    return conn, inbox, pump, collector


def _publish(conn: FakeConn, kind: ClientTopic, payload: bytes) -> None:
    """Through the inbox's own topic parsing, as the daemon receives it."""
    conn.inbox.put((TOPICS.client("mallory", kind), payload))


def test_garbage_on_each_topic_is_logged_and_counted_under_that_topic(
    caplog: pytest.LogCaptureFixture,
) -> None:
    conn, inbox, pump, collector = _parts()
    with pytest.raises(CodecError) as decoded:
        protocol.decode(GARBAGE)
    reason = decoded.value.reason  # what the real decoder says of these bytes
    caplog.set_level(logging.WARNING, logger="coordinator.inbox")
    for kind in (ClientTopic.ANNOUNCE, ClientTopic.STATUS, ClientTopic.EVAL, ClientTopic.ERROR):
        caplog.clear()
        _publish(conn, kind, GARBAGE)
        item = inbox.next(1.0)
        assert item == ("mallory", kind, GARBAGE)
        if not pump.handle_lifecycle(*item):
            if kind is ClientTopic.EVAL:
                assert pump.eval_result("mallory", GARBAGE) is None
            else:
                collector.offer_error("mallory", GARBAGE)
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1, warnings
        assert f"on the {kind.value} topic from mallory ({reason})" in warnings[0]
        assert "update" not in warnings[0]
        assert inbox.rejections.get(f"invalid_{kind.value}_{reason}") == 1, inbox.rejections
    # garbage on the error topic is no rejected update, and no task error either
    assert collector.rejected == [] and collector.errors == {}
    assert conn.published == [] and "mallory" not in pump.clients.clients  # nothing acted on


def test_a_task_error_naming_another_client_is_not_a_rejected_update(
    caplog: pytest.LogCaptureFixture,
) -> None:
    _, inbox, _, collector = _parts()
    caplog.set_level(logging.WARNING, logger="coordinator.inbox")
    collector.offer_error(
        "mallory", protocol.encode(protocol.TaskErrorMessage(3, "t", "alice", "failed", "x"))
    )
    assert collector.rejected == [] and collector.errors == {}
    assert inbox.rejections == {"error_for_other_client": 1}
    assert "task error from mallory that names client 'alice'" in caplog.text and "update" not in caplog.text


def test_garbage_in_a_loop_is_counted_every_time_but_logged_once_a_minute_per_sender(
    caplog: pytest.LogCaptureFixture,
) -> None:
    _, inbox, pump, _ = _parts()
    now = [100.0]
    inbox.bad.clock = lambda: now[0]
    caplog.set_level(logging.WARNING, logger="coordinator.inbox")
    for _ in range(5):
        pump.handle_lifecycle("mallory", ClientTopic.STATUS, GARBAGE)
    pump.handle_lifecycle("trudy", ClientTopic.STATUS, GARBAGE)  # another sender has its own line
    pump.handle_lifecycle("mallory", ClientTopic.ANNOUNCE, GARBAGE)  # and so has another topic
    assert sum(inbox.rejections.values()) == 7
    assert len(caplog.records) == 3
    now[0] += BAD_MESSAGE_LOG_SECONDS
    pump.handle_lifecycle("mallory", ClientTopic.STATUS, GARBAGE)
    assert len(caplog.records) == 4
    assert "4 more since the last one, not logged" in caplog.records[-1].getMessage()
