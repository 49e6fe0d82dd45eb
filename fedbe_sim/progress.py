"""Progress of a running federation, for a person watching: one line per event.

:class:`Observer` listens as an extra MQTT client (subscribed to the coordinator's status and to
every client's status and update topics; it publishes nothing) and tails the coordinator's
``metrics.jsonl``. :meth:`Observer.poll` returns the lines that happened since the last call:
clients coming online and announcing, who trains in which round, who is done (with loss, upload
size and time, and how many of the round's trainers are done), and for each closed round the
line of :func:`fedbe_sim.report.round_line` (accuracy, retention, bytes). Missing a message only
loses a line: the metrics file stays the record of the run.
"""

from __future__ import annotations

import queue
import time
from dataclasses import dataclass, field
from pathlib import Path

from fedbe import protocol
from fedbe.errors import CodecError
from fedbe.protocol import ClientTopic, Topics
from fedbe_sim.report import read_metrics, round_line, summarize_record


@dataclass
class FederationView:
    """What the observer has learnt so far; :meth:`on_message` turns a message into a line (or None)."""

    topics: Topics
    rounds: int
    client_states: dict[str, str] = field(default_factory=dict)
    training: dict[int, set[str]] = field(default_factory=dict)
    done: dict[int, set[str]] = field(default_factory=dict)
    coordinator_state: str = ""

    def on_message(self, topic: str, payload: bytes) -> str | None:
        try:
            if topic == self.topics.coordinator_status():
                return self._coordinator(
                    protocol.decode(payload, expected_type=protocol.CoordinatorStatusMessage)
                )
            parsed = self.topics.parse_client_topic(topic)
            if parsed is None:
                return None
            client_id, kind = parsed
            if kind is ClientTopic.STATUS:
                return self._status(client_id, protocol.decode(payload, expected_type=protocol.StatusMessage))
            if kind is ClientTopic.UPDATE:
                update = protocol.decode(payload, expected_type=protocol.UpdateMessage)
                return self._update(client_id, update, len(payload))
        except CodecError:
            return None
        return None

    def _coordinator(self, msg: protocol.CoordinatorStatusMessage) -> str | None:
        key = f"{msg.state}/{len(msg.new_layer_indices)}"
        if key == self.coordinator_state:
            return None
        self.coordinator_state = key
        return (
            f"coordinator {msg.state} (after round {msg.round}): {len(msg.new_layer_indices)} new blocks at "
            f"layers {list(msg.new_layer_indices)} of {msg.base_num_layers + len(msg.new_layer_indices)}"
        )

    def _status(self, client_id: str, msg: protocol.StatusMessage) -> str | None:
        if msg.state == "training":
            self.training.setdefault(msg.round, set()).add(client_id)
            self.client_states[client_id] = "training"
            return f"round {msg.round}: {client_id} training ({len(self.training[msg.round])} started)"
        previous = self.client_states.get(client_id)
        self.client_states[client_id] = msg.state
        if msg.state == "online" and msg.detail == "announced":
            return f"{client_id} announced its capacity and labels"
        if msg.state == "offline" and previous != "offline":
            return f"{client_id} offline ({msg.detail})"
        return None

    def _update(self, client_id: str, msg: protocol.UpdateMessage, size: int) -> str:
        done = self.done.setdefault(msg.round, set())
        done.add(client_id)
        started = len(self.training.get(msg.round, set()) | done)
        return (
            f"round {msg.round}: {client_id} done ({len(done)}/{started} clients): blocks {sorted(msg.blocks)}, "
            f"loss {msg.mean_loss:.3f}, {size / 1e6:.1f} MB up, {msg.wall_seconds:.0f} s"
        )


class Observer:
    """An MQTT listener plus a tail of ``metrics.jsonl``; :meth:`poll` gives the new progress lines."""

    def __init__(self, broker_url: str, federation: str, metrics: Path, rounds: int) -> None:
        from fedbe.transport import BrokerConfig, Connection  # noqa: PLC0415

        self.view = FederationView(Topics(federation), rounds)
        self.metrics = metrics
        self.records_seen = 0
        self.metrics_size = -1
        self.conn = Connection(
            BrokerConfig(url=broker_url, client_id=f"fedbe-simulate-observer-{federation}")
        )

    def start(self) -> None:
        topics = self.view.topics
        self.conn.start()
        for kind in (ClientTopic.STATUS, ClientTopic.UPDATE):
            self.conn.subscribe(topics.all_clients(kind))
        self.conn.subscribe(topics.coordinator_status())

    def poll(self, timeout: float) -> list[str]:
        """Lines for what happened since the last call; waits up to ``timeout`` for the first message."""
        lines: list[str] = []
        deadline = time.monotonic() + timeout
        while True:
            try:
                topic, payload = self.conn.inbox.get(timeout=max(deadline - time.monotonic(), 0.0))
            except queue.Empty:
                break
            lines += self._closed_rounds()  # a round's line before the next round's events
            line = self.view.on_message(topic, payload)
            if line:
                lines.append(line)
        return lines + self._closed_rounds()

    def _closed_rounds(self) -> list[str]:
        if not self.metrics.exists() or self.metrics.stat().st_size == self.metrics_size:
            return []
        self.metrics_size = self.metrics.stat().st_size
        records = read_metrics(self.metrics)
        lines = [
            round_line(summarize_record(r), self.view.rounds)
            for r in records[self.records_seen :]
            if isinstance(r.get("round"), int)
        ]
        self.records_seen = len(records)
        return lines

    def close(self) -> None:
        self.conn.close()
