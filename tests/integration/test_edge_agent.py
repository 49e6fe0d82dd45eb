"""One real ``fedbe-edge run`` process against a real mosquitto; the test plays the coordinator."""

from __future__ import annotations

import signal
import time
from dataclasses import replace
from pathlib import Path

import pytest

from fedbe import protocol
from fedbe.blocks import block_layout, get_block_state
from fedbe.broker import MosquittoBroker
from fedbe.compression import Level, compress_state, decompress_state
from fedbe.expansion import expand_model, plan_expansion
from fedbe.fingerprint import base_fingerprint
from fedbe.protocol import ClientTopic, Topics
from fedbe.recipe import PLAIN
from fedbe.sources import build_tiny_model
from fedbe.transport import BrokerConfig, Connection
from tests.integration.conftest import spawn, tiny_client_data

FED = "edge-test"


def _wait_for(conn: Connection, topic: str, timeout: float, proc=None) -> bytes:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the edge process exited with code {proc.returncode}")
        try:
            got, payload = conn.inbox.get(timeout=0.5)
        except Exception:  # noqa: BLE001 - queue.Empty
            continue
        if got == topic:
            return payload
    raise AssertionError(f"nothing on {topic} within {timeout} s")


@pytest.fixture
def coordinator_side(broker: MosquittoBroker):  # type: ignore[no-untyped-def]
    conn = Connection(BrokerConfig(url=broker.url, client_id="test-coordinator"))
    conn.start()
    yield conn
    conn.close()


def start_agent(  # type: ignore[no-untyped-def]
    broker: MosquittoBroker, conn: Connection, tmp_path: Path, cid: str, labels: list[str], n: int
):
    """Publish a coordinator status for a 2-block tiny llama federation and start one agent on it."""
    topics = Topics(FED)
    for kind in (ClientTopic.ANNOUNCE, ClientTopic.UPDATE, ClientTopic.ERROR, ClientTopic.STATUS):
        conn.subscribe(topics.client(cid, kind))
    base = build_tiny_model("llama")
    fingerprint = base_fingerprint(base)
    registry = expand_model(base, plan_expansion(4, 2, "interleave"))
    sources = tuple(b.source_layer for b in registry.blocks)
    status = protocol.CoordinatorStatusMessage(
        "running", 0, fingerprint, 4, registry.new_layer_indices, sources
    )
    conn.publish(topics.coordinator_status(), protocol.encode(status), retain=True, wait=10)
    data = tiny_client_data(tmp_path / f"{cid}.jsonl", labels, n, seed=len(labels))
    proc = spawn(
        ["edge_client.cli", "run", "--broker", broker.url, "--client-id", cid, "--data", str(data),
         "--model", "tiny:llama", "--federation", FED],
        tmp_path / "edge.log",
    )  # fmt: skip
    return base, registry, fingerprint, proc


