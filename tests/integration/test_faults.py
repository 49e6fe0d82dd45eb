"""Faults with real processes against a real mosquitto: a client killed mid-round and restarted, the
broker restarted mid-run, a task over a client's memory budget, the coordinator killed mid-round.

Every process is real: mosquitto on a free loopback port, ``fedbe-coordinator run`` (tiny:llama)
and either ``python -m edge_client.fake`` fleets (the edge protocol with a deterministic fake
trainer, fast enough to time a fault inside a round) or a real ``fedbe-edge run``. A spy subscriber
sees every task and update on the broker, so each test counts what was sent, received, accepted
and lost instead of trusting the coordinator's own account.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from coordinator.checkpoint import CheckpointStore
from coordinator.inbox import OFFLINE_GRACE_SECONDS
from fedbe import protocol
from fedbe.broker import MosquittoBroker, find_mosquitto
from fedbe.errors import CodecError
from fedbe.protocol import ClientTopic, Topics
from fedbe.recipe import Recipe
from fedbe.transport import BrokerConfig, Connection
from tests.integration.conftest import spawn, tiny_client_data

FED = "faults"


def write_config(
    path: Path, url: str, *, rounds: int, min_clients: int = 3, per_round: int = 3, deadline: float = 30.0,
    federation: str = FED, extra: str = "",
) -> Path:  # fmt: skip
    path.write_text(
        f"""
federation: {federation}
model: tiny:llama
state_dir: {path.stem}-state
blocks: 2
rounds: {rounds}
clients_per_round: {per_round}
min_clients: {min_clients}
round_deadline_seconds: {deadline}
upload_level: fp32
seed: 7
training: {{steps: 2, lr: 0.001, lr_decay: 0.5, distill_lambda: [6, 3], batch_size: 4, max_tokens: 32}}
broker: {{url: "{url}"}}
{extra}
"""
    )
    return path


def state_dir(config: Path) -> Path:
    return config.parent / f"{config.stem}-state"


def read_metrics(config: Path) -> list[dict[str, Any]]:
    path = state_dir(config) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def logs(tmp_path: Path) -> str:
    return "\n".join(f"---- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(tmp_path.glob("*.log")))


def wait_until(
    condition: Callable[[], bool], timeout: float, what: str, tmp_path: Path,
    procs: tuple[subprocess.Popen[bytes], ...] = (),
) -> None:  # fmt: skip
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        for p in procs:
            if p.poll() is not None:
                raise AssertionError(
                    f"{p.args!r} exited with {p.returncode} while waiting for {what}\n{logs(tmp_path)}"
                )
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout} s: {what}\n{logs(tmp_path)}")


def wait_exit(proc: subprocess.Popen[bytes], timeout: float, tmp_path: Path) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"{proc.args!r} did not finish in {timeout} s\n{logs(tmp_path)}") from None


def stop_all(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def coordinator(config: Path, log_name: str = "coordinator.log") -> subprocess.Popen[bytes]:
    return spawn(["coordinator.cli", "run", "--config", str(config)], config.parent / log_name)


def fake_fleet(
    tmp_path: Path, url: str, ids: list[str], name: str, delay: float = 0.0, federation: str = FED
) -> subprocess.Popen[bytes]:
    """``python -m edge_client.fake`` as its own process (so it can be killed); its counts go to NAME.json."""
    return spawn(
        ["edge_client.fake", "--broker", url, "--clients", ",".join(ids), "--federation", federation,
         "--delay", str(delay), "--timeout", "240", "--report", str(tmp_path / f"{name}.json")],
        tmp_path / f"{name}.log",
    )  # fmt: skip


@dataclass
class Spy:
    """A second subscriber to every client's task, update and error topic: what really went over the broker."""

    conn: Connection
    topics: Topics
    tasks: list[tuple[int, str, tuple[int, ...]]] = field(default_factory=list)  # (round, client, blocks)
    updates: list[tuple[int, str]] = field(default_factory=list)  # (round, client)
    errors: list[tuple[int, str, str]] = field(default_factory=list)  # (round, client, code)
    recipes: set[Recipe] = field(default_factory=set)  # the recipes the training tasks carried
    lrs: dict[int, set[float]] = field(default_factory=dict)  # round -> the lr its training tasks train at
    lambdas: dict[int, set[float]] = field(default_factory=dict)  # round -> their distill_lambda then

    def drain(self) -> Spy:
        while not self.conn.inbox.empty():
            topic, payload = self.conn.inbox.get()
            parsed = self.topics.parse_client_topic(topic)
            assert parsed is not None, topic
            cid, kind = parsed
            try:
                if kind is ClientTopic.TASK:
                    task = protocol.decode(payload, expected_type=protocol.TaskMessage)
                    if not task.evaluate:
                        self.tasks.append((task.round, cid, tuple(task.block_ids)))
                        self.recipes.add(task.recipe)
                        self.lrs.setdefault(task.round, set()).add(task.recipe.lr_in_round(task.round))
                        self.lambdas.setdefault(task.round, set()).add(
                            task.recipe.distill_lambda_in_round(task.round)
                        )
                elif kind is ClientTopic.UPDATE:
                    self.updates.append(
                        (protocol.decode(payload, expected_type=protocol.UpdateMessage).round, cid)
                    )
                elif kind is ClientTopic.ERROR:
                    err = protocol.decode(payload, expected_type=protocol.TaskErrorMessage)
                    self.errors.append((err.round, cid, err.code))
            except CodecError as exc:  # nothing in these tests sends a broken frame
                raise AssertionError(f"undecodable {kind.value} from {cid}: {exc}") from exc
        return self

    def task_rounds(self, client: str) -> list[int]:
        return [r for r, c, _ in self.drain().tasks if c == client]


