"""A real mosquitto started from `fedbe-coordinator broker-config --client-certs`: mutual TLS, where the
client's certificate, not a password, says who it is."""

from __future__ import annotations

import os
import queue
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from coordinator.broker_config import COORDINATOR_USER
from coordinator.cli import main as coordinator_main
from coordinator.config import parse_run_config
from fedbe.broker import MosquittoBroker, find_mosquitto, free_port
from fedbe.protocol import ClientTopic, Topics
from fedbe.transport import BrokerConfig, Connection, TransportError

FED = "mutual"
TOPICS = Topics(FED)


class Federation:
    """The files of one ``broker-config --client-certs`` run (and, for ``foreign``, no broker)."""

    def __init__(self, out: Path, port: int) -> None:
        self.out, self.port = out, port
        self.url = f"mqtts://127.0.0.1:{port}"
        self.ca = out / "ca.crt"

    def cert(self, user: str) -> tuple[str, str]:
        return str(self.out / "credentials" / f"{user}.crt"), str(self.out / "credentials" / f"{user}.key")


def _generate(base: Path, name: str, federation: str) -> Federation:
    clients = base / f"{name}-clients.txt"
    clients.write_text("c1\nc2\n")
    port = free_port()
    args = ["broker-config", "--clients", str(clients), "--out", str(base / name), "--federation", federation,
            "--port", str(port), "--max-message-mb", "1", "--client-certs"]  # fmt: skip
    assert coordinator_main(args) == 0
    return Federation(base / name, port)


@pytest.fixture(scope="module")
def mutual() -> Iterator[tuple[Federation, Federation]]:
    """The federation's broker, running, and a second federation's files (another CA, same client ids)."""
    if find_mosquitto() is None or shutil.which("openssl") is None:
        pytest.skip("mosquitto and openssl are needed (scripts/setup.sh installs mosquitto)")
    base = Path(tempfile.mkdtemp(prefix="fedbe-mtls-"))
    os.chmod(base, 0o755)  # mosquitto, run as root, drops to its own user: it must reach the folder
    fed, foreign = _generate(base, "broker", FED), _generate(base, "foreign", FED)
    broker = MosquittoBroker.from_config(fed.out / "mosquitto.conf")
    broker.start()
    try:
        yield fed, foreign
    finally:
        broker.close()
        shutil.rmtree(base, ignore_errors=True)


def connect(
    fed: Federation,
    client_id: str,
    cert_of: Federation | None = None,
    user: str | None = None,
    **kw: object,
) -> Connection:
    """Connect as ``client_id`` with the certificate of ``user`` (default: the same) from ``cert_of``'s CA."""
    cert, key = (cert_of or fed).cert(user or client_id)
    conn = Connection(BrokerConfig(url=fed.url, client_id=client_id, tls_ca=str(fed.ca), require_tls=True,
                                   tls_cert=cert, tls_key=key, **kw))  # type: ignore[arg-type]  # fmt: skip
    conn.start(timeout=5)
    return conn


def test_the_listener_requires_a_certificate_and_has_no_password_file(
    mutual: tuple[Federation, Federation],
) -> None:
    fed, _ = mutual
    assert not (fed.out / "passwd").exists()
    for user in (COORDINATOR_USER, "c1", "c2"):
        for path in fed.cert(user):
            assert oct(Path(path).stat().st_mode & 0o777) == "0o600"
    connect(fed, "c1").close()  # its own certificate: accepted


def test_a_client_without_a_certificate_is_refused_whatever_password_it_sends(
    mutual: tuple[Federation, Federation],
) -> None:
    fed, _ = mutual
    started = time.monotonic()
    for username, password in ((None, None), ("c1", "anything"), (COORDINATOR_USER, "")):
        conn = Connection(BrokerConfig(url=fed.url, client_id="c1", username=username, password=password,
                                       tls_ca=str(fed.ca), require_tls=True))  # fmt: skip
        with pytest.raises(TransportError, match="closed the connection before accepting it"):
            conn.start(timeout=5)
    assert time.monotonic() - started < 10  # refused at once, not after the timeout


