"""What reaches the coordinator: the inbox of client messages, the lifecycle handling common to every
phase (announce, status), the collector of one round's replies and the loops that wait for them
(:func:`collect_round`, :meth:`MessagePump.eval_results`).

A round's updates are decoded and checked against the task here (protocol errors, wrong client,
wrong round, replays, blocks other than the assigned ones) and made durable before they count; what
they are worth to the model (screening, weights, aggregation) is :func:`coordinator.round.close_round`.

A message that does not decode on any other topic (announce, status, evaluation, task error) is
counted as ``invalid_<topic>_<reason>`` and logged at WARNING with the topic, the sender and the
decoder's reason (:class:`BadMessages`, at most one line per sender and topic a minute), so garbage
on a topic is visible where it arrives and is never reported as a rejected update.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Collection
from typing import Any

from coordinator.registry import ClientRegistry, check_announce
from fedbe import protocol
from fedbe.blocks import BlockState
from fedbe.compression import Level, compress_state, decompress_state
from fedbe.errors import CodecError
from fedbe.protocol import ClientTopic, Topics
from fedbe.transport import Connection

log = logging.getLogger(__name__)

BAD_MESSAGE_LOG_SECONDS = 60.0  # one WARNING per sender and topic in this time; the rest are tallied
_MAX_TRACKED_SENDERS = 10_000  # bounds the tally when many client ids send garbage
# A round stops waiting for an assigned client once it has been offline this long. Not at once: a
# broker restart fires every client's last will (mosquitto does so even with a will delay), and
# the clients come back within seconds with their updates (paho reconnects after 1, 2, 4 ... s).
OFFLINE_GRACE_SECONDS = 10.0
# the reasons RoundCollector rejects an update for, besides the decoder's (fedbe.errors.CODEC_REASONS)
COLLECTOR_REASONS = (
    "late", "unassigned_client", "wrong_client", "wrong_round", "duplicate", "blocks_mismatch",
)  # fmt: skip


class BadMessages:
    """Counts and logs the messages that do not decode, by topic kind and sender.

    Every one is counted (``count("invalid_<topic>_<reason>")``); the WARNING names the topic, the
    sender and the decoder's reason. A client sending garbage in a loop would flood the log, so per
    (topic, sender) one line is logged every ``every`` seconds, the next one saying how many were
    not logged in between."""

    def __init__(self, count: Callable[[str], None] | None = None, every: float = BAD_MESSAGE_LOG_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:  # fmt: skip
        self.count, self.every, self.clock = count, every, clock
        # (topic, sender) -> (when last logged, how many not logged since)
        self._last: dict[tuple[ClientTopic, str], tuple[float, int]] = {}

    def __call__(self, kind: ClientTopic, client_id: str, exc: CodecError) -> None:
        if self.count is not None:
            self.count(f"invalid_{kind.value}_{exc.reason}")
        now, key = self.clock(), (kind, client_id)
        last = self._last.get(key)
        if last is not None and now - last[0] < self.every:
            self._last[key] = (last[0], last[1] + 1)
            return
        if len(self._last) >= _MAX_TRACKED_SENDERS:
            self._last.clear()
        self._last[key] = (now, 0)
        more = f" ({last[1]} more since the last one, not logged)" if last is not None and last[1] else ""
        log.warning("invalid message on the %s topic from %s (%s): %s%s", kind.value, client_id, exc.reason,
                    exc, more)  # fmt: skip


class Inbox:
    """Decodes what arrives and routes it by topic; invalid messages are counted and logged
    (:class:`BadMessages`), never fatal."""

    def __init__(self, conn: Connection, topics: Topics) -> None:
        self.conn, self.topics = conn, topics
        self.rejections: dict[str, int] = {}
        self.bad = BadMessages(self.count)

    def next(self, timeout: float) -> tuple[str, ClientTopic, bytes] | None:
        try:
            topic, payload = self.conn.inbox.get(timeout=max(timeout, 0.0))
        except queue.Empty:
            return None
        parsed = self.topics.parse_client_topic(topic)
        if parsed is None:
            self.count("unexpected_topic")
            return None
        return parsed[0], parsed[1], payload

    def count(self, reason: str) -> None:
        self.rejections[reason] = self.rejections.get(reason, 0) + 1


def encode_weights(
    state: BlockState, block_ids: list[int] | tuple[int, ...], level: Level = Level.FP32
) -> dict[int, Any]:
    compressed, _ = compress_state({b: state[b] for b in block_ids}, level)
    return compressed


class MessagePump:
    """Handles the client-lifecycle messages common to every phase (announce, status)."""

    def __init__(self, inbox: Inbox, clients: ClientRegistry, conn: Connection, topics: Topics) -> None:
        self.inbox, self.clients, self.conn, self.topics = inbox, clients, conn, topics
        self.stashed_updates: list[tuple[str, bytes]] = []  # arrived between rounds: offered to the next
        # called before each wait for a message, at least every half second while a loop waits
        self.on_wait: Callable[[], None] = lambda: None

    def handle_lifecycle(self, client_id: str, kind: ClientTopic, payload: bytes) -> bool:
        """True if the message was a lifecycle message (and was handled)."""
        if kind is ClientTopic.ANNOUNCE:
            try:
                msg = protocol.decode(payload, expected_type=protocol.AnnounceMessage)
            except CodecError as exc:
                self.inbox.bad(kind, client_id, exc)
                return True
            if msg.client_id != client_id:
                self.inbox.count("announce_for_other_client")
                return True
            problem = check_announce(msg)
            if problem is not None:
                log.warning("refusing the announce of %s: %s", client_id, problem)
                self.inbox.count("malformed_profile")
                self.clients.record(client_id).announce = None  # not eligible until it announces sensibly
                notice = protocol.NoticeMessage(client_id, "refused", f"invalid announce: {problem}")
            else:
                notice = self.clients.on_announce(msg)
            self.conn.publish(self.topics.client(client_id, ClientTopic.NOTICE), protocol.encode(notice))
            return True
        if kind is ClientTopic.STATUS:
            try:
                status = protocol.decode(payload, expected_type=protocol.StatusMessage)
            except CodecError as exc:
                self.inbox.bad(kind, client_id, exc)
                return True
            if status.client_id != client_id:
                self.inbox.count("status_for_other_client")
                return True
            self.clients.on_status(client_id, status.state)
            return True
        return False

    def next_reply(self, timeout: float) -> tuple[str, ClientTopic, bytes] | None:
        """The next message that is not a lifecycle one (those are handled here), or None when
        ``timeout`` seconds pass first or the message was a lifecycle one."""
        self.on_wait()
        item = self.inbox.next(timeout)
        if item is None or self.handle_lifecycle(*item):
            return None
        return item

    def eval_result(self, client_id: str, payload: bytes) -> protocol.EvalResultMessage | None:
        """A federated evaluation's result; None (counted and logged) when it does not decode."""
        try:
            return protocol.decode(payload, expected_type=protocol.EvalResultMessage)
        except CodecError as exc:
            self.inbox.bad(ClientTopic.EVAL, client_id, exc)
            return None

    def eval_results(
        self, client_ids: Collection[str], round_: int, timeout: float, stop: threading.Event
    ) -> dict[str, protocol.EvalResultMessage]:
        """The results of ``round_``'s federated evaluation from ``client_ids``, collected until each
        answered, ``timeout`` seconds passed or ``stop`` was set."""
        results: dict[str, protocol.EvalResultMessage] = {}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and len(results) < len(client_ids) and not stop.is_set():
            item = self.next_reply(0.5)
            if item is None:
                continue
            cid, kind, payload = item
            if kind is ClientTopic.EVAL:
                msg = self.eval_result(cid, payload)
                if msg is not None and msg.round == round_ and cid in client_ids:
                    results[cid] = msg
            else:
                self.inbox.count(f"{kind.value}_during_eval")
        return results


