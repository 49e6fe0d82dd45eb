"""A local mosquitto broker on a free loopback port, for tests and single-machine simulations.

The config is written to a temporary folder that the broker's user can read (mosquitto run as
root drops to the ``mosquitto`` user). :meth:`MosquittoBroker.from_config` starts one from a given
config file instead (e.g. the TLS configuration of ``fedbe-coordinator broker-config``), after
checking that every listener binds a loopback address and that no listener option comes before
the first ``listener`` line (mosquitto 2.0 would open its default listener, port 1883 on every
address, for it). Once a broker listens, the sockets it really opened are read back (psutil): one
outside loopback, or on a port no ``listener`` line names, stops it with :class:`BrokerError`.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import IO

import psutil

from fedbe.errors import FedbeError

log = logging.getLogger(__name__)

MOSQUITTO_PATHS = ("/usr/sbin/mosquitto", "/usr/bin/mosquitto", "/usr/local/sbin/mosquitto")

# The options mosquitto 2.0 keeps per listener. Above the first ``listener`` line they set up its
# default listener, and any of them makes it open that one, in plain MQTT on port 1883 of every
# address (and the option never reaches the listeners below).
LISTENER_OPTIONS = frozenset({
    "bind_address", "bind_interface", "http_dir", "max_connections", "max_qos", "max_topic_alias", "mount_point",
    "port", "protocol", "socket_domain", "use_username_as_clientid", "websockets_headers_size",
    "cafile", "capath", "certfile", "keyfile", "ciphers", "ciphers_tls1.3", "crlfile", "dhparamfile",
    "require_certificate", "tls_engine", "tls_engine_kpass_sha1", "tls_keyform", "tls_version",
    "use_identity_as_username", "use_subject_as_username", "psk_hint",
})  # fmt: skip
# With ``per_listener_settings true`` these are per listener too (and ``auth_opt_*``, ``plugin_opt_*``).
PER_LISTENER_SECURITY_OPTIONS = frozenset({
    "password_file", "acl_file", "psk_file", "allow_anonymous", "allow_zero_length_clientid", "auth_plugin",
    "plugin", "auto_id_prefix",
})  # fmt: skip


class BrokerError(FedbeError):
    """The local broker could not be started."""


def find_mosquitto() -> str | None:
    found = shutil.which("mosquitto")
    if found:
        return found
    return next((p for p in MOSQUITTO_PATHS if os.access(p, os.X_OK)), None)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class MosquittoBroker:
    """``with MosquittoBroker() as broker: broker.url`` — a private mosquitto on 127.0.0.1."""

    def __init__(self, port: int | None = None, extra_config: str = "", persistence: bool = False) -> None:
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.extra_config = extra_config
        self.persistence = persistence
        self.scheme = "mqtt"
        self._dir: Path | None = None
        self._given_config: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._ports = {self.port}  # the ports its listener lines name: it may listen on no other

    @classmethod
    def from_config(cls, config_file: Path) -> MosquittoBroker:
        """A broker that runs ``config_file`` as it is. Its listeners must all bind a loopback address
        (``listener PORT 127.0.0.1``) and every listener option must follow a ``listener`` line; the
        first listener is the broker's URL (mqtts:// when it has a certfile)."""
        text = config_file.read_text()
        per_listener = any(
            line.split("#", 1)[0].split()[:2] == ["per_listener_settings", "true"]
            for line in text.splitlines()
        )
        listeners: list[tuple[int, str]] = []
        tls = False
        for number, line in enumerate(text.splitlines(), 1):
            words = line.split("#", 1)[0].split()
            if not words:
                continue
            option = words[0]
            if option in ("port", "bind_address", "bind_interface", "include_dir"):
                raise BrokerError(
                    f"{config_file}:{number}: {option!r} is not allowed here; use 'listener PORT 127.0.0.1' "
                    "and keep the whole configuration in this one file"
                )
            scoped = option in LISTENER_OPTIONS or (per_listener and (
                option in PER_LISTENER_SECURITY_OPTIONS or option.startswith(("auth_opt_", "plugin_opt_"))
            ))  # fmt: skip
            if scoped and not listeners:
                raise BrokerError(
                    f"{config_file}:{number}: {option!r} comes before the first 'listener' line: mosquitto "
                    "would apply it to its default listener and open that in plain MQTT on port 1883 of every "
                    "address; move it below 'listener PORT 127.0.0.1'"
                )
            if option == "listener":
                if len(words) < 3 or not _is_loopback(words[2]):
                    raise BrokerError(
                        f"{config_file}:{number}: {line.strip()!r} does not bind a loopback address; only "
                        "'listener PORT 127.0.0.1' (or ::1) is started here"
                    )
                listeners.append((int(words[1]), words[2]))
            if option == "certfile" and len(listeners) == 1:
                tls = True
        if not listeners:
            raise BrokerError(f"{config_file} has no 'listener PORT 127.0.0.1' line")
        broker = cls(port=listeners[0][0])
        broker.host = listeners[0][1]
        broker.scheme = "mqtts" if tls else "mqtt"
        broker._given_config = config_file
        broker._ports = {port for port, _ in listeners}
        return broker

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        """The running broker's process id (None when it is not running)."""
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def listening_sockets(self) -> set[tuple[str, int]]:
        """``(address, port)`` of every TCP socket the running broker listens on, read from the system."""
        if self._proc is None:
            return set()
        conns = psutil.Process(self._proc.pid).net_connections(kind="inet")
        return {(c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN}

    def start(self) -> MosquittoBroker:
        exe = find_mosquitto()
        if exe is None:
            raise BrokerError(
                "mosquitto is not installed: apt-get install mosquitto (scripts/setup.sh does this)"
            )
        if self._given_config is not None:
            return self._launch(exe, self._given_config)
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="fedbe-mosquitto-"))
            os.chmod(self._dir, 0o777)  # readable and writable by the mosquitto user
        conf = self._dir / "mosquitto.conf"
        lines = [
            f"listener {self.port} {self.host}",
            "allow_anonymous true",
            "max_queued_messages 10000",
            f"persistence {'true' if self.persistence else 'false'}",
            f"persistence_location {self._dir}/",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
        ]
        conf.write_text("\n".join(lines) + "\n" + self.extra_config)
        os.chmod(conf, 0o644)
        return self._launch(exe, conf)

    def _launch(self, exe: str, conf: Path) -> MosquittoBroker:
        # The broker's log goes to a file, not a pipe: a pipe nobody reads fills up and blocks it.
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 - closed in close()
        # Its own session: a Ctrl-C at the terminal must not take the broker down before the clients
        # and the coordinator that use it have been stopped (stop() ends it).
        self._proc = subprocess.Popen(
            [exe, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=self._log, start_new_session=True
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                err = self.log_text()
                raise BrokerError(f"mosquitto exited at start (code {self._proc.returncode}): {err.strip()}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    pass
            except OSError:
                time.sleep(0.05)
                continue
            self._check_sockets()
            log.debug("mosquitto listening on %s", self.url)
            return self
        self.stop()
        raise BrokerError(f"mosquitto did not start listening on {self.url} within 10 s")

    def _check_sockets(self) -> None:
        """Stop the broker if it listens beyond loopback or on a port no listener line names."""
        try:
            sockets = self.listening_sockets()
        except psutil.Error as exc:  # e.g. another user's process on a system that hides it
            log.warning("can not read the sockets of mosquitto (pid %s) to check them: %s", self.pid, exc)
            return
        stray = sorted(s for s in sockets if not _is_loopback(s[0]) or s[1] not in self._ports)
        if stray:
            self.stop()
            raise BrokerError(
                f"mosquitto listened on {', '.join(f'{a}:{p}' for a, p in stray)} besides its listener lines "
                f"({', '.join(map(str, sorted(self._ports)))} on loopback); stopped it. Check the config for "
                "listener options above the first 'listener' line"
            )

    def log_text(self) -> str:
        """What the broker wrote to stderr so far."""
        if self._log is None:
            return ""
        self._log.seek(0)
        return self._log.read().decode(errors="replace")

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None

    def close(self) -> None:
        self.stop()
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> MosquittoBroker:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
