"""The coordinator's view of its clients, built from announcements, statuses, last wills and results.

A client is *eligible* for a round when it is online, has announced, and was not refused. Its
capacity for the allocation comes from what it announced, corrected by what it measured:

* speed: every update reports wall time and steps; the ratio of measured to predicted step time
  (an exponential moving average) scales the client's announced times;
* memory: a task refused or failed for memory lowers the client's block limit to one less than
  it was given, so it gets fewer blocks next round.

A client whose base model fingerprint differs from the coordinator's is refused with a reason
it can read (a ``notice``), since averaging blocks trained on different bases ruins the model.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from fedbe.protocol import AnnounceMessage, NoticeMessage

log = logging.getLogger(__name__)

SPEED_EMA = 0.5


@dataclass
class ClientRecord:
    client_id: str
    online: bool = False
    announce: AnnounceMessage | None = None
    refused: str | None = None
    rounds_done: int = 0
    failures: int = 0
    memory_limit_blocks: int | None = None  # lowered after a memory failure
    speed_factor: float = 1.0  # measured / announced step time
    last_seen: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def eligible(self) -> bool:
        return self.online and self.announce is not None and self.refused is None

    def max_blocks(self) -> int:
        announced = self.announce.max_trainable_blocks if self.announce else 0
        return announced if self.memory_limit_blocks is None else min(announced, self.memory_limit_blocks)

    def step_model(self, num_layers: int) -> tuple[float, float]:
        """(forward through all layers, backward per layer above the lowest trainable block), in
        seconds, corrected by the measured speed. The announce gives the step time of the top block
        alone (one layer of backward) and the forward time of one layer; a frozen layer's backward is
        at least 1.5 forwards (measured on SmolLM2, see docs/profiles.md)."""
        a = self.announce
        if a is None:
            return float("inf"), float("inf")
        forward = a.layer_forward_seconds * num_layers
        backward = max(a.block_step_seconds - forward, 1.5 * a.layer_forward_seconds)
        return self.speed_factor * forward, self.speed_factor * backward

    def predicted_step_seconds(self, num_layers: int, lowest_layer: int) -> float:
        """Seconds per step when the lowest trainable block sits at ``lowest_layer``."""
        forward, backward = self.step_model(num_layers)
        return forward + backward * (num_layers - lowest_layer)


MAX_ANNOUNCED_BLOCKS = 4096
MAX_STEP_SECONDS = 1e6


def check_announce(msg: AnnounceMessage) -> str | None:
    """What makes a (well-formed) announce unusable for the allocation, or None.

    The decoder already checked types, non-negative finite numbers, the histogram's shape (at most
    1024 labels, finite counts >= 0) and text sizes; this checks that the capacity makes sense.
    """
    if msg.memory_budget_bytes <= 0:
        return "memory_budget_bytes must be positive"
    if msg.max_trainable_blocks > MAX_ANNOUNCED_BLOCKS:
        return (
            f"max_trainable_blocks {msg.max_trainable_blocks} is implausible (at most {MAX_ANNOUNCED_BLOCKS})"
        )
    for name in ("block_step_seconds", "layer_forward_seconds"):
        value = getattr(msg, name)
        if not 0 < value <= MAX_STEP_SECONDS:
            return f"{name} must be above 0 and at most {MAX_STEP_SECONDS:g} s, got {value}"
    if msg.batch_size < 1 or msg.max_tokens < 1:
        return f"batch_size {msg.batch_size} and max_tokens {msg.max_tokens} must be at least 1"
    total = sum(msg.label_histogram.values())
    if total > 1e12:
        return f"label_histogram counts {total:g} examples: implausible"
    return None


class ClientRegistry:
    """Who announced what; ``labels`` (the configured ``labels``, empty = any) are the only
    labels a client may announce."""

    def __init__(self, base_fingerprint: str, labels: tuple[str, ...] = ()) -> None:
        self.base_fingerprint = base_fingerprint
        self.labels = frozenset(labels)
        self.clients: dict[str, ClientRecord] = {}

    def record(self, client_id: str) -> ClientRecord:
        if client_id not in self.clients:
            self.clients[client_id] = ClientRecord(client_id)
        return self.clients[client_id]

    def on_announce(self, msg: AnnounceMessage) -> NoticeMessage:
        rec = self.record(msg.client_id)
        rec.online, rec.last_seen = True, time.time()
        if msg.base_fingerprint != self.base_fingerprint:
            rec.refused = (
                f"your base model {msg.base_fingerprint} differs from the federation's {self.base_fingerprint}; "
                "blocks trained on different bases can not be averaged: install the federation's base model"
            )
            log.warning("refusing %s: %s", msg.client_id, rec.refused)
            return NoticeMessage(msg.client_id, "refused", rec.refused)
        others = sorted(set(msg.label_histogram) - self.labels) if self.labels else []
        if others:
            more = f" and {len(others) - 5} more" if len(others) > 5 else ""
            shown, known = ", ".join(map(repr, others[:5])) + more, ", ".join(sorted(self.labels))
            rec.announce = None  # not eligible until it announces the federation's labels
            rec.refused = (
                f"your data has labels {shown} that are not the federation's ({known}; the coordinator's "
                "labels): train on the federation's dataset, or ask the operator to add the labels"
            )
            log.warning("refusing %s: %s", msg.client_id, rec.refused)
            return NoticeMessage(msg.client_id, "refused", rec.refused)
        rec.announce, rec.refused = msg, None
        log.info(
            "%s announced: %s %s, budget %.0f MiB, up to %d blocks, %.2f s/step, %d examples",
            msg.client_id, msg.device_kind, msg.device_name, msg.memory_budget_bytes / 2**20,
            msg.max_trainable_blocks, msg.block_step_seconds, msg.num_examples,
        )  # fmt: skip
        return NoticeMessage(msg.client_id, "accepted", "welcome")

    def on_status(self, client_id: str, state: str) -> None:
        rec = self.record(client_id)
        was = rec.online
        rec.online, rec.last_seen = state != "offline", time.time()
        if was != rec.online:
            log.info("%s is %s", client_id, "online" if rec.online else "offline")

    def on_result(self, client_id: str, round_: int, steps: int, wall_seconds: float, predicted_step: float,
                  blocks: tuple[int, ...]) -> None:  # fmt: skip
        rec = self.record(client_id)
        rec.rounds_done += 1
        if steps > 0 and predicted_step > 0 and predicted_step != float("inf"):
            ratio = (wall_seconds / steps) / (predicted_step / rec.speed_factor)
            rec.speed_factor = (1 - SPEED_EMA) * rec.speed_factor + SPEED_EMA * ratio
        rec.history.append({"round": round_, "blocks": list(blocks), "steps": steps, "seconds": wall_seconds})
        del rec.history[:-20]

    def on_failure(self, client_id: str, code: str, assigned: int) -> None:
        rec = self.record(client_id)
        rec.failures += 1
        if code == "refused_memory":
            rec.memory_limit_blocks = max(assigned - 1, 0)
            log.warning("%s ran out of memory with %d blocks; limit now %d", client_id, assigned,
                        rec.memory_limit_blocks)  # fmt: skip

    def eligible(self) -> list[ClientRecord]:
        return sorted((r for r in self.clients.values() if r.eligible), key=lambda r: r.client_id)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for cid, rec in self.clients.items():
            data = asdict(rec)
            data["announce"] = asdict(rec.announce) if rec.announce else None
            data["online"] = False  # after a restart a client counts as online once it speaks again
            out[cid] = data
        return out

    @classmethod
    def from_json(
        cls, base_fingerprint: str, data: dict[str, Any], labels: tuple[str, ...] = ()
    ) -> ClientRegistry:
        """The registry :meth:`to_json` wrote, under the configured ``labels`` of this run: a stored
        announce with a label outside them is dropped (that client is eligible again once it
        announces the federation's labels), as :meth:`on_announce` would have refused it."""
        reg = cls(base_fingerprint, labels)
        for cid, item in data.items():
            announce = item.get("announce")
            rec = ClientRecord(
                client_id=cid, online=False, refused=item.get("refused"), rounds_done=int(item.get("rounds_done", 0)),
                failures=int(item.get("failures", 0)), memory_limit_blocks=item.get("memory_limit_blocks"),
                speed_factor=float(item.get("speed_factor", 1.0)), history=list(item.get("history", [])),
            )  # fmt: skip
            if announce:
                rec.announce = AnnounceMessage(**announce)
                if reg.labels and set(rec.announce.label_histogram) - reg.labels:
                    rec.announce = None
            reg.clients[cid] = rec
        return reg
