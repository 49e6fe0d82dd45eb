"""Control-plane load test: many lightweight clients against one coordinator and mosquitto on loopback.

    .venv/bin/python benchmarks/load_bench.py --clients 500 --rounds 5

Starts a private mosquitto on a free 127.0.0.1 port, a real ``fedbe-coordinator run`` process
(tiny:llama with 2 new blocks, int8 updates, every client in every round), and N fake clients
(:class:`edge_client.fake.FakeFleet`: one MQTT connection each, a fake trainer that answers every
task at once with a small valid update). Reports rounds per second, the announce -> notice round
trip through the coordinator and the update publish -> delivery latency (p50, p99), the
coordinator's peak RSS, and counts every task and update on both sides: none may be lost.
``run_load`` is also what the 50-client test in tests/integration/test_load.py calls.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402

from edge_client.fake import FakeFleet  # noqa: E402
from fedbe.broker import MosquittoBroker  # noqa: E402
from fedbe.protocol import ClientTopic, Topics  # noqa: E402
from fedbe.transport import BrokerConfig, Connection  # noqa: E402

FED = "load"


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run_load(
    n_clients: int, rounds: int, work_dir: Path, fleets: int = 4, timeout: float = 600.0, processes: int = 0
) -> dict[str, Any]:
    """Run the load test; return its figures (see the module docstring)."""
    # Each paho client holds a socket and a wake-up socket pair: 500 clients need ~1,500 descriptors.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 4 * n_clients + 256
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))
    broker = MosquittoBroker().start()
    config = work_dir / "run.yaml"
    config.write_text(f"""
