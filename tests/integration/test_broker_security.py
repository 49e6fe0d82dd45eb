"""A real mosquitto started from the configuration of `fedbe-coordinator broker-config`: TLS, identity, ACLs,
the sockets it opens and the size of the messages it takes."""

from __future__ import annotations

import os
import queue
import shutil
import ssl
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import psutil
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from coordinator.broker_config import (
    COORDINATOR_USER,
    DEFAULT_MAX_MESSAGE_MB,
    MIB,
    BrokerFiles,
    acl_text,
    generate,
    read_clients,
)
from coordinator.cli import build_parser
from coordinator.cli import main as coordinator_main
from fedbe.broker import BrokerError, MosquittoBroker, find_mosquitto, free_port
from fedbe.errors import ConfigError
from fedbe.protocol import ClientTopic, Topics
from fedbe.transport import BrokerConfig, Connection, TransportError

FED = "secure"
TOPICS = Topics(FED)
LIMIT = 1 * MIB  # the broker of these tests takes messages of at most 1 MiB


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
                             "--port", str(port), "--max-message-mb", "1"]) == 0  # fmt: skip
    files = BrokerFiles(
        out_dir=out, conf=out / "mosquitto.conf", acl=out / "acl", passwd=out / "passwd", ca_cert=out / "ca.crt",
        server_cert=out / "server.crt", server_key=out / "server.key",
        credentials={u: out / "credentials" / f"{u}.password" for u in (COORDINATOR_USER, "c1", "c2")},
        host="127.0.0.1", port=port, max_message_bytes=LIMIT,
    )  # fmt: skip
    broker = MosquittoBroker.from_config(files.conf)
    broker.start()
    try:
        yield files, broker
    finally:
        broker.close()
        shutil.rmtree(base, ignore_errors=True)


def connect(
    files: BrokerFiles, user: str, password: str | None = None, client_id: str | None = None, **kw: object
) -> Connection:
    secret = password if password is not None else files.credentials[user].read_text().strip()
    conn = Connection(BrokerConfig(url=files.url, client_id=client_id or user, username=user, password=secret,
                                   tls_ca=str(files.ca_cert), require_tls=True, **kw))  # type: ignore[arg-type]  # fmt: skip
    conn.start(timeout=5)
    return conn


class RawClient:
    """A bare paho client with valid credentials: what a device that does not run fedbe's code could send."""

    def __init__(self, files: BrokerFiles, user: str) -> None:
        self.connects = 0
        self.disconnects: list[str] = []
        self.published: set[int] = set()
        self.connected = threading.Event()
        self.client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2, client_id=user, protocol=mqtt.MQTTv5
        )
        self.client.username_pw_set(user, files.credentials[user].read_text().strip())
        self.client.tls_set(ca_certs=str(files.ca_cert), tls_version=ssl.PROTOCOL_TLS_CLIENT)
        self.client.reconnect_delay_set(min_delay=1, max_delay=2)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = lambda c, u, f, reason, p: self.disconnects.append(str(reason))
        self.client.on_publish = lambda c, u, mid, reason, p: self.published.add(mid)
        self.client.connect(files.host, files.port)
        self.client.loop_start()
        assert self.connected.wait(5), "the raw client could not connect"

    def _on_connect(self, client: mqtt.Client, u: object, f: object, reason: object, props: object) -> None:
        self.connects += 1
        self.connected.set()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


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
    # A listener option above the first listener line makes mosquitto open its default listener,
    # plain MQTT on port 1883 of every address, although every listener line says loopback.
    for above in ("use_username_as_clientid true", "certfile server.crt", "max_connections 10",
                  "per_listener_settings true\npassword_file passwd"):  # fmt: skip
        conf.write_text(f"allow_anonymous false\n{above}\nlistener 18830 127.0.0.1\n")
        with pytest.raises(BrokerError, match="before the first 'listener' line"):
            MosquittoBroker.from_config(conf)
    conf.write_text("include_dir /etc/mosquitto/conf.d\nlistener 18830 127.0.0.1\n")  # unchecked files
    with pytest.raises(BrokerError, match="not allowed"):
        MosquittoBroker.from_config(conf)


def test_a_broker_that_listens_where_its_listener_lines_do_not_say_is_stopped() -> None:
    if find_mosquitto() is None:
        pytest.skip("mosquitto is not installed (scripts/setup.sh installs it)")
    stray = free_port()
    broker = MosquittoBroker(extra_config=f"listener {stray} 127.0.0.1\n")  # a listener it does not know of
    try:
        with pytest.raises(BrokerError, match=f"listened on 127.0.0.1:{stray} besides its listener lines"):
            broker.start()
        assert broker.pid is None  # stopped, not left running
    finally:
        broker.close()


