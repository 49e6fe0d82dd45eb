"""`fedbe-coordinator revoke` against a real mosquitto started from the generated config: after the
reload or restart the command prescribes, the revoked device is refused, the others are not, and the
device enrolled again gets in."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from coordinator.broker_config import COORDINATOR_USER
from coordinator.certificate_authority import read_index
from coordinator.cli import build_parser
from coordinator.cli import main as coordinator_main
from coordinator.revocation import revoke
from fedbe.broker import MosquittoBroker, find_mosquitto, free_port
from fedbe.errors import ConfigError
from fedbe.protocol import ClientTopic, Topics
from fedbe.transport import BrokerConfig, Connection, TransportError

FED = "revoking"
TOPICS = Topics(FED)
CERT_REFUSED = "closed the connection before accepting it"  # the TLS handshake fails
PASSWORD_REFUSED = "Not authorized"  # CONNACK


@pytest.fixture
def base() -> Iterator[Path]:
    if find_mosquitto() is None or shutil.which("openssl") is None:
        pytest.skip("mosquitto and openssl are needed (scripts/setup.sh installs mosquitto)")
    folder = Path(tempfile.mkdtemp(prefix="fedbe-revoke-"))
    os.chmod(folder, 0o755)  # mosquitto, run as root, drops to its own user: it must reach the folder
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def _broker_dir(base: Path, *extra: str) -> tuple[Path, str]:
    (base / "clients.txt").write_text("c1\nc2\n")
    port = free_port()
    args = ["broker-config", "--clients", str(base / "clients.txt"), "--out", str(base / "broker"),
            "--federation", FED, "--port", str(port), *extra]  # fmt: skip
    assert coordinator_main(args) == 0
    return base / "broker", f"mqtts://127.0.0.1:{port}"


def _connect(
    url: str, ca: Path, client_id: str, *, cert: Path | None = None, password: str | None = None
) -> Connection:
    """A certificate (and the key next to it) or a password says who the client is."""
    conn = Connection(BrokerConfig(url=url, client_id=client_id, tls_ca=str(ca), require_tls=True,
                                   tls_cert=str(cert) if cert else None,
                                   tls_key=str(cert.with_suffix(".key")) if cert else None,
                                   username=None if cert else client_id, password=password))  # fmt: skip
    conn.start(timeout=5)
    return conn


def _wait(condition: Callable[[], bool], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def _reload(broker: MosquittoBroker) -> None:
    assert broker.pid is not None
    os.kill(broker.pid, signal.SIGHUP)  # what `systemctl reload mosquitto` does
    time.sleep(0.5)


def _revoke_command(broker_dir: Path, device: str, capsys: pytest.CaptureFixture[str]) -> str:
    capsys.readouterr()
    assert coordinator_main(["revoke", "--broker-dir", str(broker_dir), "--device", device]) == 0
    return capsys.readouterr().out


def _enroll_again(broker_dir: Path, device: str, url: str, bundle: Path) -> None:
    argv = ["enroll", "--broker-dir", str(broker_dir), "--device", device, "--broker-url", url, "--out",
            str(bundle), "--force"]  # fmt: skip
    assert coordinator_main(argv) == 0


def test_a_revoked_certificate_is_refused_after_the_restart_the_command_prescribes(
    base: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broker_dir, url = _broker_dir(base, "--client-certs")
    ca, creds = broker_dir / "ca.crt", broker_dir / "credentials"
    c1_cert = base / "c1.crt"  # the lost device's copy (revoke deletes the one in credentials/)
    shutil.copy(creds / "c1.crt", c1_cert)
    shutil.copy(creds / "c1.key", base / "c1.key")
    with MosquittoBroker.from_config(broker_dir / "mosquitto.conf") as broker:  # the empty CRL is valid
        c1 = _connect(url, ca, "c1", cert=c1_cert)
        c2 = _connect(url, ca, "c2", cert=creds / "c2.crt")
        try:
            out = _revoke_command(broker_dir, "c1", capsys)
            assert "next: restart the broker" in out and "A reload (SIGHUP) is not enough" in out
            assert not (creds / "c1.crt").exists() and not (creds / "c1.key").exists()
            revoked = {i.serial for i in read_index(broker_dir) if i.revoked}
            assert len(revoked) == 1
            # A reload: mosquitto re-reads the CRL and refuses c1's new connections, but c1's open one
            # stays: why the command says restart.
            _reload(broker)
            with pytest.raises(TransportError, match=CERT_REFUSED):
                _connect(url, ca, "c1", cert=c1_cert)
            assert c1.connected.is_set() and c1.connects == 1
            c1.publish(TOPICS.client("c1", ClientTopic.STATUS), b"still here", wait=5)
            # The restart closes every connection: c2 reconnects by itself, c1 can not.
            broker.stop()
            broker.start()
            assert _wait(lambda: c2.connects == 2 and c2.connected.is_set(), 15)
            assert not _wait(c1.connected.is_set, 3) and c1.connects == 1
            with pytest.raises(TransportError, match=CERT_REFUSED):
                _connect(url, ca, "c1", cert=c1_cert)
            _connect(url, ca, "c2-again", cert=creds / "c2.crt").close()  # another device still gets in
        finally:
            c1.close()
            c2.close()
        # Enrolled again, c1 gets a certificate with a new serial, which the broker takes as it is.
        _enroll_again(broker_dir, "c1", url, base / "bundle")
        current = [i.serial for i in read_index(broker_dir) if i.common_name == "c1" and not i.revoked]
        assert len(current) == 1 and current[0] not in revoked
        _connect(url, ca, "c1", cert=base / "bundle" / "device.crt").close()
        with pytest.raises(TransportError, match=CERT_REFUSED):  # the lost certificate stays refused
            _connect(url, ca, "c1", cert=c1_cert)


def test_enrolling_a_device_revokes_its_earlier_certificate(base: Path, capsys: pytest.CaptureFixture[str]) -> None:
    broker_dir, url = _broker_dir(base, "--client-certs")
    ca, creds = broker_dir / "ca.crt", broker_dir / "credentials"
    old = base / "c2.crt"  # the certificate broker-config issued for c2, as if handed out
    shutil.copy(creds / "c2.crt", old)
    shutil.copy(creds / "c2.key", base / "c2.key")
    with MosquittoBroker.from_config(broker_dir / "mosquitto.conf") as broker:
        _connect(url, ca, "c2", cert=old).close()
        capsys.readouterr()
        argv = ["enroll", "--broker-dir", str(broker_dir), "--device", "c2", "--broker-url", url, "--out",
                str(base / "bundle")]  # fmt: skip
        assert coordinator_main(argv) == 0
        assert "revoked c2's earlier certificate" in capsys.readouterr().out
        assert not (creds / "c2.crt").exists()
        _reload(broker)
        with pytest.raises(TransportError, match=CERT_REFUSED):
            _connect(url, ca, "c2", cert=old)
        _connect(url, ca, "c2", cert=base / "bundle" / "device.crt").close()
        _connect(url, ca, "c1", cert=creds / "c1.crt").close()  # another device's is untouched


def test_a_revoked_password_is_refused_and_its_connection_closed_after_a_reload(
    base: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broker_dir, url = _broker_dir(base)
    ca, creds = broker_dir / "ca.crt", broker_dir / "credentials"
    passwords = {c: (creds / f"{c}.password").read_text().strip() for c in ("c1", "c2")}
    with MosquittoBroker.from_config(broker_dir / "mosquitto.conf") as broker:
        c1 = _connect(url, ca, "c1", password=passwords["c1"])
        c2 = _connect(url, ca, "c2", password=passwords["c2"])
        try:
            out = _revoke_command(broker_dir, "c1", capsys)
            assert "next: reload the broker" in out
            assert "c1:" not in (broker_dir / "passwd").read_text()
            assert "c2:" in (broker_dir / "passwd").read_text()
            assert not (creds / "c1.password").exists()
            _reload(broker)
            assert _wait(lambda: not c1.connected.is_set(), 5), "the reload left c1 connected"
            assert not _wait(c1.connected.is_set, 2.5) and c1.connects == 1  # its retries are refused
            with pytest.raises(TransportError, match=PASSWORD_REFUSED):
                _connect(url, ca, "c1", password=passwords["c1"])
            assert c2.connected.is_set() and c2.connects == 1  # the others keep their connection
            c2.publish(TOPICS.client("c2", ClientTopic.STATUS), b"online", wait=5)
        finally:
            c1.close()
            c2.close()
        _enroll_again(broker_dir, "c1", url, base / "bundle")
        _reload(broker)
        _connect(url, ca, "c1", password=(base / "bundle" / "password").read_text().strip()).close()
        with pytest.raises(TransportError, match=PASSWORD_REFUSED):  # the old password stays refused
            _connect(url, ca, "c1", password=passwords["c1"])


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("mode", [["--client-certs"], []], ids=["certificates", "passwords"])
def test_revoke_refuses_an_unknown_device_and_the_coordinator_and_changes_nothing(
    base: Path, mode: list[str]
) -> None:
    broker_dir, _ = _broker_dir(base, *mode)
    before = _snapshot(broker_dir)
    with pytest.raises(ConfigError, match="'c9' has no (valid certificate|password)"):
        revoke(broker_dir, "c9")
    with pytest.raises(ConfigError, match="the coordinator's own identity"):
        revoke(broker_dir, COORDINATOR_USER)
    with pytest.raises(ConfigError, match="invalid client id"):
        revoke(broker_dir, "../c1")
    assert _snapshot(broker_dir) == before
    revoke(broker_dir, "c1")
    with pytest.raises(ConfigError, match="revoked already"):
        revoke(broker_dir, "c1")


def test_revoke_refuses_a_folder_that_is_not_fedbes(base: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ConfigError, match="--broker-dir must be the folder"):
        revoke(base / "nowhere", "c1")
    other = base / "other"
    other.mkdir()
    (other / "mosquitto.conf").write_text("listener 1883\nallow_anonymous true\n")
    (other / "acl").write_text("topic readwrite #\n")
    (other / "passwd").write_text("c1:$7$hash\n")
    with pytest.raises(ConfigError, match="is not a folder that `fedbe-coordinator broker-config` wrote"):
        revoke(other, "c1")
    assert (other / "passwd").read_text() == "c1:$7$hash\n"
    assert coordinator_main(["revoke", "--broker-dir", str(other), "--device", "c1"]) == 1
    assert "is not a folder that" in capsys.readouterr().err


def test_revoke_help_says_what_the_broker_needs_afterwards(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["revoke", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--broker-dir" in text and "--device" in text
    assert "RESTART the broker" in text and "RELOAD the broker" in text and "enroll --force" in text