federation: {FED}
model: tiny:llama
state_dir: {work_dir / "state"}
blocks: 2
rounds: {rounds}
clients_per_round: {n_clients}
min_clients: {n_clients}
round_deadline_seconds: 120
upload_level: int8
allocation: {{strategy: all, max_unprotected_risk: 1.0}}
training: {{steps: 1, lr: 0.001, batch_size: 1, max_tokens: 8}}
broker: {{url: "{broker.url}"}}
""")
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    log = (work_dir / "coordinator.log").open("wb")
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    coord = subprocess.Popen([sys.executable, "-m", "coordinator.cli", "run", "--config", str(config)], cwd=ROOT,
                             stdout=log, stderr=subprocess.STDOUT, env=env)  # fmt: skip
    peak_rss = [0]
    stop = threading.Event()

    def sample() -> None:
        proc = psutil.Process(coord.pid)
        while not stop.is_set():
            try:
                peak_rss[0] = max(peak_rss[0], proc.memory_info().rss)
            except psutil.Error:
                return
            stop.wait(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    topics = Topics(FED)
    spy = Connection(BrokerConfig(url=broker.url, client_id="load-spy"))
    spy.start()
    spy.subscribe(topics.all_clients(ClientTopic.UPDATE))
    ids = [f"c{i:04d}" for i in range(n_clients)]
    # paho waits on select(), which can not watch descriptors above 1024: beyond ~250 clients the
    # fleets run as separate processes (python -m edge_client.fake) that report their counts as JSON.
    groups = (
        [] if processes else [FakeFleet(broker.url, ids[k::fleets], FED, max_blocks=2) for k in range(fleets)]
    )
    workers = [
        subprocess.Popen([sys.executable, "-m", "edge_client.fake", "--broker", broker.url, "--federation", FED,
                          "--clients", ",".join(ids[k::processes]), "--report", str(work_dir / f"fleet{k}.json"),
                          "--timeout", str(timeout)], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                         stderr=(work_dir / f"fleet{k}.log").open("wb"))
        for k in range(processes)
    ]  # fmt: skip
    spy_seen: dict[tuple[str, int], float] = {}
    started = time.monotonic()
    try:
        for g in groups:
            g.start()
        connected = time.monotonic()
        deadline = started + timeout
        while coord.poll() is None and time.monotonic() < deadline:
            try:
                topic, payload = spy.inbox.get(timeout=0.2)
            except Exception:  # noqa: BLE001 - queue.Empty
                continue
            parsed = topics.parse_client_topic(topic)
            if parsed is not None:
                from fedbe import protocol  # noqa: PLC0415

                msg = protocol.decode(payload, expected_type=protocol.UpdateMessage)
                spy_seen[(msg.client_id, msg.round)] = time.monotonic()
        finished = time.monotonic()
        code = coord.wait(timeout=max(deadline - time.monotonic(), 1))
        while not spy.inbox.empty():
            topic, payload = spy.inbox.get()
            from fedbe import protocol  # noqa: PLC0415

            msg = protocol.decode(payload, expected_type=protocol.UpdateMessage)
            spy_seen.setdefault((msg.client_id, msg.round), time.monotonic())
    finally:
        stop.set()
        if coord.poll() is None:
            coord.kill()
        for g in groups:
            g.close()
        for w in workers:
            try:
                w.wait(timeout=30)
            except subprocess.TimeoutExpired:
                w.kill()
        spy.close()
        broker.close()
        log.close()
    if code != 0:
        raise RuntimeError(
            f"the coordinator exited with {code}: {(work_dir / 'coordinator.log').read_text()[-3000:]}"
        )
    metrics = [json.loads(line) for line in (work_dir / "state" / "metrics.jsonl").read_text().splitlines()]
    tasks_sent = sum(len([c for c, b in m["assignments"].items() if b]) for m in metrics)
    updates_accepted = sum(len(m["updates"]) for m in metrics)
    reports = [
        {"sent": dict(g.sent), "received": dict(g.received), "announce_rtt": [x for c in g.clients.values()
         for x in c.announce_rtt], "update_sent_at": [[cid, r, t] for (r, cid), t in g.update_sent_at.items()]}
        for g in groups
    ] + [json.loads((work_dir / f"fleet{k}.json").read_text()) for k in range(processes)]  # fmt: skip
    sent_at = {(cid, r): t for rep in reports for cid, r, t in rep["update_sent_at"]}
    delivery = [spy_seen[k] - t for k, t in sent_at.items() if k in spy_seen]
    rtt = [x for rep in reports for x in rep["announce_rtt"]]
    round_seconds = [m["seconds"] for m in metrics]
    return {
        "clients": n_clients,
        "rounds": len(metrics),
        "connect_seconds": connected - started,
        "run_seconds": finished - connected,
        "round_seconds": round_seconds,
        "rounds_per_second": len(metrics) / sum(round_seconds),
        "announce_rtt_p50_ms": 1e3 * _percentile(rtt, 0.5),
        "announce_rtt_p99_ms": 1e3 * _percentile(rtt, 0.99),
        "update_delivery_p50_ms": 1e3 * _percentile(delivery, 0.5),
        "update_delivery_p99_ms": 1e3 * _percentile(delivery, 0.99),
        "coordinator_peak_rss_mib": peak_rss[0] / 2**20,
        "tasks_sent_by_coordinator": tasks_sent,
        "tasks_received_by_clients": sum(rep["received"].get("task", 0) for rep in reports),
        "updates_sent_by_clients": sum(rep["sent"].get("update", 0) for rep in reports),
        "updates_seen_by_spy": len(spy_seen),
        "updates_accepted_by_coordinator": updates_accepted,
        "rejected": sum(len(m["rejected"]) for m in metrics),
        "rejections_by_reason": metrics[-1]["rejections_by_reason"],
        "closed_by": sorted({m["closed_by"] for m in metrics}),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=500)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--fleets", type=int, default=4, help="worker threads answering the clients' messages")
    p.add_argument("--processes", type=int, help="client processes (default: 1 per 125 clients above 250)")
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="fedbe-load-") as tmp:
        processes = (
            args.processes
            if args.processes is not None
            else (0 if args.clients <= 250 else -(-args.clients // 125))
        )
        result = run_load(args.clients, args.rounds, Path(tmp), fleets=args.fleets, processes=processes)
    for k, v in result.items():
        print(f"{k:34s} {v if not isinstance(v, float) else round(v, 3)}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    lost = result["tasks_sent_by_coordinator"] != result["tasks_received_by_clients"] or not (
        result["updates_sent_by_clients"]
        == result["updates_seen_by_spy"]
        == result["updates_accepted_by_coordinator"]
    )
    print("messages lost" if lost else "no message lost")
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
