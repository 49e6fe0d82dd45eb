"""What one round did, as its line in ``metrics.jsonl`` says it: :class:`RoundLog`.

The daemon fills a round's log as the round goes (the clients selected and their blocks, the bytes
each task and update took, what closing the round decided, the evaluations, a growth of the model)
and appends :meth:`RoundLog.metrics_line` to the metrics before the round's snapshot is written. The
base model's baseline evaluation is a log of round 0.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from coordinator.inbox import RoundCollector
from coordinator.round import RoundOutcome
from fedbe import protocol


@dataclass
class RoundLog:
    """What happened in one round (becomes a metrics line)."""

    round: int
    selected: list[str] = field(default_factory=list)
    assignments: dict[str, list[int]] = field(default_factory=dict)
    updates: dict[str, dict[str, Any]] = field(default_factory=dict)
    rejected: list[dict[str, str]] = field(default_factory=list)
    errors: list[dict[str, str]] = field(default_factory=list)
    bytes_down: dict[str, int] = field(default_factory=dict)
    bytes_up: dict[str, int] = field(default_factory=dict)
    blocks: dict[int, dict[str, Any]] = field(default_factory=dict)
    evaluation: dict[str, Any] | None = None
    expansion: dict[str, Any] | None = None  # the blocks: auto decision, in round 1
    server_evaluation: dict[str, Any] | None = None
    privacy: dict[str, Any] | None = None  # with privacy on: epsilon spent so far and the round's terms
    seconds: float = 0.0
    aggregation_seconds: float | None = None  # screening, aggregation and the server step
    closed_by: str = ""

    def record_close(self, outcome: RoundOutcome, collector: RoundCollector) -> None:
        """What closing the round decided: each accepted update, each task error, every rejection
        (the collector's and the screening's) and each block's aggregate."""
        for cid in outcome.accepted:
            msg = collector.updates[cid]
            self.updates[cid] = {
                "blocks": sorted(msg.blocks), "samples": msg.num_samples, "steps": msg.num_steps,
                "loss": msg.mean_loss, "seconds": msg.wall_seconds, "peak_memory_bytes": msg.peak_memory_bytes,
                "norm": outcome.norms[cid],
            }  # fmt: skip
            self.bytes_up[cid] = collector.frames_bytes.get(cid, 0)
        for cid, err in collector.errors.items():
            self.errors.append({"client": cid, "code": err.code, "reason": err.reason[:300]})
        self.rejected = collector.rejected
        for block_id, report in outcome.per_block.items():
            self.blocks[block_id] = {
                "trainers": list(report.trainers), "weight": report.weight_total, "update_norm": report.update_norm,
            }  # fmt: skip

    def metrics_line(self, rejections: Mapping[str, int]) -> dict[str, Any]:
        """The round's line in ``metrics.jsonl``: every field, and the run's rejections so far by reason."""
        record = asdict(self)
        record["rejections_by_reason"] = dict(rejections)
        return record


def federated_summary(results: Mapping[str, protocol.EvalResultMessage]) -> dict[str, Any]:
    """A federated evaluation in the metrics: the clients and examples, and the loss and accuracy
    weighted by each client's examples (none when no client scored any)."""
    total = sum(r.num_examples for r in results.values())
    summary: dict[str, Any] = {"clients": len(results), "examples": total}
    if total:
        summary["loss"] = sum(r.loss * r.num_examples for r in results.values()) / total
        summary["accuracy"] = sum(r.accuracy * r.num_examples for r in results.values()) / total
    return summary