@pytest.fixture
def spy(broker: MosquittoBroker) -> Iterator[Spy]:
    conn = Connection(BrokerConfig(url=broker.url, client_id="fault-spy"))
    conn.start()
    topics = Topics(FED)
    for kind in (ClientTopic.TASK, ClientTopic.UPDATE, ClientTopic.ERROR):
        conn.subscribe(topics.all_clients(kind))
    yield Spy(conn, topics)
    conn.close()


def accepted(metrics: list[dict[str, Any]]) -> Counter[tuple[int, str]]:
    return Counter((m["round"], cid) for m in metrics for cid in m["updates"])


# -- 1. a client killed mid-round --------------------------------------------------------------------
def test_client_killed_mid_round_is_left_out_then_rejoins_and_gets_work(
    broker: MosquittoBroker, spy: Spy, tmp_path: Path
) -> None:
    """``kill -9`` of a fake client while it "trains" its round-2 task (it takes 4 s per task).

    Its last will marks it offline at once; once it has stayed offline for ``OFFLINE_GRACE_SECONDS``
    round 2 closes with the two others, before the deadline; ``min_clients: 3`` then holds round 3
    until the same client id is started again, and
    round 3 gives it blocks and accepts its update. Every update that went over the broker is
    accepted, and the only missing one is the killed client's round-2 update.
    """
    deadline = 30.0
    config = write_config(tmp_path / "run.yaml", broker.url, rounds=3, deadline=deadline)
    coord = coordinator(config)
    procs = [coord, fake_fleet(tmp_path, broker.url, ["c1", "c2"], "fleet")]
    victim = fake_fleet(tmp_path, broker.url, ["victim"], "victim", delay=4.0)
    try:
        wait_until(lambda: 2 in spy.task_rounds("victim"), 120, "the victim's round-2 task", tmp_path,
                   (coord, victim))  # fmt: skip
        time.sleep(1.0)  # mid-task: the fake trainer needs 4 s
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=10)
        wait_until(
            lambda: len(read_metrics(config)) >= 2, 2 * deadline, "round 2 to close", tmp_path, (coord,)
        )
        second = read_metrics(config)[1]
        assert second["round"] == 2 and second["assignments"]["victim"], second
        assert sorted(second["updates"]) == ["c1", "c2"], second
        assert second["closed_by"] == "all answered", second
        assert OFFLINE_GRACE_SECONDS < second["seconds"] < deadline, second
        time.sleep(1.0)
        assert len(read_metrics(config)) == 2, "round 3 must wait for the third client (min_clients: 3)"
        procs.append(fake_fleet(tmp_path, broker.url, ["victim"], "victim-again"))
        assert wait_exit(coord, 120, tmp_path) == 0
    finally:
        stop_all([*procs, victim])
    metrics = read_metrics(config)
    assert [m["round"] for m in metrics] == [1, 2, 3]
    third = metrics[2]
    assert third["assignments"]["victim"] and "victim" in third["updates"], third
    assert spy.task_rounds("victim") == [1, 2, 3]
    # every task carries the run's training section as its recipe, unchanged from round to round
    assert spy.recipes == {
        Recipe(steps=2, lr=0.001, lr_decay=0.5, distill_lambda=(6.0, 3.0), batch_size=4, max_tokens=32)
    }
    # training.lr_decay 0.5: every task of round r trains at lr x 0.5^(r-1)
    assert spy.lrs == {1: {1e-3}, 2: {5e-4}, 3: {2.5e-4}}
    # training.distill_lambda [6, 3]: 6 in round 1, then the last value in every later round
    assert spy.lambdas == {1: {6.0}, 2: {3.0}, 3: {3.0}}
    sent = Counter(spy.drain().updates)
    assert sent == accepted(metrics)  # every update on the broker was accepted, none twice
    expected = {(r, c) for r in (1, 2, 3) for c in ("c1", "c2", "victim")} - {(2, "victim")}
    assert set(sent) == expected  # lost: exactly the killed client's round-2 update
    assert all(not m["rejected"] and not m["errors"] for m in metrics)


