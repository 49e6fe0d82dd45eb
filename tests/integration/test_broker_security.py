"""A real mosquitto started from the configuration of `fedbe-coordinator broker-config`: TLS, identity, ACLs."""

from __future__ import annotations

import os
import queue
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from coordinator.broker_config import COORDINATOR_USER, BrokerFiles, acl_text, generate, read_clients
from coordinator.cli import main as coordinator_main
from fedbe.broker import BrokerError, MosquittoBroker, find_mosquitto, free_port
from fedbe.errors import ConfigError
from fedbe.protocol import ClientTopic, Topics
from fedbe.transport import BrokerConfig, Connection, TransportError

FED = "secure"
TOPICS = Topics(FED)


@pytest.fixture(scope="module")
def secured() -> Iterator[tuple[BrokerFiles, MosquittoBroker]]:
    if find_mosquitto() is None or shutil.which("openssl") is None:
        pytest.skip("mosquitto and openssl are needed (scripts/setup.sh installs mosquitto)")
    base = Path(tempfile.mkdtemp(prefix="fedbe-secure-"))
    os.chmod(base, 0o755)  # mosquitto, run as root, drops to its own user: it must reach the folder
    clients = base / "clients.txt"
    clients.write_text("# the fleet\nc1\nc2  # a comment\n\n")
    out = base / "broker"
    port = free_port()
    assert coordinator_main(["broker-config", "--clients", str(clients), "--out", str(out), "--federation", FED,
                             "--port", str(port)]) == 0  # fmt: skip
    files = BrokerFiles(
        out_dir=out, conf=out / "mosquitto.conf", acl=out / "acl", passwd=out / "passwd", ca_cert=out / "ca.crt",
        server_cert=out / "server.crt", server_key=out / "server.key",
        credentials={u: out / "credentials" / f"{u}.password" for u in (COORDINATOR_USER, "c1", "c2")},
        host="127.0.0.1", port=port,
    )  # fmt: skip
    broker = MosquittoBroker.from_config(files.conf)
    broker.start()
    try:
        yield files, broker
    finally:
        broker.close()
        shutil.rmtree(base, ignore_errors=True)


def connect(files: BrokerFiles, user: str, password: str | None = None, **kw: object) -> Connection:
    secret = password if password is not None else files.credentials[user].read_text().strip()
    conn = Connection(BrokerConfig(url=files.url, client_id=user, username=user, password=secret,
                                   tls_ca=str(files.ca_cert), require_tls=True, **kw))  # type: ignore[arg-type]  # fmt: skip
    conn.start(timeout=5)
    return conn


def test_generated_files_use_tls_only_and_hash_every_password(
    secured: tuple[BrokerFiles, MosquittoBroker],
) -> None:
    files, broker = secured
    conf = files.conf.read_text()
    assert f"listener {files.port} 127.0.0.1" in conf and "allow_anonymous false" in conf
    assert (
        "use_username_as_clientid true" in conf
        and sum(line.startswith("listener ") for line in conf.splitlines()) == 1
    )
    assert broker.url == files.url  # mqtts://: the listener has a certfile
    users = [line.split(":", 1) for line in files.passwd.read_text().splitlines()]
    assert sorted(u for u, _ in users) == sorted([COORDINATOR_USER, "c1", "c2"])
    for user, hashed in users:  # never the plain password
        assert hashed.startswith("$7$") and files.credentials[user].read_text().strip() not in hashed
    assert oct(files.credentials["c1"].stat().st_mode & 0o777) == "0o600"
    assert oct((files.out_dir / "ca.key").stat().st_mode & 0o777) == "0o600"


def test_acl_is_derived_from_the_topic_layout() -> None:
    acl = acl_text(FED)
    for kind in (
        ClientTopic.ANNOUNCE,
        ClientTopic.STATUS,
        ClientTopic.UPDATE,
        ClientTopic.EVAL,
        ClientTopic.ERROR,
    ):
        assert f"pattern write {TOPICS.root}/clients/%u/{kind.value}" in acl
        assert f"topic read {TOPICS.all_clients(kind)}" in acl  # the coordinator's
    for kind in (ClientTopic.TASK, ClientTopic.NOTICE):
        assert f"pattern read {TOPICS.root}/clients/%u/{kind.value}" in acl
        assert f"topic write {TOPICS.all_clients(kind)}" in acl
    assert "pattern write" not in acl.split(f"user {COORDINATOR_USER}")[1]