def test_a_certificate_of_another_ca_is_refused(mutual: tuple[Federation, Federation]) -> None:
    fed, foreign = mutual
    for user in ("c1", COORDINATOR_USER):  # same names, signed by another federation's CA
        with pytest.raises(TransportError, match="closed the connection before accepting it"):
            connect(fed, user, cert_of=foreign)


def test_a_device_can_not_take_over_another_devices_session_nor_use_its_topics(
    mutual: tuple[Federation, Federation],
) -> None:
    fed, _ = mutual
    task, update = TOPICS.client("c1", ClientTopic.TASK), TOPICS.client("c1", ClientTopic.UPDATE)
    coord, c1 = connect(fed, COORDINATOR_USER), connect(fed, "c1")
    intruder: Connection | None = None
    try:
        c1.subscribe(task)
        coord.subscribe(TOPICS.all_clients(ClientTopic.UPDATE))
        # c2's own valid certificate, c1's client id and user name: the broker names it c2 anyway
        intruder = connect(fed, "c1", user="c2", username="c1", password="x")
        intruder.subscribe(task)
        intruder.subscribe(TOPICS.all_clients(ClientTopic.UPDATE))
        time.sleep(1.5)  # a takeover disconnects c1 at once (paho would reconnect it after 1 s)
        assert c1.connected.is_set() and c1.connects == 1, "c1 was disconnected by a client using its id"
        with pytest.raises(TransportError, match="Not authorized"):
            intruder.publish(update, b"forged update", wait=5)
        with pytest.raises(TransportError, match="Not authorized"):
            intruder.publish(task, b"forged task", wait=5)
        intruder.publish(TOPICS.client("c2", ClientTopic.UPDATE), b"c2's own", wait=5)  # its own topic: yes
        coord.publish(task, b"task for c1", wait=5)
        assert c1.inbox.get(timeout=5) == (task, b"task for c1")
        assert coord.inbox.get(timeout=5) == (TOPICS.client("c2", ClientTopic.UPDATE), b"c2's own")
        with pytest.raises(queue.Empty):  # nothing forged arrived, and the intruder read nothing of c1's
            coord.inbox.get(timeout=0.5)
        with pytest.raises(queue.Empty):
            intruder.inbox.get(timeout=0.2)
    finally:
        for c in (coord, c1, intruder):
            if c is not None:
                c.close()


def test_the_coordinator_connects_with_its_certificate_from_its_run_config(
    mutual: tuple[Federation, Federation], tmp_path: Path
) -> None:
    fed, _ = mutual
    cert, key = fed.cert(COORDINATOR_USER)
    broker = {"url": fed.url, "tls_ca": str(fed.ca), "require_tls": True, "tls_cert": cert, "tls_key": key}
    cfg = parse_run_config({"model": "tiny:llama", "state_dir": str(tmp_path / "state"), "federation": FED,
                            "broker": broker}, "run.yaml", tmp_path)  # fmt: skip
    # the daemon's own connection settings (cmd_run), with the client id it asks for
    coord = Connection(cfg.broker.transport(f"fedbe-coordinator-{FED}", cfg.broker.read_password()))
    coord.start(timeout=5)
    c2 = connect(fed, "c2")
    try:
        coord.subscribe(TOPICS.all_clients(ClientTopic.ANNOUNCE))
        c2.subscribe(TOPICS.coordinator_status())
        c2.subscribe(TOPICS.client("c2", ClientTopic.TASK))
        c2.publish(TOPICS.client("c2", ClientTopic.ANNOUNCE), b"hello", wait=5)
        assert coord.inbox.get(timeout=5) == (TOPICS.client("c2", ClientTopic.ANNOUNCE), b"hello")
        coord.publish(TOPICS.coordinator_status(), b"running", wait=5)  # only the coordinator may
        coord.publish(TOPICS.client("c2", ClientTopic.TASK), b"task", wait=5)
        got = {c2.inbox.get(timeout=5), c2.inbox.get(timeout=5)}
        assert got == {
            (TOPICS.coordinator_status(), b"running"),
            (TOPICS.client("c2", ClientTopic.TASK), b"task"),
        }
        with pytest.raises(TransportError, match="Not authorized"):
            c2.publish(TOPICS.coordinator_status(), b"fake status", wait=5)
    finally:
        coord.close()
        c2.close()