# -- 2. the broker restarted mid-run -----------------------------------------------------------------
def test_broker_restart_mid_round_both_sides_reconnect_and_the_run_finishes(tmp_path: Path) -> None:
    """mosquitto is stopped in the middle of round 2 (one of three updates in, the fake trainer takes
    1 s per task) and started again 3 s later on the same port, from its persistence file.

    Both the coordinator and the fleet reconnect by themselves (paho's backoff, persistent sessions
    restored by the broker) and all four rounds complete with every client's update. What each side
    sent is counted against what the other received and accepted: nothing lost, nothing counted
    twice (the wills mosquitto fires at its shutdown mark every client offline for a moment: the
    round waits ``OFFLINE_GRACE_SECONDS`` for them instead of closing without their updates).
    """
    if find_mosquitto() is None:
        pytest.skip("mosquitto is not installed (scripts/setup.sh installs it)")
    broker = MosquittoBroker(persistence=True).start()
    ids = ["b1", "b2", "b3"]
    rounds = 4
    config = write_config(tmp_path / "run.yaml", broker.url, rounds=rounds, deadline=20.0)
    coord = coordinator(config)
    fleet = fake_fleet(tmp_path, broker.url, ids, "fleet", delay=1.0)
    try:
        wait_until(lambda: len(read_metrics(config)) >= 1, 120, "round 1 to close", tmp_path, (coord, fleet))
        time.sleep(1.5)  # round 2: its tasks are out, one update in, two being "trained"
        broker.stop()
        assert len(read_metrics(config)) == 1, "round 2 closed before the broker went down"
        time.sleep(3.0)
        broker.start()
        assert wait_exit(coord, 120, tmp_path) == 0
        assert wait_exit(fleet, 60, tmp_path) == 0  # it saw the "finished" status after the restart
    finally:
        stop_all([coord, fleet])
        broker.close()
    metrics = read_metrics(config)
    assert [m["round"] for m in metrics] == list(range(1, rounds + 1))
    for m in metrics:
        assert sorted(m["updates"]) == ids and not m["errors"], m
        # QoS 1 is at least once: a copy in flight at the shutdown may come twice, and must then be a
        # rejected duplicate (a task delivered twice is answered twice), never counted
        assert all(r["reason"] == "duplicate" for r in m["rejected"]), m
    duplicates = sum(len(m["rejected"]) for m in metrics)
    coordinator_log = (tmp_path / "coordinator.log").read_text()
    assert "disconnected from" in coordinator_log and "b1 is offline" in coordinator_log  # the wills fired
    report = json.loads((tmp_path / "fleet.json").read_text())
    expected = rounds * len(ids)
    assert sum(len(m["bytes_down"]) for m in metrics) == expected  # one task per client and round
    extra = report["received"]["task"] - expected  # 0 unless the broker delivered a task twice
    assert 0 <= extra <= duplicates and report["sent"]["update"] == expected + extra, report


# -- 3. a task over a client's memory budget ---------------------------------------------------------
SMALL_PROFILE = """name: small-fault-test
device_kind: cpu
precision: fp32
batch_size: 4
max_tokens: 48
emulate:
  memory_cap_bytes: {cap}
  compute_slowdown: 1.0
"""


