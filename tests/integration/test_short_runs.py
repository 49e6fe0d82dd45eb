"""Short runs through the real coordinator: a block only a label-skewed client reaches goes, with
``allocation.min_steps_fraction``, also to a slower client with other labels, whose task asks for
fewer steps; without it the block is left untrained (withdrawn)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from coordinator.allocation import jensen_shannon
from edge_client.fake import FakeFleet
from fedbe import protocol
from fedbe.broker import MosquittoBroker
from fedbe.protocol import ClientTopic, Topics
from fedbe.transport import BrokerConfig, Connection
from tests.integration.conftest import spawn
from tests.integration.test_federation import wait_exit

FED = "short"
HIST = {"pol": {"a": 44.0, "b": 4.0}, "rest": {"b": 20.0, "c": 30.0, "a": 4.0}}
# tiny:llama with 2 interleaved blocks: 6 layers, new blocks at layers 2 and 5. The coordinator's step
# model: forward = 6 x layer_forward, backward per layer = block_step - forward. "rest" (forward 0.6 s,
# backward 3 s a layer) needs 4 x 3.6 = 14.4 s for the top block, within the 30 s deadline, but
# 4 x (0.6 + 4 x 3) = 50.4 s for the low one: only 2 steps (25.2 s) fit. "pol" is fast.
SPEEDS = {"pol": (0.01, 0.001), "rest": (3.6, 0.1)}
DEADLINE = 30.0


def run(
    tmp_path: Path, broker: MosquittoBroker, fraction: float, labels: tuple[str, ...] = ()
) -> tuple[dict[str, Any], dict[str, int]]:
    """Round 1 of a 1-round federation of the two fake clients: its metrics and each task's steps;
    ``labels``: the coordinator's ``training.labels`` (empty: the clients' labels, a, b and c)."""
    state = tmp_path / f"state-{fraction}"
    form = "factored" if labels else "vocab"  # training.balance_form reaches every task
    config = tmp_path / f"run-{fraction}.yaml"
    config.write_text(f"""
federation: {FED}
model: tiny:llama
state_dir: {state}
blocks: 2
placement: interleave
rounds: 1
clients_per_round: 2
min_clients: 2
round_deadline_seconds: {DEADLINE}
update_level: fp32
allocation: {{max_block_divergence: 0.1, min_steps_fraction: {fraction}, cost_weight: 0, risk_weight: 0}}
training: {{steps: 4, lr: 0.001, batch_size: 4, max_tokens: 48, labels: [{", ".join(labels)}], balance_form: {form}}}
broker: {{url: "{broker.url}"}}
""")
    spy = Connection(BrokerConfig(url=broker.url, client_id=f"spy-{fraction}"))
    spy.start()
    spy.subscribe(Topics(FED).all_clients(ClientTopic.TASK))
    log = tmp_path / f"coordinator-{fraction}.log"
    coord = spawn(["coordinator.cli", "run", "--config", str(config)], log)
    fleet = FakeFleet(broker.url, list(HIST), FED, max_blocks=2, histograms=HIST, step_seconds=SPEEDS)
    try:
        fleet.start()
        assert wait_exit(coord, 120, log) == 0, log.read_text()[-3000:]
        time.sleep(0.5)  # the spy's copies of the tasks
    finally:
        if coord.poll() is None:
            coord.kill()
        fleet.close()
        spy.close()
    steps = {}
    while not spy.inbox.empty():
        task = protocol.decode(spy.inbox.get()[1], expected_type=protocol.TaskMessage)
        if task.block_ids:
            steps[task.client_id] = task.steps
            # training.label_balance (default on): every task carries the federation's labels, the
            # configured ones if any
            assert task.balance_labels == (labels or ("a", "b", "c")), task.balance_labels
            assert task.balance_form == form
    (metrics,) = [json.loads(line) for line in (state / "metrics.jsonl").read_text().splitlines()]
    return metrics, steps


def test_a_block_only_a_skewed_client_reaches_is_shared_by_a_short_run(
    broker: MosquittoBroker, tmp_path: Path
) -> None:
    pooled = {k: HIST["pol"].get(k, 0.0) + HIST["rest"].get(k, 0.0) for k in "abc"}
    assert jensen_shannon(HIST["pol"], pooled) > 0.1  # pol alone is past the bound
    off, off_steps = run(tmp_path, broker, 1.0, labels=("a", "b", "c", "d"))
    assert off["assignments"] == {"pol": [1], "rest": [1]}, off  # block 0 withdrawn
    assert off["short_runs"] == {} and off_steps == {"pol": 4, "rest": 4}

    on, on_steps = run(tmp_path, broker, 0.5)
    assert on["assignments"] == {"pol": [0, 1], "rest": [0, 1]}, on
    assert on["short_runs"] == {"rest": 2} and on_steps == {"pol": 4, "rest": 2}
    # the short run's update is weighted by what it trained: 2 steps x 4 rows
    assert on["updates"]["rest"]["steps"] == 2 and on["updates"]["rest"]["samples"] == 8
    assert on["closed_by"] == "all answered" and not on["rejected"]
    assert on["blocks"]["0"]["trainers"] == ["pol", "rest"] and on["blocks"]["0"]["weight"] == 16 + 8
