"""Hostile and broken clients against a real coordinator over the generated TLS broker.

Three honest fake clients and one hostile client per kind of bad update (replay, wrong round,
unassigned block, shape, dtype, NaN, Inf, x1e6, oversized), plus two clients whose announce is
malformed. Every bad message must be rejected with its reason and counted in the metrics, and both
rounds must close with exactly the honest clients' updates. Everything runs over TLS with one
credential per client (the coordinator too), as `fedbe-coordinator broker-config` writes it.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest

from coordinator.broker_config import COORDINATOR_USER, generate
from edge_client.fake import FakeFleet
from fedbe import protocol
from fedbe.broker import MosquittoBroker, find_mosquitto, free_port
from fedbe.compression import Level, compress_state, decompress_state
from fedbe.protocol import ClientTopic, Topics, pack_frame, unpack_frame
from fedbe.transport import BrokerConfig, Connection
from tests.integration.conftest import spawn
from tests.integration.test_federation import wait_exit

FED = "hostile"
HONEST = ["h1", "h2", "h3"]
HOSTILE = ["replay", "wronground", "unassigned", "shape", "dtype", "nan", "inf", "scaled", "oversized"]
BAD_ANNOUNCE = ["badhist", "badprofile"]
MAX_BYTES = 1 << 20


def recode(frame: bytes, mutate: Callable[[dict[str, Any]], None]) -> bytes:
    """The frame with its msgpack payload changed by ``mutate`` (valid header and CRC: only the content lies)."""
    f = unpack_frame(frame)
    payload = msgpack.unpackb(f.body, raw=False)
    mutate(payload)
    return pack_frame(f.message_type, msgpack.packb(payload, use_bin_type=True))


def first_tensor(payload: dict[str, Any]) -> dict[str, Any]:
    return next(iter(payload["blocks"][0]["tensors"].values()))


def poison(value: float) -> Callable[[dict[str, Any]], None]:
    def mutate(payload: dict[str, Any]) -> None:
        t = first_tensor(payload)
        t["data"] = struct.pack("<f", value) + t["data"][4:]

    return mutate


def to_fp16(payload: dict[str, Any]) -> None:
    t = first_tensor(payload)
    t["dtype"], t["data"] = "float16", t["data"][: len(t["data"]) // 2]


def with_blocks(update: protocol.UpdateMessage, delta: Any) -> bytes:
    return protocol.encode(
        protocol.UpdateMessage(**{**vars(update), "blocks": compress_state(delta, Level.FP32)[0]})
    )


def hostile(sent: dict[int, bytes]) -> Any:
    def behaviour(cid: str, task: protocol.TaskMessage, update: protocol.UpdateMessage | None) -> Any:
        if cid in HONEST or update is None:
            return None
        honest = protocol.encode(update)
        frame: bytes
        if cid == "replay":
            if task.round == 1:
                sent[1] = honest
                return None  # honest in round 1, replays that update in round 2
            frame = sent[1]
        elif cid == "wronground":
            frame = protocol.encode(protocol.UpdateMessage(**{**vars(update), "round": task.round + 1}))
        elif cid == "unassigned":
            other = 1 - task.block_ids[0]
            blocks = dict(update.blocks)
            blocks[other] = blocks[task.block_ids[0]]
            frame = protocol.encode(protocol.UpdateMessage(**{**vars(update), "blocks": blocks}))
        elif cid == "shape":
            delta = decompress_state(update.blocks)
            b = task.block_ids[0]
            name = next(n for n, t in delta[b].items() if t.dim() == 2)
            delta[b][name] = delta[b][name].reshape(1, -1)  # same values, wrong shape
            frame = with_blocks(update, delta)
        elif cid == "dtype":
            frame = recode(honest, to_fp16)
        elif cid == "nan":
            frame = recode(honest, poison(float("nan")))
        elif cid == "inf":
            frame = recode(honest, poison(float("inf")))
        elif cid == "scaled":
            delta = {
                b: {n: t * 1e6 for n, t in p.items()} for b, p in decompress_state(update.blocks).items()
            }
            frame = with_blocks(update, delta)
        else:  # oversized: a frame larger than the coordinator accepts
            frame = honest + b"\0" * MAX_BYTES
        return [(ClientTopic.UPDATE, frame)]

    return behaviour


EXPECTED = {  # client -> reason of its rejection (in the round(s) it misbehaves)
    "replay": "wrong_round", "wronground": "wrong_round", "unassigned": "unassigned_block",
    "shape": "shape_mismatch", "dtype": "dtype_mismatch", "nan": "non_finite", "inf": "non_finite",
    "scaled": "norm_outlier", "oversized": "oversized",
}  # fmt: skip


@pytest.mark.skipif(
    find_mosquitto() is None or shutil.which("openssl") is None, reason="needs mosquitto, openssl"
)
def test_hostile_and_broken_clients_are_rejected_and_rounds_close_with_the_honest_ones(
    tmp_path: Path,
) -> None:
    base = Path(tempfile.mkdtemp(prefix="fedbe-hostile-"))
    os.chmod(base, 0o755)
    clients = HONEST + HOSTILE + BAD_ANNOUNCE
    files = generate(clients, base / "broker", federation=FED, port=free_port())
    creds = {u: p.read_text().strip() for u, p in files.credentials.items()}
    broker = MosquittoBroker.from_config(files.conf).start()
    config = tmp_path / "run.yaml"
    config.write_text(f"""