def test_the_broker_listens_on_its_one_loopback_tls_port_and_nowhere_else(
    secured: tuple[BrokerFiles, MosquittoBroker],
) -> None:
    files, broker = secured
    assert broker.pid is not None
    sockets = psutil.Process(broker.pid).net_connections(kind="inet")  # what the system says it listens on
    listening = sorted((c.laddr.ip, c.laddr.port) for c in sockets if c.status == psutil.CONN_LISTEN)
    assert listening == [("127.0.0.1", files.port)]  # no default listener: no 1883, nothing on 0.0.0.0 or ::


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


def test_a_client_with_valid_credentials_can_not_take_over_another_clients_connection(
    secured: tuple[BrokerFiles, MosquittoBroker],
) -> None:
    files, _ = secured
    task = TOPICS.client("c1", ClientTopic.TASK)
    coord, c1 = connect(files, COORDINATOR_USER), connect(files, "c1")
    intruder: Connection | None = None
    try:
        c1.subscribe(task)
        intruder = connect(files, "c2", client_id="c1")  # c2's own valid password, c1's client id
        time.sleep(1.5)  # a takeover disconnects c1 at once (paho would reconnect it after 1 s)
        assert c1.connected.is_set() and c1.connects == 1, "c1 was disconnected by a client using its id"
        coord.publish(task, b"task after the attempt", wait=5)
        assert c1.inbox.get(timeout=5) == (task, b"task after the attempt")
        with pytest.raises(queue.Empty):
            intruder.inbox.get(timeout=0.2)
    finally:
        for c in (coord, c1, intruder):
            if c is not None:
                c.close()


def test_a_task_queued_for_an_offline_client_reaches_it_although_another_client_claimed_its_id(
    secured: tuple[BrokerFiles, MosquittoBroker],
) -> None:
    files, _ = secured
    task = TOPICS.client("c1", ClientTopic.TASK)
    coord, c1 = connect(files, COORDINATOR_USER), connect(files, "c1")
    c1.subscribe(task)
    c1.close()  # offline; its session (subscription, queue) stays on the broker
    intruder: Connection | None = None
    try:
        coord.publish(task, b"task queued for c1", wait=5)
        intruder = connect(files, "c2", client_id="c1")  # would resume c1's session and be handed its queue
        time.sleep(0.5)
        intruder.close()
        c1 = connect(files, "c1")
        assert c1.inbox.get(timeout=5) == (task, b"task queued for c1")
        with pytest.raises(queue.Empty):
            intruder.inbox.get(timeout=0.2)
    finally:
        for c in (coord, c1, intruder):
            if c is not None:
                c.close()


def test_the_broker_drops_a_message_over_its_limit_and_fedbe_refuses_to_send_one(
    secured: tuple[BrokerFiles, MosquittoBroker],
) -> None:
    files, _ = secured
    topic = TOPICS.client("c2", ClientTopic.UPDATE)
    coord = connect(files, COORDINATOR_USER)
    raw: RawClient | None = None
    c2: Connection | None = None
    try:
        coord.subscribe(TOPICS.all_clients(ClientTopic.UPDATE))
        # An authenticated client that does not run fedbe's code: at the limit delivered, above it not.
        raw = RawClient(files, "c2")
        raw.client.publish(topic, b"a" * LIMIT, qos=1)
        assert coord.inbox.get(timeout=10) == (topic, b"a" * LIMIT)
        raw.client.publish(topic, b"b" * (LIMIT + 1), qos=1)  # dropped (paho, not told, keeps re-sending it)
        raw.client.publish(topic, b"c" * (4 * LIMIT), qos=1)  # over the packet limit: refused unread
        with pytest.raises(queue.Empty):
            coord.inbox.get(timeout=3)
        assert raw.disconnects  # the broker closed the connection that carried them
        raw.close()
        raw = None
        # fedbe's transport learns the limit from the broker at connect, whatever its own setting
        c2 = connect(files, "c2")  # max_message_bytes: the default, 256 MiB
        assert c2.config.max_message_bytes > LIMIT and c2.max_message_bytes == LIMIT
        with pytest.raises(TransportError, match=f"exceeds the limit of {LIMIT} bytes .*--max-message-mb"):
            c2.publish(topic, b"d" * (LIMIT + 1), wait=5)
        c2.publish(topic, b"e" * LIMIT, wait=5)
        assert coord.inbox.get(timeout=10) == (topic, b"e" * LIMIT)
        with pytest.raises(queue.Empty):
            coord.inbox.get(timeout=0.5)
    finally:
        for c in (coord, c2, raw):
            if c is not None:
                c.close()


def test_the_message_limit_is_checked_and_the_cli_default_is_the_generators(tmp_path: Path) -> None:
    args = build_parser().parse_args(["broker-config", "--clients", "c.txt", "--out", "out"])
    assert args.max_message_mb == DEFAULT_MAX_MESSAGE_MB
    for bad in (MIB - 1, 256 * MIB):  # under 1 MiB; over what MQTT (and mosquitto) can carry
        with pytest.raises(ConfigError, match="message limit must be 1 to 255 MiB"):
            generate(["c1"], tmp_path / "out", max_message_bytes=bad)
    assert not (tmp_path / "out").exists()  # refused before anything was written
