"""The status document's pure parts: presence, fates, round summaries, device rows, liveness and the table."""

from __future__ import annotations

from typing import Any

from coordinator.fleet_status import (
    RECENT_ROUNDS,
    Fate,
    Identity,
    Presence,
    Progress,
    device_rows,
    fates_of_record,
    fates_of_round,
    iso,
    remember_round,
    round_summary,
    status_document,
    track_presence,
)
from coordinator.registry import ClientRecord
from coordinator.status_cli import liveness, render

T0 = 1_800_000_000.0


def record(round_: int, **extra: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "round": round_, "closed_by": "all answered", "seconds": 12.5,
        "updates": {"a": {"blocks": [0]}, "b": {"blocks": [1]}},
        "rejected": [{"client": "c", "reason": "norm_outlier", "detail": "x"},
                     {"client": "d", "reason": "late", "detail": "y"}],
        "errors": [{"client": "e", "code": "refused_memory", "reason": "oom"}],
        "bytes_up": {"a": 100, "b": 50}, "bytes_down": {"a": 1000, "b": 1000, "c": 7},
        "assignments": {"b": [1], "a": [2, 0], "c": [0]},
    }  # fmt: skip
    base.update(extra)
    return base


def test_presence_keeps_its_since_until_the_state_changes() -> None:
    first = track_presence({}, {"a": True, "b": False}, T0)
    assert first == {"a": Presence(True, T0), "b": Presence(False, T0)}
    later = track_presence(first, {"a": True, "b": True, "c": False}, T0 + 30)
    assert later["a"] == Presence(True, T0)  # unchanged: still online since T0
    assert later["b"] == Presence(True, T0 + 30)  # came online
    assert later["c"] == Presence(False, T0 + 30)  # new


def test_a_closed_round_gives_each_client_its_fate() -> None:
    fates = fates_of_record(record(4))
    assert fates == {
        "a": Fate(4, "accepted"), "b": Fate(4, "accepted"), "c": Fate(4, "rejected", "norm_outlier"),
        "d": Fate(4, "late", "late"), "e": Fate(4, "error", "refused_memory"),
    }  # fmt: skip


def test_an_open_round_counts_arrived_updates_as_received_and_a_screening_rejection_wins() -> None:
    fates = fates_of_round(3, ["a", "b"], [{"client": "b", "reason": "blocks_mismatch"}], {"c": "failed"})
    assert fates == {"a": Fate(3, "received"), "b": Fate(3, "rejected", "blocks_mismatch"),
                     "c": Fate(3, "error", "failed")}  # fmt: skip


def test_round_summary_takes_server_accuracy_first_retention_by_probe_and_epsilon() -> None:
    line = record(
        2, evaluation={"accuracy": 0.5}, privacy={"epsilon": 1.25, "delta": 1e-5},
        server_evaluation={"accuracy": 0.75, "retention": {"definition_retention": 0.98, "perplexity_retention": 1.01}},
    )  # fmt: skip
    s = round_summary(line)
    assert (s["round"], s["accepted"], s["rejected"], s["errors"]) == (2, 2, 2, 1)
    assert (s["accuracy"], s["accuracy_source"], s["epsilon"]) == (0.75, "server", 1.25)
    assert s["retention"] == {"definition": 0.98, "perplexity": 1.01}
    assert (s["bytes_up"], s["bytes_down"]) == (150, 2007)
    assert s["assignments"] == {"a": [0, 2], "b": [1], "c": [0]}
    fed = round_summary(record(3, evaluation={"accuracy": 0.5}))
    assert (fed["accuracy"], fed["accuracy_source"], fed["epsilon"]) == (0.5, "federated", None)


def test_recent_rounds_keep_the_last_few_in_order_and_a_repeated_round_replaces_its_line() -> None:
    recent: list[dict[str, Any]] = []
    for r in range(1, RECENT_ROUNDS + 3):
        recent = remember_round(recent, record(r))
    assert [x["round"] for x in recent] == list(range(3, RECENT_ROUNDS + 3))
    again = remember_round(recent, record(RECENT_ROUNDS + 2, seconds=99.0))
    assert [x["round"] for x in again] == [x["round"] for x in recent]
    assert again[-1]["seconds"] == 99.0


def test_device_rows_name_each_client_with_its_state_blocks_and_last_update() -> None:
    clients = {
        "b": ClientRecord("b", online=False, history=[{"round": 2}]),
        "a": ClientRecord("a", online=True),
        "z": ClientRecord("z", online=True, refused="other base"),
    }
    presence = {"a": Presence(True, T0), "b": Presence(False, T0 - 60)}
    identities = {"a": Identity("jetson-orin-nano", "cuda", "bf16")}
    progress = Progress(3, 10, "training", ("a", "b"), {"a": (2, 0), "b": (1,)})
    rows = device_rows(clients, presence, identities, {"b": Fate(2, "accepted")}, {"a": 3}, progress)
    assert [r["id"] for r in rows] == ["a", "b", "z"]
    a, b, z = rows
    assert (a["profile"], a["device_kind"], a["precision"]) == ("jetson-orin-nano", "cuda", "bf16")
    assert (a["state"], a["since"], a["blocks"], a["last_round"], a["last_update"]) == (
        "online", iso(T0), [0, 2], 3, None)  # fmt: skip
    assert (b["state"], b["since"], b["last_round"]) == ("offline", iso(T0 - 60), 2)
    assert b["last_update"] == {"round": 2, "fate": "accepted", "code": None}
    assert (z["state"], z["profile"], z["blocks"]) == ("refused", None, [])


def document(heartbeat: float, state: str = "running") -> dict[str, Any]:
    progress = Progress(3, 10, "training", ("a",), {"a": (0,)}, arrived=1, seconds_to_deadline=41.0)
    rows = device_rows({"a": ClientRecord("a", online=True)}, {"a": Presence(True, T0)}, {}, {}, {}, progress)
    coord = {"pid": 4242, "host": "coord-host", "federation": "f", "state": state, "started": iso(T0)}
    return status_document(coordinator=coord, devices=rows, progress=progress, recent=[round_summary(record(2))],
                           updated=heartbeat, heartbeat=heartbeat, heartbeat_seconds=5.0)  # fmt: skip


def test_liveness_tells_a_running_coordinator_from_a_stale_finished_or_dead_one() -> None:
    doc = document(T0)
    assert liveness(doc, T0 + 4, "elsewhere", None)[0] is True
    alive, why = liveness(doc, T0 + 60, "elsewhere", None)
    assert not alive and why.startswith("STALE")
    alive, why = liveness(doc, T0 + 1, "coord-host", pid_alive=False)
    assert not alive and "NOT RUNNING" in why and "4242" in why
    alive, why = liveness(document(T0, "finished"), T0 + 1, "coord-host", True)
    assert not alive and "finished" in why


def test_the_table_shows_devices_then_the_round_then_recent_rounds() -> None:
    text = render(document(T0), T0 + 2, "coordinator running")
    devices, rnd, recent = text.index("DEVICES"), text.index("ROUND 3/10"), text.index("RECENT ROUNDS")
    assert devices < rnd < recent
    assert "1/1 updates arrived" in text and "41 s to the deadline" in text
    assert "\na " in text and "online" in text