def test_edge_agent_trains_its_task_and_its_will_fires_when_killed(
    broker: MosquittoBroker, coordinator_side: Connection, tmp_path: Path
) -> None:
    topics = Topics(FED)
    conn = coordinator_side
    base, registry, fingerprint, proc = start_agent(broker, conn, tmp_path, "dev1", ["sport", "tech"], 24)
    try:
        announce = protocol.decode(
            _wait_for(conn, topics.client("dev1", ClientTopic.ANNOUNCE), 180, proc),
            expected_type=protocol.AnnounceMessage,
        )
        assert announce.base_fingerprint == fingerprint
        assert announce.max_trainable_blocks >= 1 and announce.block_step_seconds > 0
        assert announce.label_histogram == {"sport": 12.0, "tech": 12.0}  # all local data, no noise asked
        assert 0 < announce.num_examples < 24  # the rest is held out for federated evaluation

        # Broken and impossible tasks are refused with a reason sent back; the agent carries on.
        conn.publish(topics.client("dev1", ClientTopic.TASK), b"FBEW garbage", wait=10)
        err = protocol.decode(_wait_for(conn, topics.client("dev1", ClientTopic.ERROR), 60, proc),
                              expected_type=protocol.TaskErrorMessage)  # fmt: skip
        assert err.code == "invalid_task" and "frame" in err.reason
        unknown = protocol.TaskMessage(
            round=1, task_id="bad", client_id="dev1", block_ids=(7,), download_level=Level.FP32, weights={},
            upload_level=Level.FP32, recipe=replace(PLAIN, steps=1, lr=1e-3, batch_size=4, max_tokens=64),
            deadline_seconds=60.0, seed=0, evaluate=False,
        )  # fmt: skip
        conn.publish(topics.client("dev1", ClientTopic.TASK), protocol.encode(unknown), wait=10)
        err = protocol.decode(_wait_for(conn, topics.client("dev1", ClientTopic.ERROR), 60, proc),
                              expected_type=protocol.TaskErrorMessage)  # fmt: skip
        assert (err.code, err.task_id) == ("invalid_task", "bad") and "unknown blocks [7]" in err.reason
        idle = replace(unknown, task_id="idle", block_ids=())  # no block to train and no evaluation
        conn.publish(topics.client("dev1", ClientTopic.TASK), protocol.encode(idle), wait=10)
        err = protocol.decode(_wait_for(conn, topics.client("dev1", ClientTopic.ERROR), 60, proc),
                              expected_type=protocol.TaskErrorMessage)  # fmt: skip
        assert (err.code, err.task_id) == ("invalid_task", "idle") and "nothing to do" in err.reason

        weights = get_block_state(base, registry, [1])
        for p in weights[1].values():  # the federation's current weights differ from the initial copy
            p.add_(0.01)
        compressed, _ = compress_state(weights, Level.FP32)
        task = protocol.TaskMessage(
            round=1, task_id="t1", client_id="dev1", block_ids=(1,), download_level=Level.FP32,
            weights=compressed, upload_level=Level.FP32,
            recipe=replace(PLAIN, steps=3, lr=1e-3, batch_size=4, max_tokens=64),
            deadline_seconds=120.0, seed=0, evaluate=False,
        )  # fmt: skip
        conn.publish(topics.client("dev1", ClientTopic.TASK), protocol.encode(task), wait=10)
        layout = block_layout(base, registry, [1])
        update = protocol.decode(
            _wait_for(conn, topics.client("dev1", ClientTopic.UPDATE), 180, proc),
            expected_type=protocol.UpdateMessage, expected_layout=layout, allowed_blocks=(1,),
        )  # fmt: skip
        assert update.round == 1 and update.task_id == "t1" and set(update.blocks) == {1}
        assert update.num_steps == 3 and update.num_samples == 12
        delta = decompress_state(update.blocks)[1]
        assert {n: tuple(t.shape) for n, t in delta.items()} == layout[1]
        assert sum(float(t.abs().sum()) for t in delta.values()) > 0

        # Federated evaluation: no training, every block's weights, loss and accuracy come back.
        conn.subscribe(topics.client("dev1", ClientTopic.EVAL))
        everything, _ = compress_state(get_block_state(base, registry), Level.FP32)
        evaluate = protocol.TaskMessage(
            round=1, task_id="e1", client_id="dev1", block_ids=(), download_level=Level.FP32, weights=everything,
            upload_level=Level.FP32, recipe=replace(PLAIN, lr=1e-3, batch_size=4, max_tokens=64),
            deadline_seconds=60.0, seed=0, evaluate=True,
        )  # fmt: skip
        conn.publish(topics.client("dev1", ClientTopic.TASK), protocol.encode(evaluate), wait=10)
        result = protocol.decode(_wait_for(conn, topics.client("dev1", ClientTopic.EVAL), 120, proc),
                                 expected_type=protocol.EvalResultMessage)  # fmt: skip
        assert result.task_id == "e1" and result.num_examples == 24 - announce.num_examples
        assert result.loss > 0 and 0.0 <= result.accuracy <= 1.0

        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            payload = _wait_for(conn, topics.client("dev1", ClientTopic.STATUS), 30)
            if protocol.decode(payload, expected_type=protocol.StatusMessage).state == "offline":
                break
        else:
            raise AssertionError("the last will (offline status) did not arrive")
    finally:
        if proc.poll() is None:
            proc.kill()
        print((tmp_path / "edge.log").read_text()[-3000:])


def test_sigterm_mid_task_reports_the_round_abandoned_and_goes_offline(
    broker: MosquittoBroker, coordinator_side: Connection, tmp_path: Path
) -> None:
    topics = Topics(FED)
    conn = coordinator_side
    base, registry, fingerprint, proc = start_agent(broker, conn, tmp_path, "dev2", ["sport"], 12)
    try:
        _wait_for(conn, topics.client("dev2", ClientTopic.ANNOUNCE), 180, proc)
        compressed, _ = compress_state(get_block_state(base, registry, [0]), Level.FP32)
        task = protocol.TaskMessage(
            round=4, task_id="long", client_id="dev2", block_ids=(0,), download_level=Level.FP32,
            weights=compressed, upload_level=Level.FP32,
            recipe=replace(PLAIN, steps=100000, lr=1e-3, batch_size=2, max_tokens=32),
            deadline_seconds=0.0, seed=0, evaluate=False,
        )  # fmt: skip
        conn.publish(topics.client("dev2", ClientTopic.TASK), protocol.encode(task), wait=10)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            payload = _wait_for(conn, topics.client("dev2", ClientTopic.STATUS), 60, proc)
            if protocol.decode(payload, expected_type=protocol.StatusMessage).state == "training":
                break
        time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        err = protocol.decode(_wait_for(conn, topics.client("dev2", ClientTopic.ERROR), 60),
                              expected_type=protocol.TaskErrorMessage)  # fmt: skip
        assert (err.code, err.round, err.task_id) == ("abandoned", 4, "long")
        states = []
        while not states or states[-1] != "offline":
            payload = _wait_for(conn, topics.client("dev2", ClientTopic.STATUS), 30)
            states.append(protocol.decode(payload, expected_type=protocol.StatusMessage).state)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
