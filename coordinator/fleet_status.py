"""The fleet's live state as one JSON document (``state_dir/status.json``, ``GET /status.json``).

Pure functions from what the coordinator already holds: the client registry, each client's presence
(online or offline, and since when), the open round's collector, and the round records that go to
``metrics.jsonl``. :mod:`coordinator.fleet_monitor` calls them and does the I/O; the Prometheus
metrics (:mod:`coordinator.prometheus_metrics`) read the same records and the same document, so the
two never disagree.

The document (``schema`` 1)::

    updated, heartbeat        wall-clock ISO times: last change of state, last sign of life
    heartbeat_seconds         how often the heartbeat is written while the coordinator runs
    coordinator               {pid, host, federation, state, started}
    round                     {number, of, phase, selected, expected, arrived, errors, rejected,
                               seconds_to_deadline}
    devices                   [{id, profile, device_kind, precision, state, since, last_round, blocks,
                                last_update: {round, fate, code} | null}]
    recent_rounds             [{round, closed_by, seconds, accepted, rejected, errors, bytes_up,
                                bytes_down, accuracy, accuracy_source, retention, epsilon,
                                assignments: {client: [block, ...]}}]

A device's ``state`` is ``online``, ``offline`` or ``refused`` (its base or labels are not the
federation's); ``blocks`` are the blocks it holds in the open round. An update's ``fate`` is
``received`` (arrived, not yet screened), ``accepted``, ``rejected`` (``code`` says why), ``late``
(for an earlier round) or ``error`` (the client could not do its task; ``code`` is its error code).
``recent_rounds`` holds the last :data:`RECENT_ROUNDS` closed rounds, enough for the dashboard's
per-round charts and allocation map while the document stays a few kB per round.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

SCHEMA = 1
RECENT_ROUNDS = 20
FATES = ("received", "accepted", "rejected", "late", "error")


@dataclass(frozen=True)
class Presence:
    """Whether a client is online, and since when (wall-clock seconds)."""

    online: bool
    since: float


@dataclass(frozen=True)
class Identity:
    """What a client announced about itself, kept when its announce is dropped (a new expansion)."""

    profile: str
    device_kind: str
    precision: str


@dataclass(frozen=True)
class Fate:
    """What became of a client's last update (or task): one of :data:`FATES`, with a code."""

    round: int
    fate: str
    code: str | None = None


@dataclass(frozen=True)
class Progress:
    """The open round as the collector sees it (``number`` 0: none open yet)."""

    number: int
    of: int
    phase: str  # waiting | training | closing | evaluating | finished | stopped
    selected: tuple[str, ...] = ()
    assignments: Mapping[str, Sequence[int]] | None = None
    arrived: int = 0
    errors: int = 0
    rejected: int = 0
    seconds_to_deadline: float | None = None


def iso(seconds: float) -> str:
    """Wall-clock seconds as an ISO-8601 UTC time with milliseconds."""
    return (
        datetime.fromtimestamp(seconds, timezone.utc)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )


def track_presence(
    previous: Mapping[str, Presence], online: Mapping[str, bool], now: float
) -> dict[str, Presence]:
    """Each client's presence after seeing ``online`` (client -> is online) at ``now``: a client
    keeps its ``since`` while its state is unchanged; a change, or a new client, starts at ``now``."""
    out: dict[str, Presence] = {}
    for cid, is_online in online.items():
        before = previous.get(cid)
        out[cid] = before if before is not None and before.online == is_online else Presence(is_online, now)
    return out


def fates_of_round(
    round_: int,
    arrived: Iterable[str],
    rejected: Iterable[Mapping[str, str]],
    errors: Mapping[str, str],
    accepted: Iterable[str] | None = None,
) -> dict[str, Fate]:
    """The fate of each client's update in ``round_``: ``arrived`` updates are ``received`` until
    ``accepted`` (the closed round's) says which were; a rejection (``{"client", "reason"}``) with
    reason ``late`` is ``late``; ``errors`` maps a client to its task error code. A rejection after
    an arrival (screening) wins over it."""
    out = {cid: Fate(round_, "received") for cid in arrived}
    if accepted is not None:
        out.update({cid: Fate(round_, "accepted") for cid in accepted})
    for r in rejected:
        late = r["reason"] == "late"
        out[r["client"]] = Fate(round_, "late" if late else "rejected", r["reason"])
    out.update({cid: Fate(round_, "error", code) for cid, code in errors.items()})
    return out


def fates_of_record(record: Mapping[str, Any]) -> dict[str, Fate]:
    """The fates a closed round's metrics line records (:meth:`coordinator.round_log.RoundLog.metrics_line`)."""
    accepted = list(record.get("updates", {}))
    return fates_of_round(
        int(record["round"]), accepted, record.get("rejected", []),
        {e["client"]: e["code"] for e in record.get("errors", [])}, accepted,
    )  # fmt: skip