def test_task_over_the_memory_budget_is_refused_and_the_client_gets_fewer_blocks_next_round(
    broker: MosquittoBroker, spy: Spy, tmp_path: Path
) -> None:
    """A real ``fedbe-edge run --emulate`` whose profile caps its memory so that it can train two
    blocks where its own profile puts them, but not where the federation puts them.

    The edge announces ``max_trainable_blocks`` from its profile's interleaved expansion (new
    blocks at layers 2 and 5 of 6, backward down to layer 2); the federation places its two blocks
    after base layers 0 and 1 (layers 1 and 3), so backward runs one layer deeper. The cap lies
    between the memory of the two: the announce says 2, the task for both blocks is over budget.
    The real agent's check before training (``fits``, by position) refuses it with
    ``refused_memory``; the coordinator's registry lowers the client's limit to one block and
    round 2 gives it one block, which it trains. (The out-of-memory exception path of the agent
    can not be forced on a CPU; this is the check that runs first.)
    """
    from edge_client.device_report import build_report  # noqa: PLC0415 - torch and a model: only here
    from fedbe.device_profile import load_profile  # noqa: PLC0415

    profile = tmp_path / "small.yaml"
    profile.write_text(SMALL_PROFILE.format(cap="1GiB"))
    memory = build_report(load_profile(profile), "tiny:llama", n_blocks=2, emulating=True).memory
    assert memory.new_layer_indices == (2, 5)
    announced = memory.required_bytes_at(2, 2)  # the worst case behind max_trainable_blocks = 2
    both = memory.required_bytes_at(1, 2)  # the federation's blocks at layers 1 and 3
    one = max(memory.required_bytes_at(1, 1), memory.required_bytes_at(3, 1))
    assert max(announced, one) < both
    cap = (max(announced, one) + both) // 2
    profile.write_text(SMALL_PROFILE.format(cap=cap))
    config = write_config(
        tmp_path / "run.yaml", broker.url, rounds=2, min_clients=1, per_round=1, deadline=120,
        extra="placement: [0, 1]\nallocation: {max_unprotected_risk: 1.0}",
    )  # fmt: skip
    data = tiny_client_data(tmp_path / "small.jsonl", ["sport", "tech"], 24, seed=0)
    coord = coordinator(config)
    edge = spawn(
        ["edge_client.cli", "run", "--broker", broker.url, "--client-id", "small", "--data", str(data),
         "--model", "tiny:llama", "--federation", FED, "--profile", str(profile), "--emulate"],
        tmp_path / "edge.log",
    )  # fmt: skip
    try:
        assert wait_exit(coord, 300, tmp_path) == 0
    finally:
        stop_all([coord, edge])
    first, second = read_metrics(config)
    assert first["assignments"] == {"small": [0, 1]}, first
    assert [(e["client"], e["code"]) for e in first["errors"]] == [("small", "refused_memory")]
    assert "exceeds this device's memory budget" in first["errors"][0]["reason"] and not first["updates"]
    assert len(second["assignments"]["small"]) == 1 and list(second["updates"]) == ["small"], second
    assert second["updates"]["small"]["blocks"] == second["assignments"]["small"] and not second["errors"]
    spy.drain()
    assert [(r, b) for r, c, b in spy.tasks if c == "small"] == [
        (1, (0, 1)),
        (2, tuple(second["assignments"]["small"])),
    ]
    assert spy.errors == [(1, "small", "refused_memory")] and spy.updates == [(2, "small")]
    snapshot = CheckpointStore(state_dir(config)).load_latest()
    assert snapshot is not None
    record: Any = snapshot.clients["small"]
    assert record["memory_limit_blocks"] == 1 and record["failures"] == 1
    assert record["announce"]["max_trainable_blocks"] == 2  # what it claimed; the limit overrides it