def wait_for_clients(
    pump: MessagePump, minimum: int, stop: threading.Event, timeout: float | None = None
) -> bool:
    started, last_log = time.monotonic(), 0.0
    while not stop.is_set():
        if len(pump.clients.eligible()) >= minimum:
            return True
        now = time.monotonic()
        if timeout is not None and now - started > timeout:
            return False
        if now - last_log > 10:
            log.info("waiting for clients: %d of %d needed are ready", len(pump.clients.eligible()), minimum)
            last_log = now
        item = pump.next_reply(0.5)
        if item is None:
            continue
        if item[1] is ClientTopic.UPDATE:  # a late update: the next round decides (drop or fold)
            pump.stashed_updates.append((item[0], item[2]))
        else:
            pump.inbox.count(f"{item[1].value}_outside_round")
    return False


def collect_round(
    pump: MessagePump,
    collector: RoundCollector,
    started: float,
    deadline_seconds: float,
    min_clients: int,
    stop: threading.Event,
) -> str:
    """Offer the round's replies to ``collector`` until the round can close; what closed it: "all
    answered", "deadline" (passed, with ``min_clients`` updates), "hard limit" (3x the deadline,
    with fewer) or "stopped".

    A resumed round's deadline counts from the restart (``started``): its clients kept training
    meanwhile. An assigned client counts as gone once offline for :data:`OFFLINE_GRACE_SECONDS`.
    """
    deadline = started + deadline_seconds
    hard_limit = started + 3 * deadline_seconds
    offline_since: dict[str, float] = {}  # client -> when this round first saw it offline
    while not stop.is_set():
        now = time.monotonic()
        for cid in {*pump.clients.clients, *collector.assignments}:
            rec = pump.clients.clients.get(cid)  # an assigned client unknown since a restart is offline
            if rec is not None and rec.online:
                offline_since.pop(cid, None)
            else:
                offline_since.setdefault(cid, now)
        gone = {c for c, t in offline_since.items() if now - t >= OFFLINE_GRACE_SECONDS}
        if not collector.pending(gone):
            return "all answered"
        if now > deadline and len(collector.updates) >= min_clients:
            return "deadline"
        if now > hard_limit:
            return "hard limit"
        item = pump.next_reply(min(0.5, max(deadline - now, 0.05)))
        if item is None:
            continue
        cid, kind, payload = item
        if kind is ClientTopic.UPDATE:
            collector.offer_update(cid, payload)
        elif kind is ClientTopic.ERROR:
            collector.offer_error(cid, payload)
        else:
            pump.inbox.count(f"{kind.value}_during_training")
    return "stopped"