def accuracy_of(record: Mapping[str, Any]) -> tuple[float | None, str | None]:
    """A round's accuracy and where it comes from: the server evaluation, else the federated one."""
    for source, key in (("server", "server_evaluation"), ("federated", "evaluation")):
        value = (record.get(key) or {}).get("accuracy")
        if value is not None:
            return float(value), source
    return None, None


def retention_of(record: Mapping[str, Any]) -> dict[str, float]:
    """The server evaluation's retention by probe (``definition``, ``perplexity``, ...)."""
    found = (record.get("server_evaluation") or {}).get("retention") or {}
    return {k.removesuffix("_retention"): float(v) for k, v in found.items() if v is not None}


def round_summary(record: Mapping[str, Any]) -> dict[str, Any]:
    """One line of ``recent_rounds`` from a round's metrics line."""
    accuracy, source = accuracy_of(record)
    privacy = record.get("privacy") or {}
    return {
        "round": int(record["round"]), "closed_by": record.get("closed_by", ""),
        "seconds": float(record.get("seconds", 0.0)), "accepted": len(record.get("updates", {})),
        "rejected": len(record.get("rejected", [])), "errors": len(record.get("errors", [])),
        "bytes_up": sum(record.get("bytes_up", {}).values()), "bytes_down": sum(record.get("bytes_down", {}).values()),
        "accuracy": accuracy, "accuracy_source": source, "retention": retention_of(record),
        "epsilon": privacy.get("epsilon"),
        "assignments": {cid: sorted(blocks) for cid, blocks in sorted(record.get("assignments", {}).items())},
    }  # fmt: skip


def remember_round(recent: Sequence[dict[str, Any]], record: Mapping[str, Any]) -> list[dict[str, Any]]:
    """``recent`` with ``record``'s summary added (a round logged again after a restart replaces
    its earlier line), the last :data:`RECENT_ROUNDS` in round order."""
    summary = round_summary(record)
    kept = [r for r in recent if r["round"] != summary["round"]] + [summary]
    return sorted(kept, key=lambda r: r["round"])[-RECENT_ROUNDS:]


def device_rows(
    clients: Mapping[str, Any],
    presence: Mapping[str, Presence],
    identities: Mapping[str, Identity],
    fates: Mapping[str, Fate],
    last_round: Mapping[str, int],
    progress: Progress,
) -> list[dict[str, Any]]:
    """One row per known client (sorted by id); ``clients`` maps ids to
    :class:`coordinator.registry.ClientRecord`-like objects (``online``, ``refused``, ``history``)."""
    assignments = progress.assignments or {}
    rows = []
    for cid in sorted(clients):
        rec, ident = clients[cid], identities.get(cid)
        seen = presence.get(cid)
        fate = fates.get(cid)
        history_round = rec.history[-1]["round"] if rec.history else None
        rounds = [r for r in (last_round.get(cid), history_round) if r is not None]
        state = "refused" if rec.refused is not None else "online" if rec.online else "offline"
        rows.append({
            "id": cid, "profile": ident.profile if ident else None,
            "device_kind": ident.device_kind if ident else None, "precision": ident.precision if ident else None,
            "state": state, "since": iso(seen.since) if seen else None,
            "last_round": max(rounds) if rounds else None, "blocks": sorted(assignments.get(cid, ())),
            "last_update": None if fate is None else {"round": fate.round, "fate": fate.fate, "code": fate.code},
            "refused": rec.refused,
        })  # fmt: skip
    return rows


def round_section(progress: Progress) -> dict[str, Any]:
    """The ``round`` part: which round, its phase, and how many updates arrived of those expected."""
    deadline = progress.seconds_to_deadline
    return {
        "number": progress.number, "of": progress.of, "phase": progress.phase,
        "selected": list(progress.selected), "expected": len(progress.assignments or {}),
        "arrived": progress.arrived, "errors": progress.errors, "rejected": progress.rejected,
        "seconds_to_deadline": None if deadline is None else round(max(deadline, 0.0), 1),
    }  # fmt: skip


def status_document(
    *,
    coordinator: Mapping[str, Any],
    devices: list[dict[str, Any]],
    progress: Progress,
    recent: Sequence[dict[str, Any]],
    updated: float,
    heartbeat: float,
    heartbeat_seconds: float,
) -> dict[str, Any]:
    """The whole document (see the module's docstring)."""
    return {
        "schema": SCHEMA, "updated": iso(updated), "heartbeat": iso(heartbeat),
        "heartbeat_seconds": heartbeat_seconds, "coordinator": dict(coordinator),
        "round": round_section(progress), "devices": devices, "recent_rounds": list(recent),
    }  # fmt: skip


def clients_online(devices: Iterable[Mapping[str, Any]]) -> int:
    return sum(1 for d in devices if d["state"] == "online")
