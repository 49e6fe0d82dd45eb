"""A real coordinator with its HTTP endpoint on a free loopback port, a fake fleet, a real mosquitto:
``/metrics`` moves with the rounds, ``/status.json`` and ``state_dir/status.json`` list every client
with its blocks and state, and ``fedbe-coordinator status`` reads both."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from fedbe.broker import MosquittoBroker
from tests.integration.conftest import ROOT
from tests.integration.test_faults import coordinator, fake_fleet, state_dir, stop_all, wait_exit, wait_until
from tests.integration.test_faults import write_config as faults_config

CLIENTS = ["c1", "c2", "c3"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as res:
        return bytes(res.read())


def samples(base: str) -> dict[str, float]:
    """The unlabelled samples of a scrape, and ``fedbe_updates_total`` summed over its labels."""
    out: dict[str, float] = {"fedbe_updates_total": 0.0}
    for family in text_string_to_metric_families(get(f"{base}/metrics").decode()):
        for s in family.samples:
            if s.name == "fedbe_updates_total":
                out[s.name] += s.value
            elif not s.labels:
                out[s.name] = s.value
    return out


def status_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "coordinator.cli", "status", *args], cwd=ROOT, text=True,
                          capture_output=True, timeout=60, check=False)  # fmt: skip


def test_metrics_move_with_the_rounds_and_status_lists_every_client(
    broker: MosquittoBroker, tmp_path: Path
) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    config = faults_config(tmp_path / "run.yaml", broker.url, rounds=4, extra=f"http: {{port: {port}}}")
    state = state_dir(config)
    coord = coordinator(config)
    # each fake task takes a second, so the rounds are slow enough to watch them move
    procs = [coord, fake_fleet(tmp_path, broker.url, CLIENTS, "fleet", delay=1.0)]
    try:
        first: dict[str, float] = {}

        def round_closed() -> bool:
            first.update(samples(base) if (state / "status.json").exists() else {})
            return first.get("fedbe_rounds_completed_total", 0) >= 1

        wait_until(round_closed, 120, "a closed round on /metrics", tmp_path, (coord,))
        live: dict[str, Any] = {}

        def training() -> bool:
            live.update(json.loads(get(f"{base}/status.json")))
            return live["round"]["phase"] == "training" and live["round"]["number"] >= 2

        wait_until(training, 60, "round 2 or later in training on /status.json", tmp_path, (coord,))
        devices = {d["id"]: d for d in live["devices"]}
        assert sorted(devices) == CLIENTS and sorted(live["round"]["selected"]) == CLIENTS
        assert live["round"]["expected"] == 3 and live["coordinator"]["state"] == "running"
        for d in devices.values():
            assert (
                d["state"] == "online" and d["since"] and (d["profile"], d["precision"]) == ("fake", "fp32")
            )
            assert d["blocks"] and set(d["blocks"]) <= {0, 1}, d  # 2 blocks
            assert d["last_update"]["fate"] in ("accepted", "received"), d
        assert {b for d in devices.values() for b in d["blocks"]} == {0, 1}  # every block has a trainer
        assert live["recent_rounds"][0]["round"] == 1 and live["recent_rounds"][0]["accepted"] == 3

        on_disk = status_cli("--state", str(state), "--json")
        assert on_disk.returncode == 0, on_disk.stderr
        assert sorted(d["id"] for d in json.loads(on_disk.stdout)["devices"]) == CLIENTS
        over_http = status_cli("--url", base, "--json")
        assert over_http.returncode == 0, over_http.stderr
        assert json.loads(over_http.stdout)["running"] is True
        table = status_cli("--state", str(state))
        assert table.returncode == 0 and "DEVICES (3 online of 3)" in table.stdout, table.stdout

        later: dict[str, float] = {}

        def moved() -> bool:
            later.update(samples(base))
            return later["fedbe_rounds_completed_total"] > first["fedbe_rounds_completed_total"]

        wait_until(moved, 60, "the round counter to move", tmp_path, (coord,))
        assert later["fedbe_updates_total"] > first["fedbe_updates_total"]
        assert later["fedbe_round_duration_seconds_count"] == later["fedbe_rounds_completed_total"]
        assert later["fedbe_clients_online"] == 3
        assert wait_exit(coord, 120, tmp_path) == 0
    finally:
        stop_all(procs)
    done = status_cli("--state", str(state))
    assert done.returncode == 3 and "the coordinator finished" in done.stdout, done.stdout
    final = json.loads((state / "status.json").read_text())
    assert [r["round"] for r in final["recent_rounds"]] == [1, 2, 3, 4]
