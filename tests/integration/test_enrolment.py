"""`fedbe-coordinator enroll` writes a device's bundle; `fedbe-edge run --config` joins a real broker with it."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from coordinator.broker_config import COORDINATOR_USER
from coordinator.cli import main as coordinator_main
from coordinator.enrolment import enroll
from edge_client.cli import build_parser as edge_parser
from edge_client.run_config import check_required, parse_with_file
from edge_client.service import broker_config
from fedbe import protocol
from fedbe.broker import MosquittoBroker, find_mosquitto, free_port
from fedbe.errors import ConfigError
from fedbe.protocol import ClientTopic, Topics
from fedbe.transport import BrokerConfig, Connection
from tests.integration.conftest import spawn, tiny_client_data

FED = "enrolled"
TOPICS = Topics(FED)


def _broker_dir(base: Path, name: str, *extra: str) -> tuple[Path, int]:
    (base / "clients.txt").write_text("c1\n")
    port = free_port()
    args = ["broker-config", "--clients", str(base / "clients.txt"), "--out", str(base / name),
            "--federation", FED, "--port", str(port), *extra]  # fmt: skip
    assert coordinator_main(args) == 0
    return base / name, port


@pytest.fixture
def base() -> Iterator[Path]:
    if find_mosquitto() is None or shutil.which("openssl") is None:
        pytest.skip("mosquitto and openssl are needed (scripts/setup.sh installs mosquitto)")
    folder = Path(tempfile.mkdtemp(prefix="fedbe-enrol-"))
    os.chmod(folder, 0o755)  # mosquitto, run as root, drops to its own user: it must reach the folder
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def _modes(bundle: Path) -> dict[str, str]:
    return {p.name: oct(p.stat().st_mode & 0o777) for p in [bundle, *bundle.iterdir()]}


def test_an_enrolled_device_runs_fedbe_edge_from_its_bundle_over_mutual_tls(base: Path) -> None:
    broker_dir, port = _broker_dir(base, "broker", "--client-certs")
    data = tiny_client_data(base / "dev1.jsonl", ["sport", "tech"], 12, seed=1)
    bundle = base / "bundle"
    url = f"mqtts://127.0.0.1:{port}"
    assert coordinator_main(["enroll", "--broker-dir", str(broker_dir), "--device", "dev1", "--broker-url", url,
                             "--out", str(bundle), "--data", str(data), "--model", "tiny:llama"]) == 0  # fmt: skip
    assert _modes(bundle) == {"bundle": "0o700", "ca.crt": "0o600", "device.crt": "0o600", "device.key": "0o600",
                              "edge.yaml": "0o600"}  # fmt: skip
    settings = yaml.safe_load((bundle / "edge.yaml").read_text())
    assert settings["federation"] == FED and settings["tls_cert"] == "device.crt"
    # The bundle moves as a whole (relative paths), as it does onto the device.
    moved = base / "on-device"
    shutil.move(bundle, moved)
    with MosquittoBroker.from_config(broker_dir / "mosquitto.conf"):
        credentials = broker_dir / "credentials"
        coord = Connection(BrokerConfig(url=url, client_id=COORDINATOR_USER, tls_ca=str(broker_dir / "ca.crt"),
                                        tls_cert=str(credentials / f"{COORDINATOR_USER}.crt"),
                                        tls_key=str(credentials / f"{COORDINATOR_USER}.key")))  # fmt: skip
        coord.start(timeout=5)
        coord.subscribe(TOPICS.client("dev1", ClientTopic.STATUS))
        proc = spawn(["edge_client.cli", "run", "--config", str(moved / "edge.yaml")], base / "edge.log")
        try:
            topic, payload = coord.inbox.get(timeout=120)
            status = protocol.decode(payload, expected_type=protocol.StatusMessage)
            assert (topic, status.client_id, status.state) == (TOPICS.client("dev1", ClientTopic.STATUS), "dev1",
                                                               "online"), (base / "edge.log").read_text()  # fmt: skip
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=60) == 0, (base / "edge.log").read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            coord.close()


def test_password_enrolment_adds_the_device_to_the_broker_which_takes_it_after_a_reload(base: Path) -> None:
    broker_dir, port = _broker_dir(base, "broker")
    url = f"mqtts://127.0.0.1:{port}"
    with MosquittoBroker.from_config(broker_dir / "mosquitto.conf") as broker:
        bundle = enroll(broker_dir, "dev2", url, base / "bundle")
        assert not bundle.client_certs and bundle.federation == FED
        assert _modes(base / "bundle") == {"bundle": "0o700", "ca.crt": "0o600", "password": "0o600",
                                           "edge.yaml": "0o600"}  # fmt: skip
        password = (base / "bundle" / "password").read_text().strip()
        passwd = (broker_dir / "passwd").read_text()
        assert "dev2:$7$" in passwd and password not in passwd and "c1:$7$" in passwd
        assert broker.pid is not None
        os.kill(broker.pid, signal.SIGHUP)  # what `systemctl reload mosquitto` does
        time.sleep(0.5)
        # The code path of `fedbe-edge run --config` up to the connection, then its first status.
        config = base / "bundle" / "edge.yaml"
        args = parse_with_file(edge_parser(), ["run", "--config", str(config), "--data", "d.jsonl"], config)
        check_required(args)
        conn = Connection(broker_config(args, args.client_id))
        conn.start(timeout=5)
        try:
            conn.publish(TOPICS.client("dev2", ClientTopic.STATUS), b"online", wait=5)  # its own topic
        finally:
            conn.close()
        with pytest.raises(ConfigError, match="already holds a bundle"):
            enroll(broker_dir, "dev2", url, base / "bundle")
        with pytest.raises(ConfigError, match="already has a password"):
            enroll(broker_dir, "dev2", url, base / "other")
        enroll(broker_dir, "dev2", url, base / "bundle", force=True)  # a new password replaces the old
        assert (broker_dir / "passwd").read_text().count("dev2:") == 1
        assert (base / "bundle" / "password").read_text().strip() != password


@pytest.mark.parametrize(
    ("device", "url", "federation", "message"),
    [
        ("bad/id", "mqtts://h:8883", None, "invalid client id 'bad/id'"),
        (COORDINATOR_USER, "mqtts://h:8883", None, "is the coordinator's user name"),
        ("dev3", "mqtt://h:1883", None, "TLS is required"),
        ("dev3", "mqtts://h:8883", "other-fed", f"serves federation '{FED}', not 'other-fed'"),
    ],
)
def test_enrolment_refuses_bad_input_before_writing_anything(
    base: Path, device: str, url: str, federation: str | None, message: str
) -> None:
    broker_dir, _ = _broker_dir(base, "broker", "--client-certs")
    with pytest.raises(ConfigError, match=message):
        enroll(broker_dir, device, url, base / "bundle", federation=federation)
    assert not (base / "bundle").exists()
    with pytest.raises(ConfigError, match="--broker-dir must be the folder"):
        enroll(base / "nowhere", "dev3", "mqtts://h:8883", base / "bundle")


def test_the_enroll_command_prints_what_to_do_next(base: Path, capsys: pytest.CaptureFixture[str]) -> None:
    broker_dir, port = _broker_dir(base, "broker")
    argv = ["enroll", "--broker-dir", str(broker_dir), "--device", "dev4", "--broker-url",
            f"mqtts://127.0.0.1:{port}", "--out", str(base / "b")]  # fmt: skip
    assert coordinator_main(argv) == 0
    out = capsys.readouterr().out
    assert (
        "reload the broker" in out
        and f"fedbe-edge run --config {base / 'b' / 'edge.yaml'} --data FILE" in out
    )
    assert coordinator_main(argv) == 1  # the bundle exists
    assert "pass --force" in capsys.readouterr().err