federation: {FED}
model: tiny:llama
state_dir: state
blocks: 2
rounds: 2
clients_per_round: 20
min_clients: {len(HONEST + HOSTILE)}
round_deadline_seconds: 2
upload_level: fp32
allocation: {{strategy: all, max_unprotected_risk: 1.0}}
training: {{steps: 2, lr: 0.001, batch_size: 4, max_tokens: 48}}
broker: {{url: "{files.url}", username: {COORDINATOR_USER}, password_file: "{files.credentials[COORDINATOR_USER]}",
          tls_ca: "{files.ca_cert}", require_tls: true, max_message_bytes: {MAX_BYTES}}}
""")
    log = tmp_path / "coordinator.log"
    coord = spawn(["coordinator.cli", "run", "--config", str(config)], log)
    sent: dict[int, bytes] = {}
    fleet = FakeFleet(files.url, HONEST + HOSTILE, FED, max_blocks=1, behaviour=hostile(sent), credentials=creds,
                      tls_ca=str(files.ca_cert), require_tls=True)  # fmt: skip
    topics = Topics(FED)
    liars = []
    try:
        fleet.start()
        deadline = time.monotonic() + 90  # the coordinator listens once it has answered the fleet's announces
        while not all(c.accepted for c in fleet.clients.values()):
            assert time.monotonic() < deadline and coord.poll() is None, log.read_text()[-3000:]
            time.sleep(0.1)
        # Two clients whose announce is malformed: a NaN label count, and a zero step time.
        for cid, mutate in (("badhist", lambda p: p["label_histogram"].update(a=float("nan"))),
                            ("badprofile", lambda p: p.update(block_step_seconds=0.0))):  # fmt: skip
            conn = Connection(BrokerConfig(url=files.url, client_id=cid, username=cid, password=creds[cid],
                                           tls_ca=str(files.ca_cert), require_tls=True))  # fmt: skip
            conn.start()
            conn.subscribe(topics.client(cid, ClientTopic.NOTICE))
            liars.append(conn)
            good = fleet_announce(cid)
            conn.publish(
                topics.client(cid, ClientTopic.ANNOUNCE), recode(protocol.encode(good), mutate), wait=5
            )
        assert wait_exit(coord, 120, log) == 0, log.read_text()[-3000:]
        notice = protocol.decode(liars[1].inbox.get(timeout=5)[1], expected_type=protocol.NoticeMessage)
        assert notice.code == "refused" and "block_step_seconds" in notice.reason
    finally:
        if coord.poll() is None:
            coord.kill()
        fleet.close()
        for c in liars:
            c.close()
        broker.close()
        shutil.rmtree(base, ignore_errors=True)
    metrics = [json.loads(line) for line in (tmp_path / "state" / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in metrics] == [1, 2]
    for m in metrics:
        assert sorted(m["updates"]) == sorted(HONEST + (["replay"] if m["round"] == 1 else []))
        assert not set(m["assignments"]) & set(BAD_ANNOUNCE)  # never eligible
        reasons = {r["client"]: r["reason"] for r in m["rejected"]}
        expected = {c: r for c, r in EXPECTED.items() if c != "replay" or m["round"] == 2}
        assert reasons == expected, m["rejected"]
        # The hostile clients never sent a valid update: fewer than min_clients (all 12 selected) answered,
        # so the round closed with the honest ones at 3x the deadline.
        assert m["closed_by"] == "hard limit"
    counts = metrics[-1]["rejections_by_reason"]
    assert counts["wrong_round"] == 3 and counts["non_finite"] == 4 and counts["oversized"] == 2
    assert counts["invalid_announce_malformed"] >= 1 and counts["malformed_profile"] >= 1
    assert fleet.received["task"] == 2 * len(HONEST + HOSTILE)


def fleet_announce(cid: str) -> protocol.AnnounceMessage:
    return protocol.AnnounceMessage(
        client_id=cid, profile_name="fake", device_kind="cpu", device_name="liar", precision="fp32",
        memory_budget_bytes=1 << 30, base_memory_bytes=1 << 20, block_memory_bytes=1 << 20,
        activation_bytes_per_layer=1 << 16, max_trainable_blocks=2, block_step_seconds=0.01,
        layer_forward_seconds=0.001, link_bandwidth_bps=1e9, batch_size=4, max_tokens=32, num_examples=40,
        label_histogram={"a": 3.0}, base_fingerprint="unknown",
    )  # fmt: skip