# -- 4. the coordinator killed mid-round -------------------------------------------------------------
def test_coordinator_killed_mid_round_loses_no_update_and_ends_with_the_weights_of_an_uninterrupted_run(
    broker: MosquittoBroker, spy: Spy, tmp_path: Path
) -> None:
    """Two runs of the same federation, side by side on two brokers: one uninterrupted, one whose
    coordinator is killed with ``kill -9`` in round 2 after at least one update of that round was
    accepted (its frame is in ``pending/``), then started again on the same state directory.

    The clients are fake fleets, so training is deterministic (the delta is a function of client id
    and round) and takes the same simulated time in both runs. The coordinator's choices depend
    only on the seed, the snapshot and what clients announce and report, and it aggregates in
    client-id order: the two runs must end with bit-identical weights. (With real ``fedbe-edge``
    trainers the allocation can differ: it uses each client's measured step time, which is never
    the same twice; what holds then is what this test also checks: no accepted update is lost or
    trained again, and every round completes.)

    Counted: the updates accepted before the kill must be reused without sending those clients a
    task again, and every update a client sent is either accepted once or rejected as a duplicate.
    """
    ids = ["k1", "k2", "k3"]
    rounds = 4
    other = MosquittoBroker().start()
    every_block = "allocation: {max_unprotected_risk: 1.0}"  # the top block too: a less trivial allocation
    calm = write_config(tmp_path / "calm.yaml", other.url, rounds=rounds, extra=every_block)
    killed = write_config(tmp_path / "killed.yaml", broker.url, rounds=rounds, extra=every_block)
    pending = state_dir(killed) / "pending" / "round-000002"
    procs = [
        coordinator(calm, "coordinator-calm.log"),
        fake_fleet(tmp_path, other.url, ids, "fleet-calm", 0.7),
    ]
    victim = coordinator(killed, "coordinator-killed.log")
    procs.append(fake_fleet(tmp_path, broker.url, ids, "fleet-killed", delay=0.7))
    try:
        wait_until(lambda: pending.is_dir() and any(pending.glob("*.frame")), 120,
                   "an accepted update in round 2", tmp_path, (victim,))  # fmt: skip
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=10)
        kept = sorted(p.stem for p in pending.glob("*.frame"))
        assert len(read_metrics(killed)) == 1, "round 2 closed before the kill"
        procs.append(coordinator(killed, "coordinator-resumed.log"))
        for p in procs:
            assert wait_exit(p, 180, tmp_path) == 0, p.args
    finally:
        stop_all([*procs, victim])
        other.close()
    for cid in kept:  # accepted before the kill: reused, never asked for again
        assert spy.task_rounds(cid).count(2) == 1, (cid, spy.tasks)
    resumed_log = (tmp_path / "coordinator-resumed.log").read_text()
    assert "resuming after round 1" in resumed_log
    recovered = re.search(r"\((\d+) updates recovered\)", resumed_log)
    assert recovered is not None and int(recovered[1]) >= len(kept) >= 1, resumed_log
    calm_metrics, killed_metrics = read_metrics(calm), read_metrics(killed)
    assert [m["round"] for m in calm_metrics] == [m["round"] for m in killed_metrics] == [1, 2, 3, 4]
    for a, b in zip(calm_metrics, killed_metrics, strict=True):
        assert a["assignments"] == b["assignments"]
        assert sorted(a["updates"]) == sorted(b["updates"]) == ids  # every client's update counted, once
    fleet = json.loads((tmp_path / "fleet-killed.json").read_text())
    duplicates = sum(1 for m in killed_metrics for r in m["rejected"] if r["reason"] == "duplicate")
    assert all(r["reason"] == "duplicate" for m in killed_metrics for r in m["rejected"])
    assert fleet["sent"]["update"] == sum(len(m["updates"]) for m in killed_metrics) + duplicates
    assert Counter(spy.drain().updates) == Counter(
        (m["round"], c)
        for m in killed_metrics
        for c in [*m["updates"], *(r["client"] for r in m["rejected"])]
    )
    calm_state, killed_state = (
        CheckpointStore(state_dir(calm)).load_latest(),
        CheckpointStore(state_dir(killed)).load_latest(),
    )
    assert (
        calm_state is not None
        and killed_state is not None
        and killed_state.round == calm_state.round == rounds
    )
    assert calm_state.global_state.keys() == killed_state.global_state.keys()
    for block, params in calm_state.global_state.items():
        for name, tensor in params.items():
            assert torch.equal(killed_state.global_state[block][name], tensor), (block, name)
    assert any(
        not torch.equal(t, torch.zeros_like(t)) for p in calm_state.global_state.values() for t in p.values()
    )
