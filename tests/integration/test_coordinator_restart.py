"""The coordinator killed mid-round while an assigned client is still training, with real processes
on a real mosquitto: the resumed round keeps its saved plan, so the update that client sent while
the coordinator was down (queued by the broker in the coordinator's persistent session) counts."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from coordinator.checkpoint import CheckpointStore
from fedbe.broker import MosquittoBroker
from fedbe.protocol import ClientTopic, Topics
from fedbe.transport import BrokerConfig, Connection
from tests.integration.test_faults import (
    FED,
    Spy,
    coordinator,
    fake_fleet,
    read_metrics,
    state_dir,
    stop_all,
    wait_exit,
    wait_until,
    write_config,
)


@pytest.fixture
def spy(broker: MosquittoBroker) -> Iterator[Spy]:
    conn = Connection(BrokerConfig(url=broker.url, client_id="restart-spy"))
    conn.start()
    topics = Topics(FED)
    for kind in (ClientTopic.TASK, ClientTopic.UPDATE, ClientTopic.ERROR):
        conn.subscribe(topics.all_clients(kind))
    yield Spy(conn, topics)
    conn.close()


def _kill_mid_round_and_resume(
    broker: MosquittoBroker, spy: Spy, tmp_path: Path, r3_sends: bool
) -> tuple[Path, list[dict[str, Any]], str]:
    """Round 2 of 2 assigns all three clients (``min_clients: 2``); the coordinator is killed with
    ``kill -9`` once the two fast clients' updates are on disk, while the slow ``r3`` still trains.
    ``r3_sends``: r3 publishes its update while the coordinator is down; either way r3 is then
    killed for good, so it is not online when the coordinator comes back on the same state dir."""
    config = write_config(tmp_path / "restart.yaml", broker.url, rounds=2, min_clients=2, per_round=3)
    pending = state_dir(config) / "pending" / "round-000002"
    fast = fake_fleet(tmp_path, broker.url, ["r1", "r2"], "fleet-fast", delay=0.2)
    slow = fake_fleet(tmp_path, broker.url, ["r3"], "fleet-slow", delay=3.0)
    victim = coordinator(config, "coordinator-killed.log")
    procs = [fast, slow, victim]
    try:
        wait_until(lambda: {p.stem for p in pending.glob("*.frame")} >= {"r1", "r2"}, 120,
                   "the fast clients' round-2 updates on disk", tmp_path, (victim,))  # fmt: skip
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=10)
        assert not (pending / "r3.frame").exists(), "r3 answered before the kill: the test proves nothing"
        assert 2 in spy.task_rounds("r3"), spy.tasks  # r3 was assigned in round 2
        if r3_sends:
            wait_until(lambda: (2, "r3") in spy.drain().updates, 30, "r3's round-2 update on the broker",
                       tmp_path, (slow,))  # fmt: skip
        slow.send_signal(signal.SIGKILL)
        slow.wait(timeout=10)
        resumed = coordinator(config, "coordinator-resumed.log")
        procs.append(resumed)
        assert wait_exit(resumed, 120, tmp_path) == 0
        assert wait_exit(fast, 60, tmp_path) == 0
    finally:
        stop_all(procs)
    assert (2, "r3") in spy.drain().updates if r3_sends else (2, "r3") not in spy.updates
    return config, read_metrics(config), (tmp_path / "coordinator-resumed.log").read_text()


def test_an_update_sent_while_the_coordinator_is_down_counts_in_the_resumed_round(
    broker: MosquittoBroker, spy: Spy, tmp_path: Path
) -> None:
    """Planned again, the resumed round would go to the two clients back online and refuse r3's
    queued update as ``unassigned_client``; resumed with its saved plan it accepts all three."""
    config, metrics, resumed_log = _kill_mid_round_and_resume(broker, spy, tmp_path, r3_sends=True)
    assert [m["round"] for m in metrics] == [1, 2]
    assert not any(r["reason"] == "unassigned_client" for m in metrics for r in m["rejected"]), metrics
    assert "unassigned_client" not in metrics[-1]["rejections_by_reason"]
    assert sorted(metrics[-1]["updates"]) == ["r1", "r2", "r3"], metrics[-1]
    assert sorted(metrics[-1]["assignments"]) == ["r1", "r2", "r3"]
    snapshot = CheckpointStore(state_dir(config)).load_latest()
    assert snapshot is not None and snapshot.round == 2
    record: dict[str, list[dict[str, int]]] = snapshot.clients["r3"]  # type: ignore[assignment]
    assert 2 in [h["round"] for h in record["history"]]  # r3's round-2 update counted for it
    assert "resuming after round 1" in resumed_log and "resuming its saved plan" in resumed_log, resumed_log
    assert not (state_dir(config) / "pending").exists() or not any((state_dir(config) / "pending").iterdir())


def test_a_resumed_round_whose_assigned_client_never_returns_still_closes(
    broker: MosquittoBroker, spy: Spy, tmp_path: Path
) -> None:
    """The saved plan keeps r3 assigned, but r3 is gone for good and sent nothing: the round must
    not wait for it forever; it closes with the two updates it has (r3 counts as gone once offline
    for the grace period, well before the hard limit of 3 x the deadline)."""
    _, metrics, resumed_log = _kill_mid_round_and_resume(broker, spy, tmp_path, r3_sends=False)
    assert [m["round"] for m in metrics] == [1, 2]
    last = metrics[-1]
    assert sorted(last["assignments"]) == ["r1", "r2", "r3"] and sorted(last["updates"]) == ["r1", "r2"]
    assert last["closed_by"] in ("all answered", "deadline"), last
    assert "resuming its saved plan" in resumed_log