def test_client_list_errors_name_the_line(tmp_path: Path) -> None:
    bad = tmp_path / "clients.txt"
    for text, message in [("c1\nc1\n", "listed twice"), ("c1\nbad/id\n", ":2: invalid client id"),
                          ("# none\n", "lists no client"), (f"{COORDINATOR_USER}\n", "reserved")]:  # fmt: skip
        bad.write_text(text)
        with pytest.raises(ConfigError, match=message):
            read_clients(bad)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep").write_text("x")
    with pytest.raises(ConfigError, match="not empty"):
        generate(["c1"], tmp_path / "out")


def test_a_config_that_binds_beyond_loopback_is_not_started(tmp_path: Path) -> None:
    conf = tmp_path / "m.conf"
    for line in ("listener 1883 0.0.0.0", "listener 1883", "port 1883", "listener 1883 10.1.2.3"):
        conf.write_text(f"allow_anonymous true\n{line}\n")
        with pytest.raises(BrokerError, match="loopback|not allowed"):
            MosquittoBroker.from_config(conf)


def test_wrong_password_unknown_client_and_plain_connections_are_refused(
    secured: tuple[BrokerFiles, MosquittoBroker],
) -> None:
    files, _ = secured
    with pytest.raises(TransportError, match="Not authorized|Bad user name or password"):
        connect(files, "c1", password="not-the-password")
    with pytest.raises(TransportError, match="Not authorized|Bad user name or password"):
        connect(files, "intruder", password=files.credentials["c1"].read_text().strip())
    with pytest.raises(TransportError):  # TLS port, plain MQTT: the handshake fails
        Connection(BrokerConfig(url=files.url.replace("mqtts", "mqtt"), client_id="c1", username="c1",
                                password=files.credentials["c1"].read_text().strip())).start(timeout=1.5)  # fmt: skip
    with pytest.raises(
        ConfigError, match="TLS is required"
    ):  # and the client itself refuses plain under require_tls
        Connection(BrokerConfig(url=files.url.replace("mqtts", "mqtt"), client_id="c1", require_tls=True))
    connect(files, "c1").close()  # the right password works


def test_a_client_may_publish_only_on_its_own_topics_and_read_only_its_own_tasks(
    secured: tuple[BrokerFiles, MosquittoBroker],
) -> None:
    files, _ = secured
    coord, c1, c2 = connect(files, COORDINATOR_USER), connect(files, "c1"), connect(files, "c2")
    try:
        coord.subscribe(TOPICS.all_clients(ClientTopic.UPDATE))
        c2.subscribe(TOPICS.all_clients(ClientTopic.UPDATE))  # tries to read everybody's updates
        c2.subscribe(TOPICS.all_clients(ClientTopic.TASK))  # and everybody's tasks
        c1.subscribe(TOPICS.client("c1", ClientTopic.TASK))
        c1.publish(TOPICS.client("c1", ClientTopic.UPDATE), b"mine", wait=5)
        with pytest.raises(TransportError, match="Not authorized"):
            c1.publish(TOPICS.client("c2", ClientTopic.UPDATE), b"forged", wait=5)
        with pytest.raises(TransportError, match="Not authorized"):
            c1.publish(TOPICS.client("c2", ClientTopic.TASK), b"forged task", wait=5)
        with pytest.raises(TransportError, match="Not authorized"):
            c1.publish(TOPICS.coordinator_status(), b"fake status", wait=5)
        coord.publish(TOPICS.client("c1", ClientTopic.TASK), b"task for c1", wait=5)
        assert coord.inbox.get(timeout=5) == (TOPICS.client("c1", ClientTopic.UPDATE), b"mine")
        assert c1.inbox.get(timeout=5) == (TOPICS.client("c1", ClientTopic.TASK), b"task for c1")
        with pytest.raises(queue.Empty):  # nothing forged arrived, and c2 read nobody else's messages
            coord.inbox.get(timeout=0.5)
        with pytest.raises(queue.Empty):
            c2.inbox.get(timeout=0.2)
    finally:
        for c in (coord, c1, c2):
            c.close()
