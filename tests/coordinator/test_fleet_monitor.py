"""The monitor between the daemon and the document: a round's life as status.json shows it, the
throttle, the metrics agreeing with the document, and the recent rounds of a resumed run."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from coordinator.config import parse_run_config
from coordinator.fleet_monitor import MIN_INTERVAL_SECONDS, FleetMonitor
from coordinator.registry import ClientRegistry
from tests.coordinator.test_fleet_status import record
from tests.coordinator.test_prometheus_metrics import scrape


class Clock:
    def __init__(self) -> None:
        self.wall, self.mono = 1_700_000_000.0, 100.0

    def advance(self, seconds: float) -> None:
        self.wall += seconds
        self.mono += seconds


def announce(profile: str) -> Any:
    return SimpleNamespace(profile_name=profile, device_kind="cpu", precision="fp32")


def setup(tmp_path: Path) -> tuple[FleetMonitor, ClientRegistry, Clock]:
    cfg = parse_run_config({"model": "tiny:llama", "state_dir": "state", "rounds": 5}, "run.yaml", tmp_path)
    clock = Clock()
    monitor = FleetMonitor(cfg, clock=lambda: clock.wall, monotonic=lambda: clock.mono)
    clients = ClientRegistry("fp")
    for cid in ("a", "b"):
        rec = clients.record(cid)
        rec.online, rec.announce = True, announce(f"profile-{cid}")
    monitor.attach(clients, 0)
    return monitor, clients, clock


def on_disk(tmp_path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((tmp_path / "state" / "status.json").read_text())
    return data


def test_a_round_as_status_json_shows_it(tmp_path: Path) -> None:
    monitor, clients, clock = setup(tmp_path)
    collector = SimpleNamespace(round=1, updates={}, errors={}, rejected=[])
    monitor.round_started(1, ("a", "b"), {"a": (0,), "b": (1,)}, collector, clock.mono + 60)  # type: ignore[arg-type]
    doc = on_disk(tmp_path)
    assert doc["round"] | {"seconds_to_deadline": None} == {
        "number": 1, "of": 5, "phase": "training", "selected": ["a", "b"], "expected": 2, "arrived": 0,
        "errors": 0, "rejected": 0, "seconds_to_deadline": None,
    }  # fmt: skip
    assert [(d["id"], d["profile"], d["blocks"], d["state"]) for d in doc["devices"]] == [
        ("a", "profile-a", [0], "online"), ("b", "profile-b", [1], "online")]  # fmt: skip

    collector.updates["a"] = object()
    clients.on_status("b", "offline")
    clock.advance(MIN_INTERVAL_SECONDS / 2)
    monitor.tick()  # throttled: not rebuilt yet
    assert on_disk(tmp_path)["round"]["arrived"] == 0
    clock.advance(MIN_INTERVAL_SECONDS)
    monitor.tick()
    doc = on_disk(tmp_path)
    assert doc["round"]["arrived"] == 1 and doc["round"]["seconds_to_deadline"] == 58.5
    a, b = doc["devices"]
    assert a["last_update"] == {"round": 1, "fate": "received", "code": None}
    assert b["state"] == "offline" and b["since"] == doc["updated"]

    clock.advance(5)
    monitor.tick()  # nothing changed: the file keeps its time of the last change
    assert on_disk(tmp_path)["updated"] == doc["updated"]

    line = record(
        1, updates={"a": {}}, rejected=[], errors=[{"client": "b", "code": "abandoned", "reason": ""}]
    )
    monitor.phase("closing")
    monitor.round_closed(line)
    doc = on_disk(tmp_path)
    assert doc["round"]["phase"] == "waiting" and doc["recent_rounds"][-1]["round"] == 1
    assert [d["last_update"]["fate"] for d in doc["devices"]] == ["accepted", "error"]
    assert [d["last_round"] for d in doc["devices"]] == [1, 1]
    # the metrics say what the document says
    got = scrape(monitor.metrics)
    assert got[("fedbe_rounds_completed_total", ())] == len(doc["recent_rounds"]) == 1
    assert got[("fedbe_clients_online", ())] == sum(d["state"] == "online" for d in doc["devices"]) == 1
    assert (
        got[("fedbe_updates_total", (("outcome", "accepted"), ("reason", "")))]
        == doc["recent_rounds"][0]["accepted"]
    )

    monitor.state("finished")
    assert on_disk(tmp_path)["coordinator"]["state"] == "finished"
    assert on_disk(tmp_path)["round"]["phase"] == "finished"


def test_a_resumed_run_shows_its_last_rounds_from_metrics_jsonl(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    lines = [record(r) for r in range(0, 9)] + [{"torn": True}]
    (state / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"round": 9, "upd')
    monitor, _, _ = setup(tmp_path)
    assert [r["round"] for r in on_disk(tmp_path)["recent_rounds"]] == list(range(1, 9))
    assert monitor.routes()["/status.json"]().body == (state / "status.json").read_bytes()


def test_the_baseline_evaluation_is_round_0_of_the_charts_and_counts_no_round(tmp_path: Path) -> None:
    monitor, _, _ = setup(tmp_path)
    baseline = {"round": 0, "closed_by": "baseline", "seconds": 3.0,
                "server_evaluation": {"accuracy": 0.59}}  # fmt: skip
    monitor.baseline_scored(baseline)
    doc = on_disk(tmp_path)
    assert [(r["round"], r["accuracy"]) for r in doc["recent_rounds"]] == [(0, 0.59)]
    assert doc["round"]["number"] == 0 and doc["round"]["phase"] == "waiting"
    samples = scrape(monitor.metrics)
    assert samples[("fedbe_accuracy", (("source", "server"),))] == 0.59
    assert samples[("fedbe_rounds_completed_total", ())] == 0
