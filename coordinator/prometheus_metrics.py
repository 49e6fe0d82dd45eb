"""The coordinator's Prometheus metrics, in their own :class:`~prometheus_client.CollectorRegistry`.

Fed from the same two things as ``status.json`` (:mod:`coordinator.fleet_status`): a closed round's
metrics line (:meth:`FleetMetrics.observe_round`: counters, durations, accuracy, retention, epsilon)
and the live status document (:meth:`FleetMetrics.observe_status`: gauges of the fleet and the open
round), so a dashboard and ``fedbe-coordinator status`` never disagree.

Label values are bounded: a rejection's ``reason`` is one of the codes the coordinator itself gives
(:data:`REJECTION_REASONS`), anything else counts as ``other``; an error's ``reason`` is one of the
protocol's task error codes. A counter starts at zero when the coordinator starts (Prometheus'
``rate()`` and ``increase()`` handle the reset).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from coordinator.aggregation import SCREEN_CODES
from coordinator.fleet_status import clients_online, retention_of
from coordinator.inbox import COLLECTOR_REASONS
from fedbe.errors import CODEC_REASONS
from fedbe.protocol.messages import TASK_ERROR_CODES

REJECTION_REASONS = frozenset((*CODEC_REASONS, *SCREEN_CODES, *COLLECTOR_REASONS)) - {"ok"}
OTHER = "other"
# rounds last from seconds (a fake fleet) to an hour (phones on a 600 s deadline, 3x at most)
ROUND_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 900, 1200, 1800, 3600)
AGGREGATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


def bounded(value: str, allowed: frozenset[str] | tuple[str, ...]) -> str:
    return value if value in allowed else OTHER


class FleetMetrics:
    """The metrics of one coordinator; ``privacy``: the run has DP on, so epsilon is exported."""

    content_type = CONTENT_TYPE_LATEST  # of :meth:`exposition`

    def __init__(self, privacy: bool = False) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.rounds_completed = Counter("fedbe_rounds_completed", "Rounds closed since the coordinator started",
                                        registry=r)  # fmt: skip
        self.round_duration = Histogram("fedbe_round_duration_seconds", "Duration of a round, tasks out to "
                                        "metrics written", buckets=ROUND_BUCKETS, registry=r)  # fmt: skip
        self.aggregation_duration = Histogram("fedbe_aggregation_duration_seconds", "Time to screen and "
                                              "aggregate a round's updates", buckets=AGGREGATION_BUCKETS,
                                              registry=r)  # fmt: skip
        self.round = Gauge("fedbe_round", "The open round, or the last closed one between rounds", registry=r)
        self.rounds_planned = Gauge("fedbe_rounds_planned", "Rounds the run is configured for", registry=r)
        self.clients_known = Gauge("fedbe_clients_known", "Clients that ever announced or spoke", registry=r)
        self.clients_online = Gauge("fedbe_clients_online", "Clients online now", registry=r)
        self.clients_selected = Gauge("fedbe_clients_selected", "Clients assigned work in the open round",
                                      registry=r)  # fmt: skip
        self.round_updates = Gauge("fedbe_round_updates", "Updates of the open round that arrived so far",
                                   registry=r)  # fmt: skip
        self.round_deadline = Gauge("fedbe_round_deadline_remaining_seconds", "Seconds to the open round's "
                                    "deadline (0 when none is open or it passed)", registry=r)  # fmt: skip
        self.updates = Counter("fedbe_updates", "Updates (and task errors) by what became of them",
                               ["outcome", "reason"], registry=r)  # fmt: skip
        self.bytes = Counter("fedbe_bytes", "Bytes of tasks (down) and accepted updates (up)", ["direction"],
                             registry=r)  # fmt: skip
        self.accuracy = Gauge("fedbe_accuracy", "Accuracy of the global model at the last evaluation",
                              ["source"], registry=r)  # fmt: skip
        self.retention = Gauge("fedbe_retention", "General-ability retention against the base model",
                               ["probe"], registry=r)  # fmt: skip
        self.epsilon = (
            Gauge("fedbe_privacy_epsilon", "Differential-privacy epsilon spent so far", registry=r)
            if privacy
            else None
        )
        for direction in ("up", "down"):  # exported from the start, so rate() sees the first round
            self.bytes.labels(direction=direction)
        self.updates.labels(outcome="accepted", reason="")

    def observe_round(self, record: Mapping[str, Any]) -> None:
        """A closed round's metrics line (round 0, the baseline evaluation, only sets accuracy and
        retention)."""
        if int(record["round"]) > 0:
            self.rounds_completed.inc()
            self.round_duration.observe(float(record.get("seconds", 0.0)))
            if record.get("aggregation_seconds") is not None:
                self.aggregation_duration.observe(float(record["aggregation_seconds"]))
            self.round.set(int(record["round"]))
            accepted = len(record.get("updates", {}))
            if accepted:
                self.updates.labels(outcome="accepted", reason="").inc(accepted)
            for r in record.get("rejected", []):
                reason = bounded(r["reason"], REJECTION_REASONS)
                self.updates.labels(outcome="late" if reason == "late" else "rejected", reason=reason).inc()
            for e in record.get("errors", []):
                self.updates.labels(outcome="error", reason=bounded(e["code"], TASK_ERROR_CODES)).inc()
            self.bytes.labels(direction="up").inc(sum(record.get("bytes_up", {}).values()))
            self.bytes.labels(direction="down").inc(sum(record.get("bytes_down", {}).values()))
        for source, key in (("server", "server_evaluation"), ("federated", "evaluation")):
            if (record.get(key) or {}).get("accuracy") is not None:
                self.accuracy.labels(source=source).set(float(record[key]["accuracy"]))
        for probe, value in retention_of(record).items():
            self.retention.labels(probe=probe).set(value)
        privacy = record.get("privacy") or {}
        if self.epsilon is not None and privacy.get("epsilon") is not None:
            self.epsilon.set(float(privacy["epsilon"]))

    def observe_status(self, document: Mapping[str, Any]) -> None:
        """The live gauges, from the status document."""
        devices, progress = document["devices"], document["round"]
        self.clients_known.set(len(devices))
        self.clients_online.set(clients_online(devices))
        self.clients_selected.set(progress["expected"])
        self.round_updates.set(progress["arrived"])
        self.round_deadline.set(progress["seconds_to_deadline"] or 0.0)
        self.rounds_planned.set(progress["of"])
        if progress["number"]:
            self.round.set(progress["number"])

    def exposition(self) -> bytes:
        """The metrics in Prometheus' text format."""
        return generate_latest(self.registry)