def decode_update(
    payload: bytes, layout: Any, assigned: tuple[int, ...], max_bytes: int
) -> protocol.UpdateMessage:
    return protocol.decode(
        payload, max_bytes=max_bytes, expected_type=protocol.UpdateMessage, expected_layout=layout,
        allowed_blocks=assigned,
    )  # fmt: skip


def deltas_of(update: protocol.UpdateMessage) -> BlockState:
    return decompress_state(update.blocks)


class RoundCollector:
    """Collects one round's replies until it can close (all answered, or deadline with enough updates)."""

    def __init__(self, round_: int, assignments: dict[str, tuple[int, ...]], layout: Any, max_bytes: int,
                 persist: Any, already: dict[str, bytes], count: Any = None,
                 bad: BadMessages | None = None) -> None:  # fmt: skip
        self.round = round_
        self.count = count  # reason -> None: every rejection is counted in the metrics by its reason
        self.bad = bad or BadMessages(count)  # a task error that does not decode is not a rejected update
        self.assignments = assignments
        self.layout = layout
        self.max_bytes = max_bytes
        self.persist = persist  # (client_id, frame) -> None: durable before the update counts
        self.updates: dict[str, protocol.UpdateMessage] = {}
        self.frames_bytes: dict[str, int] = {}
        self.errors: dict[str, protocol.TaskErrorMessage] = {}
        self.rejected: list[dict[str, str]] = []
        self.late: list[protocol.UpdateMessage] = []
        for client_id, frame in already.items():  # accepted before a restart
            self.offer_update(client_id, frame, persisted=True)

    def pending(self, offline: set[str]) -> set[str]:
        answered = set(self.updates) | set(self.errors)
        return {c for c in self.assignments if c not in answered and c not in offline}

    def reject(self, client_id: str, reason: str, detail: str) -> None:
        self.rejected.append({"client": client_id, "reason": reason, "detail": detail[:300]})
        if self.count is not None:
            self.count(reason)
        log.warning("round %d: rejected update from %s (%s): %s", self.round, client_id, reason, detail)

    def offer_update(self, client_id: str, frame: bytes, persisted: bool = False) -> None:
        assigned = self.assignments.get(client_id)
        if assigned is None:
            try:
                msg = protocol.decode(frame, max_bytes=self.max_bytes, expected_type=protocol.UpdateMessage)
            except CodecError as exc:
                self.reject(client_id, exc.reason, str(exc))
                return
            if msg.round < self.round:
                self.late.append(msg)
                self.reject(client_id, "late", f"update for round {msg.round} arrived in round {self.round}")
            else:
                self.reject(client_id, "unassigned_client", f"{client_id} has no task in round {self.round}")
            return
        try:
            msg = decode_update(frame, self.layout, assigned, self.max_bytes)
        except CodecError as exc:
            self.reject(client_id, exc.reason, str(exc))
            return
        if msg.client_id != client_id:
            self.reject(client_id, "wrong_client", f"update names client {msg.client_id!r}")
        elif msg.round != self.round:
            if msg.round < self.round:
                self.late.append(msg)
            self.reject(client_id, "wrong_round", f"update for round {msg.round}, this is round {self.round}")
        elif client_id in self.updates:
            self.reject(client_id, "duplicate", "a second update for the same round (replay?)")
        elif set(msg.blocks) != set(assigned):
            self.reject(
                client_id, "blocks_mismatch", f"sent blocks {sorted(msg.blocks)}, assigned {list(assigned)}"
            )
        else:
            if not persisted:
                self.persist(client_id, frame)
            self.updates[client_id] = msg
            self.frames_bytes[client_id] = len(frame)

    def offer_error(self, client_id: str, frame: bytes) -> None:
        try:
            msg = protocol.decode(frame, max_bytes=self.max_bytes, expected_type=protocol.TaskErrorMessage)
        except CodecError as exc:
            self.bad(ClientTopic.ERROR, client_id, exc)
            return
        if msg.client_id != client_id:
            if self.count is not None:
                self.count("error_for_other_client")
            log.warning("round %d: ignoring a task error from %s that names client %r", self.round, client_id,
                        msg.client_id)  # fmt: skip
        elif msg.round == self.round and client_id in self.assignments:
            self.errors[client_id] = msg
            log.warning(
                "round %d: %s could not do its task (%s): %s", self.round, client_id, msg.code, msg.reason
            )
