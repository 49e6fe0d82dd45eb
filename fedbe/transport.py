"""The MQTT connection both sides use: paho-mqtt 2.x, callback API v2, MQTT v5, behind one class.

* Persistent session (``clean_start=False`` and a session expiry > 0: in MQTT v5 a session whose
  expiry is 0 ends with the connection, whatever ``clean_start`` says): a task published
  while a client was briefly away is delivered when it comes back. Subscriptions are remembered
  and renewed on every (re)connect; paho reconnects with exponential backoff.
* A message published while the broker is unreachable is queued by paho and sent after the
  reconnect; ``publish(wait=...)`` waits for its acknowledgement up to ``wait`` seconds.
* The last will fires whenever the broker loses the connection, also when the broker itself shuts
  down (mosquitto sends every client's will on a restart). The optional *birth* message (e.g. the
  ``online`` status) is published again after every reconnect, so that a will does not outlive
  the outage.
* Incoming messages are put on a queue and handled by the application's own thread: nothing
  blocking ever runs on paho's network thread, so keepalive never starves during training.
* Oversized payloads are refused before publishing: a broker with a size limit drops them and paho
  silently re-sends them about once a second, forever. The limit is ``max_message_bytes``, or less
  where the broker says it accepts less: MQTT v5 brokers announce their *maximum packet size* in
  CONNACK, and a message may use that less :data:`PUBLISH_HEADROOM` (``fedbe-coordinator
  broker-config`` sets the broker's packet size to its message limit plus this headroom, so clients
  and coordinator learn the broker's message limit at every connect).
* TLS: ``tls_ca`` verifies the broker; ``tls_cert`` and ``tls_key`` (together) present this client's
  own certificate, for a broker that requires one (``fedbe-coordinator broker-config --client-certs``).
* paho's errors become :class:`TransportError`; no other module imports paho.
"""

from __future__ import annotations

import logging
import queue
import ssl
import threading
import time
from dataclasses import dataclass
from urllib.parse import urlparse

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from fedbe.errors import ConfigError, FedbeError
from fedbe.protocol import DEFAULT_MAX_MESSAGE_BYTES

log = logging.getLogger(__name__)


# Room a PUBLISH needs besides its payload: fixed header (at most 5 bytes), the topic (fedbe's are at most
# about 160 bytes: two names of at most 64 characters), packet id, empty properties. A broker whose
# maximum packet size is P takes a fedbe message of P - PUBLISH_HEADROOM bytes on any fedbe topic.
PUBLISH_HEADROOM = 1024


def publish_packet_bytes(topic: str, payload_bytes: int, qos: int = 1) -> int:
    """The size of the MQTT v5 PUBLISH packet paho sends for this message (no properties)."""
    remaining = 2 + len(topic.encode()) + (2 if qos > 0 else 0) + 1 + payload_bytes
    length_bytes = 1 if remaining < 128 else 2 if remaining < 16384 else 3 if remaining < 2097152 else 4
    return 1 + length_bytes + remaining


class TransportError(FedbeError):
    """The broker connection failed or refused something."""


@dataclass(frozen=True)
class BrokerConfig:
    url: str
    client_id: str
    username: str | None = None
    password: str | None = None
    tls_ca: str | None = None
    require_tls: bool = False
    tls_cert: str | None = None  # this client's certificate (mutual TLS), with tls_key
    tls_key: str | None = None
    keepalive: int = 30
    session_expiry_seconds: int = 3600
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES

    def endpoint(self) -> tuple[str, int, bool]:
        """(host, port, tls) from ``mqtt://host:port`` or ``mqtts://host:port``."""
        parsed = urlparse(self.url)
        if parsed.scheme not in ("mqtt", "mqtts") or not parsed.hostname:
            raise ConfigError(f"broker URL {self.url!r} must look like mqtt://HOST:PORT or mqtts://HOST:PORT")
        tls = parsed.scheme == "mqtts" or self.tls_ca is not None
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("a client certificate needs both --tls-cert and --tls-key (or neither)")
        if self.tls_cert is not None and not tls:
            raise ConfigError(
                f"a client certificate is sent over TLS only, but {self.url!r} is plain; use mqtts://"
            )
        if self.require_tls and not tls:
            raise ConfigError(
                f"TLS is required but {self.url!r} is a plain connection; use mqtts:// and --tls-ca CA_FILE"
            )
        try:
            port = parsed.port or (8883 if tls else 1883)
        except ValueError:
            raise ConfigError(f"broker URL {self.url!r} has an invalid port") from None
        return parsed.hostname, port, tls


