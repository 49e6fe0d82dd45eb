"""Lightweight clients for load and fault tests: the edge protocol with a fake trainer.

A :class:`FakeFleet` runs many clients in one process. Each has its own MQTT connection (its own
persistent session, last will and credentials) and speaks exactly the protocol of ``fedbe-edge
run``: online status, announce after the coordinator's status (again when a restarted coordinator
publishes it), and for every task an update of exactly the blocks and shapes it was sent. The
"training" is a seeded random delta of scale 1e-3 per (client, round, block, parameter), so a run
with a fixed seed is deterministic. One worker thread handles the messages of every client.

Everything sent and received is counted per kind; announce -> notice round trips (through the
coordinator) and the publish time of every update are recorded for the load benchmark. A
``behaviour`` hook lets a test replace the honest reply (hostile clients, memory failures).

``python -m edge_client.fake --broker URL --clients a,b,c ...`` runs a fleet as its own process
(so a test can ``kill -9`` it); it exits when the coordinator says the federation finished.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import queue
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fedbe import protocol
from fedbe.compression import compress_state, decompress_state
from fedbe.errors import CodecError, FedbeError
from fedbe.protocol import ClientTopic, Topics
from fedbe.transport import BrokerConfig, Connection

log = logging.getLogger(__name__)

# (client id, task, honest update or None) -> the messages to send instead, or None for the honest reply
Behaviour = Callable[
    [str, protocol.TaskMessage, protocol.UpdateMessage | None], list[tuple[ClientTopic, bytes]] | None
]


def fake_delta(
    client_id: str, task: protocol.TaskMessage, scale: float = 1e-3
) -> dict[int, dict[str, torch.Tensor]]:
    """A deterministic random delta with the shapes of the task's weights, for its assigned blocks."""
    sent = decompress_state({b: task.weights[b] for b in task.block_ids})
    digest = hashlib.sha256(f"{client_id}/{task.round}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
    return {
        b: {name: torch.randn(t.shape, generator=gen) * scale for name, t in sorted(params.items())}
        for b, params in sorted(sent.items())
    }


@dataclass
class FakeClient:
    client_id: str
    conn: Connection
    histogram: dict[str, float]
    max_blocks: int
    block_step_seconds: float = 0.01  # what the announce claims (the coordinator's step model)
    layer_forward_seconds: float = 0.001
    status_key: tuple[object, ...] | None = None
    announced_at: float | None = None
    announce_rtt: list[float] = field(default_factory=list)
    accepted: bool = False


class FakeFleet:
    """``n`` fake clients on one broker; :meth:`start`, then :meth:`wait_finished` / :meth:`close`."""

    def __init__(
        self,
        broker_url: str,
        client_ids: Sequence[str],
        federation: str = "default",
        *,
        max_blocks: int = 2,
        labels: Sequence[str] = ("a", "b", "c"),
        delay_seconds: float = 0.0,
        behaviour: Behaviour | None = None,
        credentials: dict[str, str] | None = None,
        tls_ca: str | None = None,
        require_tls: bool = False,
        histograms: Mapping[str, Mapping[str, float]] | None = None,
        step_seconds: Mapping[str, tuple[float, float]] | None = None,
    ) -> None:
        """``histograms`` and ``step_seconds`` (block step, layer forward) replace, per client id, the
        label histogram and the speeds every client announces by default."""
        self.topics = Topics(federation)
        self.inbox: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.delay_seconds = delay_seconds
        self.behaviour = behaviour
        self.sent: Counter[str] = Counter()
        self.received: Counter[str] = Counter()
        self.rejected: Counter[str] = Counter()  # messages this fleet refused, by reason
        self.update_sent_at: dict[tuple[int, str], float] = {}
        self.tasks: dict[str, list[int]] = {}  # client -> rounds it got a training task for
        self.finished = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.clients: dict[str, FakeClient] = {}
        for i, cid in enumerate(client_ids):
            will = (self.topics.client(cid, ClientTopic.STATUS),
                    protocol.encode(protocol.StatusMessage(cid, "offline", 0, "connection lost")), True)  # fmt: skip
            birth = (self.topics.client(cid, ClientTopic.STATUS),
                     protocol.encode(protocol.StatusMessage(cid, "online", 0, "reconnected")), True)  # fmt: skip
            conn = Connection(BrokerConfig(
                url=broker_url, client_id=cid, username=cid if credentials else None,
                password=(credentials or {}).get(cid), tls_ca=tls_ca, require_tls=require_tls,
            ), will=will, birth=birth)  # fmt: skip
            conn.inbox = self.inbox  # one worker handles every client's messages
            hist = {label: float(1 + (i + k) % 5) for k, label in enumerate(labels)}
            if histograms and cid in histograms:
                hist = {label: float(n) for label, n in histograms[cid].items()}
            block_step, layer_forward = (step_seconds or {}).get(cid, (0.01, 0.001))
            self.clients[cid] = FakeClient(cid, conn, hist, max_blocks, block_step, layer_forward)
        self._worker = threading.Thread(target=self._work, name="fake-fleet", daemon=True)

    # -- life ----------------------------------------------------------------------------------
    def start(self) -> FakeFleet:
        for c in self.clients.values():
            c.conn.start()
            c.conn.subscribe(self.topics.client(c.client_id, ClientTopic.TASK))
            c.conn.subscribe(self.topics.client(c.client_id, ClientTopic.NOTICE))
            self._send(
                c, ClientTopic.STATUS, protocol.StatusMessage(c.client_id, "online", 0, "fake"), retain=True
            )
        # Last, and on one connection only (every client would get the same message): the retained
        # coordinator status starts the announces of every client.
        next(iter(self.clients.values())).conn.subscribe(self.topics.coordinator_status())
        self._worker.start()
        return self

    def close(self) -> None:
        self._stop.set()
        for c in self.clients.values():
            try:
                c.conn.close()
            except Exception as exc:  # noqa: BLE001 - closing is best effort
                log.debug("closing %s: %s", c.client_id, exc)
        if self._worker.is_alive():
            self._worker.join(timeout=5)

    def wait_finished(self, timeout: float) -> bool:
        return self.finished.wait(timeout)

    # -- messages ------------------------------------------------------------------------------
    def _send(self, c: FakeClient, kind: ClientTopic, msg: object, retain: bool = False) -> None:
        self._publish(c, kind, protocol.encode(msg), retain)  # type: ignore[arg-type]

    def _publish(self, c: FakeClient, kind: ClientTopic, frame: bytes, retain: bool = False) -> None:
        c.conn.publish(self.topics.client(c.client_id, kind), frame, retain=retain)
        with self._lock:
            self.sent[kind.value] += 1

    def _work(self) -> None:
        while not self._stop.is_set():
            try:
                topic, payload = self.inbox.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                self.handle(topic, payload)
            except FedbeError as exc:  # never let one message stop the fleet
                log.warning("fake fleet: %s", exc)
                with self._lock:
                    self.rejected["error"] += 1

    def handle(self, topic: str, payload: bytes) -> None:
        now = time.monotonic()
        if topic == self.topics.coordinator_status():
            with self._lock:
                self.received["coordinator_status"] += 1
            # every client got the same retained message: decode once per delivery
            try:
                status = protocol.decode(payload, expected_type=protocol.CoordinatorStatusMessage)
            except CodecError as exc:
                self.rejected[f"coordinator_status_{exc.reason}"] += 1
                return
            self._on_status(status)
            return
        parsed = self.topics.parse_client_topic(topic)
        if parsed is None or parsed[0] not in self.clients:
            self.rejected["unexpected_topic"] += 1
            return
        c, kind = self.clients[parsed[0]], parsed[1]
        with self._lock:
            self.received[kind.value] += 1
        if kind is ClientTopic.NOTICE:
            try:
                notice = protocol.decode(payload, expected_type=protocol.NoticeMessage)
            except CodecError as exc:
                self.rejected[f"notice_{exc.reason}"] += 1
                return
            if c.announced_at is not None:
                c.announce_rtt.append(now - c.announced_at)
                c.announced_at = None
            c.accepted = notice.code == "accepted"
        elif kind is ClientTopic.TASK:
            self._on_task(c, payload)

    def _on_status(self, status: protocol.CoordinatorStatusMessage) -> None:
        if status.state == "finished":
            self.finished.set()
            return
        key = (
            status.base_fingerprint,
            status.base_num_layers,
            status.new_layer_indices,
            status.source_layers,
        )
        for c in self.clients.values():
            # announce on a new expansion, and again when a (restarted) coordinator says it is starting
            if key != c.status_key or status.state == "starting":
                c.status_key = key
                self._announce(c, status)

    def _announce(self, c: FakeClient, status: protocol.CoordinatorStatusMessage) -> None:
        msg = protocol.AnnounceMessage(
            client_id=c.client_id, profile_name="fake", device_kind="cpu", device_name="fake trainer",
            precision="fp32", memory_budget_bytes=1 << 30, base_memory_bytes=1 << 20, block_memory_bytes=1 << 20,
            activation_bytes_per_layer=1 << 16, max_trainable_blocks=c.max_blocks,
            block_step_seconds=c.block_step_seconds, layer_forward_seconds=c.layer_forward_seconds,
            link_bandwidth_bps=1e9, batch_size=4, max_tokens=32, num_examples=40,
            label_histogram=dict(c.histogram), base_fingerprint=status.base_fingerprint,
        )  # fmt: skip
        c.announced_at = time.monotonic()
        self._send(c, ClientTopic.ANNOUNCE, msg)

    def _on_task(self, c: FakeClient, payload: bytes) -> None:
        try:
            task = protocol.decode(payload, expected_type=protocol.TaskMessage)
        except CodecError as exc:
            self.rejected[f"task_{exc.reason}"] += 1
            self._send(c, ClientTopic.ERROR, protocol.TaskErrorMessage(0, "unknown", c.client_id, "invalid_task",
                                                                       str(exc)[:4000]))  # fmt: skip
            return
        if task.client_id != c.client_id or any(b not in task.weights for b in task.block_ids):
            self.rejected["task_invalid"] += 1
            self._send(c, ClientTopic.ERROR, protocol.TaskErrorMessage(task.round, task.task_id, c.client_id,
                                                                       "invalid_task", "not mine"))  # fmt: skip
            return
        if self.delay_seconds:
            time.sleep(self.delay_seconds)  # "training": long enough for a test to kill us mid-round
        update: protocol.UpdateMessage | None = None
        if task.block_ids:
            with self._lock:
                self.tasks.setdefault(c.client_id, []).append(task.round)
            blocks, _ = compress_state(fake_delta(c.client_id, task), task.upload_level)
            update = protocol.UpdateMessage(
                round=task.round, client_id=c.client_id, task_id=task.task_id, level=task.upload_level,
                blocks=blocks, num_samples=task.recipe.steps * task.recipe.batch_size, num_steps=task.recipe.steps,
                mean_loss=1.0,
                wall_seconds=0.01 * task.recipe.steps, peak_memory_bytes=1 << 20,
            )  # fmt: skip
        replies = self.behaviour(c.client_id, task, update) if self.behaviour is not None else None
        if replies is not None:
            for kind, frame in replies:
                self._publish(c, kind, frame)
            return
        if update is not None:
            frame = protocol.encode(update)
            self.update_sent_at[(task.round, c.client_id)] = time.monotonic()
            self._publish(c, ClientTopic.UPDATE, frame)
        if task.evaluate:
            self._send(c, ClientTopic.EVAL, protocol.EvalResultMessage(task.round, task.task_id, c.client_id,
                                                                       10, 1.0, 0.5))  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m edge_client.fake", description=__doc__.split("\n\n")[0])
    p.add_argument("--broker", required=True)
    p.add_argument("--clients", required=True, help="comma-separated client ids")
    p.add_argument("--federation", default="default")
    p.add_argument("--max-blocks", type=int, default=2)
    p.add_argument("--delay", type=float, default=0.0, help="seconds each task takes")
    p.add_argument("--timeout", type=float, default=600.0, help="exit with 1 if not finished by then")
    p.add_argument("--tls-ca", type=Path)
    p.add_argument("--report", type=Path, help="write counts and timings (monotonic clock) here as JSON")
    p.add_argument(
        "--password-dir", type=Path, help="folder of ID.password files (broker-config credentials/)"
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    ids = [c for c in args.clients.split(",") if c]
    creds = None
    if args.password_dir is not None:
        creds = {c: (args.password_dir / f"{c}.password").read_text().strip() for c in ids}
    fleet = FakeFleet(args.broker, ids, args.federation, max_blocks=args.max_blocks, delay_seconds=args.delay,
                      credentials=creds, tls_ca=str(args.tls_ca) if args.tls_ca else None)  # fmt: skip
    fleet.start()
    log.info("fake clients %s online", ",".join(ids))
    try:
        done = fleet.wait_finished(args.timeout)
    finally:
        fleet.close()
    log.info(
        "sent %s, received %s, rejected %s", dict(fleet.sent), dict(fleet.received), dict(fleet.rejected)
    )
    if args.report is not None:
        args.report.write_text(json.dumps({
            "sent": dict(fleet.sent), "received": dict(fleet.received), "rejected": dict(fleet.rejected),
            "update_sent_at": [[cid, r, t] for (r, cid), t in fleet.update_sent_at.items()],
            "announce_rtt": [x for c in fleet.clients.values() for x in c.announce_rtt],
        }))  # fmt: skip
    return 0 if done else 1


if __name__ == "__main__":
    sys.exit(main())
