"""The MQTT connection against a real mosquitto: persistent sessions and the size limit."""

from __future__ import annotations

import queue

import pytest

from fedbe.broker import MosquittoBroker, find_mosquitto
from fedbe.transport import PUBLISH_HEADROOM, BrokerConfig, Connection, TransportError, publish_packet_bytes


def test_a_message_published_while_a_client_was_away_is_delivered_when_it_returns(
    broker: MosquittoBroker,
) -> None:
    away = Connection(BrokerConfig(url=broker.url, client_id="device-1"))
    away.start()
    away.subscribe("t/device-1/task")
    away.close()  # clean disconnect; the session (expiry 1 h) keeps the subscription
    sender = Connection(BrokerConfig(url=broker.url, client_id="sender"))
    sender.start()
    sender.publish("t/device-1/task", b"round 7", wait=5)
    sender.close()
    back = Connection(BrokerConfig(url=broker.url, client_id="device-1"))
    back.start()
    try:
        topic, payload = back.inbox.get(timeout=5)
        assert (topic, payload) == ("t/device-1/task", b"round 7")
    finally:
        back.close()


def test_oversized_messages_are_refused_before_publishing(broker: MosquittoBroker) -> None:
    conn = Connection(BrokerConfig(url=broker.url, client_id="big", max_message_bytes=1000))
    conn.start()
    listener = Connection(BrokerConfig(url=broker.url, client_id="listener"))
    listener.start()
    listener.subscribe("t/big")
    try:
        with pytest.raises(TransportError, match="exceeds the limit of 1000 bytes"):
            conn.publish("t/big", b"x" * 1001)
        conn.publish("t/big", b"x" * 1000, wait=5)
        assert listener.inbox.get(timeout=5)[1] == b"x" * 1000
        with pytest.raises(queue.Empty):
            listener.inbox.get(timeout=0.5)
    finally:
        conn.close()
        listener.close()


def test_the_limit_follows_the_brokers_maximum_packet_size_and_never_exceeds_it() -> None:
    if find_mosquitto() is None:
        pytest.skip("mosquitto is not installed (scripts/setup.sh installs it)")
    packet = 5000
    with MosquittoBroker(extra_config=f"max_packet_size {packet}\n") as broker:  # announced in CONNACK
        sender = Connection(BrokerConfig(url=broker.url, client_id="sender"))  # its own limit: 256 MiB
        reader = Connection(BrokerConfig(url=broker.url, client_id="reader"))
        sender.start()
        reader.start()
        reader.subscribe("t/#")
        try:
            limit = packet - PUBLISH_HEADROOM
            assert sender.max_message_bytes == limit
            with pytest.raises(
                TransportError, match=rf"exceeds the limit of {limit} bytes \(the broker .* {packet} bytes"
            ):
                sender.publish("t/a", b"x" * (limit + 1))
            # Under a long topic the whole packet counts: one of exactly the broker's size is taken
            # (so the size computed is never less than the real one), a byte more is refused here.
            topic = "t/" + "y" * 2000
            fits = next(n for n in range(packet, 0, -1) if publish_packet_bytes(topic, n) <= packet)
            assert publish_packet_bytes(topic, fits) == packet
            with pytest.raises(
                TransportError, match=f"packet of {packet + 1} bytes, over the {packet} bytes"
            ):
                sender.publish(topic, b"x" * (fits + 1))
            sender.publish(topic, b"x" * fits, wait=5)
            assert reader.inbox.get(timeout=5) == (topic, b"x" * fits)
        finally:
            sender.close()
            reader.close()


def test_an_unreachable_broker_and_a_plain_url_under_require_tls_are_clear_errors(
    broker: MosquittoBroker,
) -> None:
    from fedbe.broker import free_port  # noqa: PLC0415
    from fedbe.errors import ConfigError  # noqa: PLC0415

    with pytest.raises(TransportError, match="can not reach the broker"):
        Connection(BrokerConfig(url=f"mqtt://127.0.0.1:{free_port()}", client_id="x")).start(timeout=2)
    with pytest.raises(ConfigError, match="TLS is required"):
        Connection(BrokerConfig(url=broker.url, client_id="x", require_tls=True))
    with pytest.raises(ConfigError, match="mqtt://HOST:PORT"):
        Connection(BrokerConfig(url="http://127.0.0.1:1", client_id="x"))


def test_across_a_broker_restart_a_waited_publish_is_delivered_and_the_birth_undoes_the_will() -> None:
    """mosquitto fires every client's will when it shuts down; after the restart the client publishes
    its birth message again, and a publish(wait=...) made while the broker was down returns once the
    restarted broker has acknowledged it (paho's own wait raises at once for such a message)."""
    import threading  # noqa: PLC0415
    import time  # noqa: PLC0415

    from fedbe.broker import find_mosquitto  # noqa: PLC0415

    if find_mosquitto() is None:
        pytest.skip("mosquitto is not installed (scripts/setup.sh installs it)")
    data = ("t/data", b"sent while the broker was down")
    broker = MosquittoBroker(persistence=True).start()
    watcher = Connection(BrokerConfig(url=broker.url, client_id="watcher"))
    device = Connection(
        BrokerConfig(url=broker.url, client_id="device"),
        will=("t/status", b"offline", True), birth=("t/status", b"online", True),
    )  # fmt: skip
    restart = threading.Timer(2.0, broker.start)
    try:
        watcher.start()
        watcher.subscribe("t/#")
        device.start()
        broker.stop()
        deadline = time.monotonic() + 10
        while device.connected.is_set() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not device.connected.is_set()
        restart.start()
        started = time.monotonic()
        device.publish(*data, wait=30)
        assert time.monotonic() - started > 1.5  # it waited for the restarted broker's acknowledgement
        seen: list[tuple[str, bytes]] = []
        statuses: list[bytes] = []
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not (data in seen and statuses[-1:] == [b"online"]):
            try:
                seen.append(watcher.inbox.get(timeout=0.5))
            except queue.Empty:
                continue
            statuses = [p for t, p in seen if t == "t/status"]
        assert statuses[:1] == [b"offline"] and statuses[-1:] == [b"online"], seen  # the will, then the birth
        assert seen.count(data) == 1, seen
    finally:
        restart.join()
        device.close()
        watcher.close()
        broker.close()