class Connection:
    """One MQTT v5 client. ``inbox`` receives ``(topic, payload)`` for every subscribed message."""

    def __init__(
        self,
        config: BrokerConfig,
        will: tuple[str, bytes, bool] | None = None,
        birth: tuple[str, bytes, bool] | None = None,
    ) -> None:
        self.config = config
        self.birth = birth  # (topic, payload, retain): published on every reconnect (not the first connect)
        self.connects = 0
        self.host, self.port, tls = config.endpoint()
        self.inbox: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.connected = threading.Event()
        self._subscriptions: dict[str, int] = {}
        self._lock = threading.Lock()
        self._refused: str | None = None
        # paho's latest error log line: only there does it say why a TLS session ended
        self._last_error = ""
        self._broker_max_packet: int | None = None  # the broker's Maximum Packet Size, if CONNACK had one
        self._client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2, client_id=config.client_id, protocol=mqtt.MQTTv5
        )
        if config.username is not None:
            self._client.username_pw_set(config.username, config.password)
        if tls:
            try:
                self._client.tls_set(ca_certs=config.tls_ca, certfile=config.tls_cert, keyfile=config.tls_key,
                                     tls_version=ssl.PROTOCOL_TLS_CLIENT)  # fmt: skip
            except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
                files = ", ".join(f for f in (config.tls_ca, config.tls_cert, config.tls_key) if f)
                raise ConfigError(
                    f"can not load the TLS files ({files or 'the system CAs'}): {exc}; check the paths, and "
                    "that the certificate and key are a PEM pair"
                ) from exc
        if will is not None:
            topic, payload, retain = will
            self._client.will_set(topic, payload, qos=1, retain=retain)
        self._client.reconnect_delay_set(min_delay=1, max_delay=30)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._client.on_subscribe = self._on_subscribe
        self._client.on_publish = self._on_publish
        self._client.on_log = self._on_log
        self._refused_publishes: dict[int, str] = {}  # mid -> the broker's PUBACK reason (e.g. ACL)
        self._subacks: dict[int, threading.Event] = {}
        self._early_acks: set[int] = set()  # SUBACKs that arrived before subscribe() registered them
        self._pubacks: dict[int, None] = {}  # the latest PUBACKed message ids, oldest first
        self._puback = threading.Condition(self._lock)

    # -- paho callbacks (network thread: never block here) -------------------------------------
    def _on_connect(
        self, client: mqtt.Client, userdata: object, flags: object, reason: object, props: object
    ) -> None:
        if getattr(reason, "is_failure", False):
            self._refused = str(reason)
            log.error("broker %s:%d refused the connection: %s", self.host, self.port, reason)
            return
        advertised = getattr(props, "MaximumPacketSize", None)
        self._broker_max_packet = advertised if isinstance(advertised, int) and advertised > 0 else None
        with self._lock:
            subs = list(self._subscriptions.items())
        for topic, qos in subs:
            client.subscribe(topic, qos=qos)
        self.connects += 1
        if self.birth is not None and self.connects > 1:
            topic, payload, retain = self.birth
            client.publish(topic, payload, qos=1, retain=retain)
        self._refused = None
        self.connected.set()
        log.debug("connected to %s:%d as %s", self.host, self.port, self.config.client_id)

    def _on_disconnect(
        self, client: mqtt.Client, userdata: object, flags: object, reason: object, props: object
    ) -> None:
        self.connected.clear()
        if self.connects == 0 and self._refused is None:  # not after a CONNACK that said why
            # Closed before any CONNACK: under TLS 1.3 a broker that requires client certificates checks
            # ours after our handshake ended, and answers a missing or foreign one by closing.
            self._refused = (
                f"the broker closed the connection before accepting it ({self._last_error or reason}); a broker "
                "that requires client certificates does so without a valid one (--tls-cert, --tls-key)"
            )
            return
        log.info("disconnected from %s:%d (%s); reconnecting", self.host, self.port, reason)

    def _on_log(self, client: mqtt.Client, userdata: object, level: int, message: str) -> None:
        if level == mqtt.MQTT_LOG_ERR:
            self._last_error = message

    def _on_subscribe(
        self, client: mqtt.Client, userdata: object, mid: int, reasons: object, props: object
    ) -> None:
        with self._lock:
            event = self._subacks.pop(mid, None)
            if event is None:
                self._early_acks.add(mid)
        if event is not None:
            event.set()

    def _on_publish(
        self, client: mqtt.Client, userdata: object, mid: int, reason: object, props: object
    ) -> None:
        with self._puback:
            if getattr(reason, "is_failure", False):
                self._refused_publishes[mid] = str(reason)
                while len(self._refused_publishes) > 1000:  # only publish(wait=...) collects these
                    del self._refused_publishes[next(iter(self._refused_publishes))]
            self._pubacks[mid] = None
            while len(self._pubacks) > 1000:  # only publish(wait=...) of a queued message reads these
                del self._pubacks[next(iter(self._pubacks))]
            self._puback.notify_all()

    def _on_message(self, client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        self.inbox.put((message.topic, bytes(message.payload)))

    # -- API -----------------------------------------------------------------------------------
    @property
    def max_message_bytes(self) -> int:
        """The largest payload :meth:`publish` sends: the configured ``max_message_bytes``, or less where
        the broker announced (at the latest connect) a maximum packet size that leaves less."""
        limit = self.config.max_message_bytes
        if self._broker_max_packet is not None:
            limit = min(limit, max(self._broker_max_packet - PUBLISH_HEADROOM, 0))
        return limit

    def start(self, timeout: float = 10.0) -> None:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self.config.session_expiry_seconds
        try:
            self._client.connect(
                self.host, self.port, keepalive=self.config.keepalive, clean_start=False, properties=props
            )
        except (OSError, ValueError) as exc:
            raise TransportError(f"can not reach the broker at {self.host}:{self.port}: {exc}") from exc
        self._client.loop_start()
        until = time.monotonic() + timeout
        while not self.connected.wait(0.05) and self._refused is None and time.monotonic() < until:
            pass  # a refusal (bad credentials) ends the wait at once
        if not self.connected.is_set():
            reason = self._refused or "no answer"
            self.close()
            raise TransportError(
                f"the broker at {self.host}:{self.port} did not accept the connection within {timeout:.0f} s: "
                f"{reason} (check the URL, credentials and TLS settings)"
            )

    def subscribe(self, topic: str, qos: int = 1, wait: float | None = 10.0) -> None:
        """Subscribe (and renew on every reconnect); with ``wait``, return once the broker acknowledged."""
        with self._lock:
            self._subscriptions[topic] = qos
        if not self.connected.is_set():
            return
        event = threading.Event()
        result, mid = self._client.subscribe(topic, qos=qos)  # never under our lock: paho calls back
        if result != mqtt.MQTT_ERR_SUCCESS or mid is None:
            raise TransportError(f"subscribe to {topic} failed: {mqtt.error_string(result)}")
        with self._lock:
            if mid in self._early_acks:
                self._early_acks.discard(mid)
                event.set()
            else:
                self._subacks[mid] = event
        if wait is not None and not event.wait(wait):
            raise TransportError(
                f"the broker did not acknowledge the subscription to {topic} within {wait} s"
            )

    def publish(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False, wait: float | None = None
    ) -> None:
        """Publish ``payload``; with ``wait``, block until the broker acknowledged it (QoS 1), and raise
        :class:`TransportError` if the broker refused it (MQTT v5 PUBACK reason, e.g. "Not authorized")."""
        limit, broker_packet = self.max_message_bytes, self._broker_max_packet
        packet = publish_packet_bytes(topic, len(payload), qos)
        problem = None
        if len(payload) > limit:
            source = (
                "the configured max_message_bytes"
                if limit == self.config.max_message_bytes
                else f"the broker at {self.host}:{self.port} takes packets of at most {broker_packet} bytes"
            )
            problem = f"exceeds the limit of {limit} bytes ({source})"
        elif broker_packet is not None and packet > broker_packet:
            problem = f"makes a packet of {packet} bytes, over the {broker_packet} bytes the broker takes"
        if problem is not None:
            raise TransportError(
                f"message of {len(payload)} bytes for {topic} {problem}; send fewer blocks per task or use a "
                "smaller codec level (int8), or raise the limit: the broker's (fedbe-coordinator broker-config "
                "--max-message-mb) and the run config's broker.max_message_bytes"
            )
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            raise TransportError(f"publish to {topic} failed: {mqtt.error_string(info.rc)}")
        if wait is not None and info.rc == mqtt.MQTT_ERR_NO_CONN:
            # Queued by paho and sent after the reconnect, but its wait_for_publish raises at once for
            # such a message: wait for the PUBACK of its id here (ids repeat after 65,535 messages:
            # forget an older PUBACK of the same id first; this one can not have come yet, the
            # reconnect waits at least a second).
            with self._puback:
                self._pubacks.pop(info.mid, None)
                if not self._puback.wait_for(lambda: info.mid in self._pubacks, timeout=wait):
                    raise TransportError(
                        f"publish to {topic} was not acknowledged within {wait} s: the broker at "
                        f"{self.host}:{self.port} is unreachable"
                    )
                refused = self._refused_publishes.pop(info.mid, None)
            if refused is not None:
                raise TransportError(f"the broker refused the publish to {topic}: {refused}")
        elif wait is not None:
            try:
                info.wait_for_publish(timeout=wait)
            except (RuntimeError, ValueError) as exc:
                raise TransportError(f"publish to {topic} was not acknowledged: {exc}") from exc
            if not info.is_published():
                raise TransportError(f"publish to {topic} was not acknowledged within {wait} s")
            with self._lock:
                refused = self._refused_publishes.pop(info.mid, None)
            if refused is not None:
                raise TransportError(f"the broker refused the publish to {topic}: {refused}")

    def close(self) -> None:
        try:
            self._client.disconnect()
        finally:
            self._client.loop_stop()
            self.connected.clear()
