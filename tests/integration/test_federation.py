"""A whole federation in real processes: mosquitto, one coordinator, three fedbe-edge clients."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from coordinator.checkpoint import CheckpointStore
from fedbe import protocol
from fedbe.blocks import apply_delta, get_block_state, weighted_average
from fedbe.broker import MosquittoBroker
from fedbe.compression import decompress_state
from fedbe.expansion import expand_model, plan_expansion
from fedbe.protocol import ClientTopic, Topics
from fedbe.sources import build_tiny_model
from fedbe.transport import BrokerConfig, Connection
from tests.integration.conftest import spawn, tiny_client_data

FED = "fedtest"
CLIENTS = {"c1": ["sport", "tech"], "c2": ["tech", "business"], "c3": ["business", "sport"]}


def write_config(
    tmp_path: Path, broker: MosquittoBroker, rounds: int, blocks: str = "2", extra: str = ""
) -> Path:
    config = tmp_path / "run.yaml"
    config.write_text(
        f"""
federation: {FED}
model: tiny:llama
state_dir: state
blocks: {blocks}
placement: interleave
{extra}
rounds: {rounds}
clients_per_round: 3
min_clients: 3
round_deadline_seconds: 90
eval_every: 3
upload_level: fp32
training: {{steps: 2, lr: 0.001, batch_size: 4, max_tokens: 48}}
broker: {{url: "{broker.url}"}}
"""
    )
    return config


def start_clients(tmp_path: Path, broker: MosquittoBroker) -> list[subprocess.Popen[bytes]]:
    procs = []
    for cid, labels in CLIENTS.items():
        data = tiny_client_data(tmp_path / f"{cid}.jsonl", labels, 20, seed=len(procs))
        procs.append(spawn(
            ["edge_client.cli", "run", "--broker", broker.url, "--client-id", cid, "--data", str(data),
             "--model", "tiny:llama", "--federation", FED],
            tmp_path / f"{cid}.log",
        ))  # fmt: skip
    return procs


def wait_exit(proc: subprocess.Popen[bytes], timeout: float, log: Path) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(
            f"{log.name} did not finish in {timeout} s:\n{log.read_text()[-4000:]}"
        ) from None


def run_federation(tmp_path: Path, broker: MosquittoBroker, config: Path) -> None:
    """Run the coordinator with the three clients until it finishes; fail with its log if it does not."""
    log = tmp_path / "coordinator.log"
    coord = spawn(["coordinator.cli", "run", "--config", str(config)], log)
    clients = start_clients(tmp_path, broker)
    try:
        assert wait_exit(coord, 400, log) == 0, log.read_text()
    finally:
        stop_all(clients)


def stop_all(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()


def test_three_clients_complete_rounds_and_blocks_are_weighted_averages(
    broker: MosquittoBroker, tmp_path: Path
) -> None:
    # The test listens to every update as well (a second subscriber), to recompute the aggregation.
    spy = Connection(BrokerConfig(url=broker.url, client_id="spy"))
    spy.start()
    spy.subscribe(Topics(FED).all_clients(ClientTopic.UPDATE))
    # each block averaged over the clients that trained it (the test recomputes that average)
    extra = "server_eval: {examples: 10}\naggregation: {block_average: trainers}"
    config = write_config(tmp_path, broker, rounds=3, extra=extra)
    try:
        run_federation(tmp_path, broker, config)
    finally:
        spy.close()
    metrics = [json.loads(line) for line in (tmp_path / "state" / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in metrics] == [1, 2, 3]
    evaluation = metrics[-1]["evaluation"]  # federated evaluation after round 3, weighted by examples
    assert evaluation["clients"] == 3 and evaluation["examples"] > 0 and 0.0 <= evaluation["accuracy"] <= 1.0
    server = metrics[-1]["server_evaluation"]  # the global model on 10 BBC test articles, on the coordinator
    assert server["examples"] == 10 and any(abs(server["accuracy"] - k / 10) < 1e-6 for k in range(11))
    assert metrics[0]["server_evaluation"] is None  # eval_every: 3
    updates: dict[tuple[int, str], protocol.UpdateMessage] = {}
    while not spy.inbox.empty():
        _, payload = spy.inbox.get()
        msg = protocol.decode(payload, expected_type=protocol.UpdateMessage)
        updates[(msg.round, msg.client_id)] = msg
    base = build_tiny_model("llama")
    registry = expand_model(base, plan_expansion(4, 2, "interleave"))
    expected = get_block_state(base, registry)
    for m in metrics:
        assert m["closed_by"] == "all answered" and not m["rejected"] and not m["errors"]
        assigned = {c: tuple(b) for c, b in m["assignments"].items() if b}
        assert assigned and set(assigned) <= set(CLIENTS)
        round_updates = [updates[(m["round"], c)] for c in assigned]
        for u in round_updates:  # each client trained exactly the blocks it was allocated
            assert tuple(sorted(u.blocks)) == assigned[u.client_id]
            assert m["updates"][u.client_id]["blocks"] == list(assigned[u.client_id])
        avg = weighted_average([decompress_state(u.blocks) for u in round_updates],
                               [u.num_samples for u in round_updates])  # fmt: skip
        expected = apply_delta(expected, avg)
    final = CheckpointStore(tmp_path / "state").load_latest()
    assert final is not None and final.round == 3
    for b, params in expected.items():
        for name, tensor in params.items():
            torch.testing.assert_close(final.global_state[b][name], tensor, atol=1e-6, rtol=1e-5)

    out = tmp_path / "export"
    from coordinator.cli import main as coordinator_main  # noqa: PLC0415

    assert coordinator_main(["export", "--state", str(tmp_path / "state"), "--out", str(out)]) == 0
    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, 512, (1, 16))
    with torch.no_grad():
        assert not torch.allclose(exported(ids).logits, build_tiny_model("llama")(ids).logits)


def test_coordinator_killed_mid_run_resumes_and_finishes(broker: MosquittoBroker, tmp_path: Path) -> None:
    config = write_config(tmp_path, broker, rounds=4)
    log = tmp_path / "coordinator.log"
    coord = spawn(["coordinator.cli", "run", "--config", str(config)], log)
    clients = start_clients(tmp_path, broker)
    metrics = tmp_path / "state" / "metrics.jsonl"
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and (not metrics.exists() or not metrics.read_text().strip()):
            assert coord.poll() is None, log.read_text()
            time.sleep(0.2)
        assert metrics.exists(), log.read_text()
        coord.send_signal(signal.SIGKILL)
        coord.wait(timeout=10)
        done_before = len(metrics.read_text().splitlines())
        assert done_before < 4
        coord = spawn(["coordinator.cli", "run", "--config", str(config)], tmp_path / "coordinator2.log")
        assert wait_exit(coord, 400, tmp_path / "coordinator2.log") == 0
    finally:
        if coord.poll() is None:
            coord.kill()
        stop_all(clients)
    rounds = [json.loads(line)["round"] for line in metrics.read_text().splitlines()]
    assert rounds[:done_before] == list(range(1, done_before + 1))
    assert rounds[-1] == 4 and sorted(set(rounds)) == [1, 2, 3, 4]
    # killed after a snapshot: it resumes from it; killed between metrics.jsonl (written first) and
    # the snapshot: it re-closes that round from the accepted updates it had persisted
    resumed = (tmp_path / "coordinator2.log").read_text()
    assert "resuming after round" in resumed or f"round {done_before}/4: 3 clients" in resumed
    assert "resuming after round" in resumed or "updates recovered" in resumed


def test_blocks_auto_sizes_the_expansion_from_the_announced_clients(
    broker: MosquittoBroker, tmp_path: Path
) -> None:
    # Each tiny client can train all 4 provisional blocks: 3 x 4 = 12 blocks of capacity per round;
    # with 6 trainers wanted per block the coordinator must settle on 12 / 6 = 2 blocks and the
    # clients must rebuild their models for it.
    config = write_config(
        tmp_path,
        broker,
        rounds=1,
        blocks="auto",
        extra="auto_expansion: {trainers_per_block: 6}\nallocation: {max_unprotected_risk: 1.0}",
    )
    run_federation(tmp_path, broker, config)
    (first,) = [json.loads(line) for line in (tmp_path / "state" / "metrics.jsonl").read_text().splitlines()]
    assert first["expansion"]["blocks"] == 2 and "12 blocks per round" in first["expansion"]["reason"]
    assert {b for blocks in first["assignments"].values() for b in blocks} == {0, 1}
    final = CheckpointStore(tmp_path / "state").load_latest()
    assert final is not None and len(final.registry.blocks) == 2 and sorted(final.global_state) == [0, 1]


def test_a_plateau_adds_an_identity_block_and_the_federation_carries_on(
    broker: MosquittoBroker, tmp_path: Path
) -> None:
    # plateau_min_delta 1.0 can never be met: a block is added after every evaluated round from round 2.
    extra = "eval_every: 1\nauto_expansion: {plateau_rounds: 1, plateau_min_delta: 1.0}"
    config = write_config(tmp_path, broker, rounds=3, extra=extra)
    config.write_text(config.read_text().replace("eval_every: 3\n", ""))
    run_federation(tmp_path, broker, config)
    metrics = [json.loads(line) for line in (tmp_path / "state" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["expansion"] is None
    assert metrics[1]["expansion"]["blocks"] == 3 and metrics[1]["expansion"]["after_base_layer"] == 2
    assert metrics[2]["expansion"]["blocks"] == 4 and metrics[2]["expansion"]["after_base_layer"] == 0
    assert len({b for blocks in metrics[2]["assignments"].values() for b in blocks}) > 0
    final = CheckpointStore(tmp_path / "state").load_latest()
    assert final is not None and len(final.registry.blocks) == 4
    added = metrics[2]["expansion"]["added_block"]  # added after the last round: still the identity
    assert added == 0 and not final.global_state[added]["self_attn.o_proj.weight"].any()


def test_a_private_run_records_epsilon_and_stops_when_its_budget_is_spent(
    broker: MosquittoBroker, tmp_path: Path
) -> None:
    from coordinator.privacy import RoundPrivacy, epsilon  # noqa: PLC0415

    # three clients, all selected every round: q = 1; two rounds fit the budget, a third would not
    spent = [epsilon([RoundPrivacy(1.0, 1.0)] * n, 1e-5) for n in (1, 2, 3)]
    budget = (spent[1] + spent[2]) / 2
    extra = f"privacy: {{noise_multiplier: 1.0, clip_norm: 0.05, epsilon_budget: {budget!r}}}"
    config = write_config(tmp_path, broker, rounds=4, extra=extra)
    run_federation(tmp_path, broker, config)
    metrics = [json.loads(line) for line in (tmp_path / "state" / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in metrics] == [1, 2]
    for m, want in zip(metrics, spent, strict=False):
        privacy = m["privacy"]
        assert privacy["epsilon"] == pytest.approx(want, rel=1e-9)
        assert (privacy["delta"], privacy["noise_multiplier"], privacy["clip_norm"]) == (1e-5, 1.0, 0.05)
        assert privacy["sample_rate"] == 1.0 and m["updates"]
        norms = [u["norm"] for u in m["updates"].values()]
        assert privacy["clipped_fraction"] == pytest.approx(sum(n > 0.05 for n in norms) / len(norms))
        for block in m["blocks"].values():  # every client weighs the same, whatever its samples
            assert block["weight"] == len(block["trainers"])
    log = (tmp_path / "coordinator.log").read_text()
    assert f"privacy budget spent: epsilon {spent[1]:.4g} of {budget:g} after 2 rounds" in log
    final = CheckpointStore(tmp_path / "state").load_latest()
    assert final is not None and final.round == 2 and final.privacy_history == (RoundPrivacy(1.0, 1.0),) * 2
