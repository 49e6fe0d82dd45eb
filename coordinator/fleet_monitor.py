"""Keeps the fleet's status document and the Prometheus metrics up to date, and serves them.

The daemon tells the :class:`FleetMonitor` what happens (its state, a round opening, a round's
metrics line) and the message pump calls :meth:`FleetMonitor.tick` each time it waits for a message
(at least every half second). The document is built from the daemon's own state by the pure functions
of :mod:`coordinator.fleet_status`, at most once a :data:`MIN_INTERVAL_SECONDS`, and at once when a
round opens or closes or the daemon's state changes; ``state_dir/status.json`` is rewritten when the
document changed, and a heartbeat thread rewrites it every :data:`HEARTBEAT_SECONDS` even when
nothing did, so ``fedbe-coordinator status`` can tell a quiet coordinator from a dead one, also while
the main thread is busy for minutes (loading or evaluating a model).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from coordinator.dashboard import PUBLIC, dashboard_routes
from coordinator.fleet_status import (
    Fate,
    Identity,
    Presence,
    Progress,
    device_rows,
    fates_of_record,
    fates_of_round,
    iso,
    remember_round,
    status_document,
    track_presence,
)
from coordinator.http_endpoint import JSON, HttpEndpoint, Response
from coordinator.inbox import RoundCollector
from coordinator.prometheus_metrics import FleetMetrics
from coordinator.registry import ClientRegistry
from fedbe.errors import ConfigError

log = logging.getLogger(__name__)

STATUS_FILE = "status.json"
METRICS_FILE = "metrics.jsonl"
MIN_INTERVAL_SECONDS = 1.0
HEARTBEAT_SECONDS = 5.0


class FleetMonitor:
    """The live view of one run (``cfg`` is its :class:`coordinator.config.RunConfig`)."""

    def __init__(self, cfg: Any, clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic) -> None:  # fmt: skip
        self.cfg, self.clock, self.monotonic = cfg, clock, monotonic
        self.path = Path(cfg.state_dir) / STATUS_FILE
        self.metrics = FleetMetrics(privacy=cfg.privacy is not None)
        self.coordinator = {"pid": os.getpid(), "host": socket.gethostname(), "federation": cfg.federation,
                            "state": "starting", "started": iso(clock())}  # fmt: skip
        self.clients: ClientRegistry | None = None
        self.presence: dict[str, Presence] = {}
        self.identities: dict[str, Identity] = {}
        self.fates: dict[str, Fate] = {}
        self.last_round: dict[str, int] = {}
        self.recent: list[dict[str, Any]] = []
        self.progress = Progress(0, cfg.rounds, "waiting")
        self.collector: RoundCollector | None = None
        self.deadline: float | None = None  # monotonic
        self.document: dict[str, Any] | None = None
        self._served = b"{}\n"  # the document as /status.json serves it
        self._built_at = float("-inf")  # monotonic
        self._lock = threading.Lock()  # the heartbeat thread writes the file too
        self._stop = threading.Event()
        self._endpoint: HttpEndpoint | None = None

    # -- what the daemon reports -----------------------------------------------------------------
    def attach(self, clients: ClientRegistry, round_: int) -> None:
        """The registry the daemon keeps (after setup), the last closed round, and the recent rounds
        of ``metrics.jsonl`` (a resumed run shows them at once)."""
        self.clients = clients
        self.progress = Progress(round_, self.cfg.rounds, "waiting")
        for record in read_last_records(Path(self.cfg.state_dir) / METRICS_FILE):
            self.recent = remember_round(self.recent, record)
        self.publish()

    def state(self, state: str) -> None:
        """The daemon's state (as on its MQTT status topic: starting, running, finished, stopped)."""
        self.coordinator["state"] = state
        if state in ("finished", "stopped"):
            self.progress = Progress(self.progress.number, self.cfg.rounds, state)
        self.publish()

    def round_started(self, round_: int, selected: tuple[str, ...], assignments: Mapping[str, tuple[int, ...]],
                      collector: RoundCollector, deadline: float) -> None:  # fmt: skip
        """Round ``round_`` sent its tasks; ``deadline`` is monotonic."""
        self.collector, self.deadline = collector, deadline
        for cid in assignments:
            self.last_round[cid] = round_
        self.progress = Progress(round_, self.cfg.rounds, "training", tuple(selected), dict(assignments))
        self.publish()

    def phase(self, name: str) -> None:
        """The open round moved on (closing, evaluating): its collector's counts are final."""
        self._refresh_progress()
        self.collector, self.deadline = None, None
        self.progress = Progress(self.progress.number, self.progress.of, name, self.progress.selected,
                                 self.progress.assignments, self.progress.arrived, self.progress.errors,
                                 self.progress.rejected)  # fmt: skip
        self.publish()

    def round_closed(self, record: Mapping[str, Any]) -> None:
        """A round's metrics line was written: the fates it decided, the recent rounds, the metrics."""
        self.fates.update(fates_of_record(record))
        self.recent = remember_round(self.recent, record)
        self.metrics.observe_round(record)
        self.collector, self.deadline = None, None
        self.progress = Progress(int(record["round"]), self.cfg.rounds, "waiting")
        self.publish()

    def baseline_scored(self, record: Mapping[str, Any]) -> None:
        """The base model's evaluation (round 0) was written: the charts' starting point and the
        accuracy gauge; no round is counted and the progress stays where it is."""
        self.recent = remember_round(self.recent, record)
        self.metrics.observe_round(record)
        self.publish()

    # -- building and writing ---------------------------------------------------------------------
    def tick(self) -> None:
        """Rebuild the document if it is due (at most once a :data:`MIN_INTERVAL_SECONDS`)."""
        if self.monotonic() - self._built_at >= MIN_INTERVAL_SECONDS:
            self.publish()

    def _refresh_progress(self) -> None:
        c, p = self.collector, self.progress
        if c is None:
            return
        live = fates_of_round(c.round, c.updates, c.rejected, {cid: e.code for cid, e in c.errors.items()})
        self.fates.update(live)
        left = None if self.deadline is None else self.deadline - self.monotonic()
        self.progress = Progress(p.number, p.of, p.phase, p.selected, p.assignments, len(c.updates), len(c.errors),
                                 len(c.rejected), left)  # fmt: skip

    def publish(self) -> None:
        """Build the document from the daemon's state now; write it if it changed."""
        self._built_at = self.monotonic()
        self._refresh_progress()
        clients = {} if self.clients is None else dict(self.clients.clients)
        now = self.clock()
        self.presence = track_presence(self.presence, {c: r.online for c, r in clients.items()}, now)
        for cid, rec in clients.items():
            if rec.announce is not None:
                a = rec.announce
                self.identities[cid] = Identity(a.profile_name, a.device_kind, a.precision)
        devices = device_rows(
            clients, self.presence, self.identities, self.fates, self.last_round, self.progress
        )
        doc = status_document(coordinator=self.coordinator, devices=devices, progress=self.progress,
                              recent=self.recent, updated=now, heartbeat=now,
                              heartbeat_seconds=HEARTBEAT_SECONDS)  # fmt: skip
        self.metrics.observe_status(doc)
        previous = self.document
        changed = previous is None or _without_times(previous) != _without_times(doc)
        if not changed:  # served with a fresh countdown; the file waits for the heartbeat
            assert previous is not None
            doc["updated"] = previous["updated"]
        self.document = doc
        self._write(doc, to_file=changed)

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            doc = self.document
            if doc is not None:
                self._write({**doc, "heartbeat": iso(self.clock())})

    def _write(self, doc: Mapping[str, Any], to_file: bool = True) -> None:
        # atomic (rename) but not fsynced: a status lost in a crash is rewritten within seconds
        data = (json.dumps(doc, indent=1) + "\n").encode()
        with self._lock:
            self._served = data
            if not to_file:
                return
            tmp = self.path.with_name(f".{STATUS_FILE}.tmp-{os.getpid()}")
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                tmp.write_bytes(data)
                os.replace(tmp, self.path)
            except OSError as exc:  # the run goes on without its status file
                log.warning("can not write %s: %s", self.path, exc)

    # -- serving ---------------------------------------------------------------------------------
    def routes(self) -> dict[str, Callable[[], Response]]:
        """What the HTTP endpoint serves: the metrics, the document, and the dashboard that draws it."""
        return {
            "/metrics": lambda: Response(200, self.metrics.content_type, self.metrics.exposition()),
            "/status.json": lambda: Response(200, JSON, self._served),
            **dashboard_routes(),
        }

    @contextmanager
    def running(self) -> Iterator[FleetMonitor]:
        """The heartbeat, and the HTTP endpoint when ``http.port`` is set, for the duration of a run."""
        http = self.cfg.http
        if http.port is not None:
            try:
                self._endpoint = HttpEndpoint(
                    http.host, http.port, self.routes(), http.read_token(), public=PUBLIC
                ).start()
            except OSError as exc:
                raise ConfigError(f"http: can not listen on {http.host}:{http.port}: {exc}; choose another "
                                  "http.port, or stop what uses it") from exc  # fmt: skip
        beat = threading.Thread(target=self._heartbeat, name="fedbe-status-heartbeat", daemon=True)
        beat.start()
        try:
            yield self
        finally:
            self._stop.set()
            beat.join(timeout=HEARTBEAT_SECONDS + 1)
            if self._endpoint is not None:
                self._endpoint.stop()


def _without_times(doc: Mapping[str, Any]) -> dict[str, Any]:
    """The document less what changes by itself (the times, the countdown)."""
    rnd = {k: v for k, v in doc["round"].items() if k != "seconds_to_deadline"}
    return {**{k: v for k, v in doc.items() if k not in ("updated", "heartbeat")}, "round": rnd}


def read_last_records(path: Path, limit: int = 20) -> list[dict[str, Any]]:
    """The last ``limit`` round records of a ``metrics.jsonl`` (none if it is missing or unreadable)."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(f.tell() - 256 * 1024, 0))  # a line is a few kB; the tail is enough
            lines = f.read().decode("utf-8", "replace").splitlines()[-limit:]
    except OSError:
        return []
    out = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue  # the first, cut line of the tail, or a torn last line
        if isinstance(record, dict) and isinstance(record.get("round"), int) and record["round"] > 0:
            out.append(record)
    return out
