"""Revocation: cutting a lost or compromised device off the federation's broker.

``fedbe-coordinator revoke --broker-dir DIR --device ID`` works on the folder ``broker-config`` wrote:

* mutual TLS (``--client-certs``): every still-valid certificate the CA issued with CN = ID is marked
  revoked in the CA's database (DIR/ca/) and DIR/crl.pem, which the listener reads (``crlfile``), is
  rewritten with it. Then the broker must be **restarted**: mosquitto 2.0.11 re-reads the CRL on a reload
  (SIGHUP) and refuses the device's new connections, but keeps a connection the device already has open
  (measured; tests/integration/test_revocation.py). A restart closes every connection; the coordinator
  and the other devices reconnect by themselves, and the revoked device is refused.
* passwords: the device's line leaves DIR/passwd. A **reload** is enough: on SIGHUP mosquitto 2.0.11
  re-reads the file, closes the device's open connection at once and refuses new ones (measured).

The ACL needs no change in either mode: it grants clients by pattern (``%u``), so a device that can
not log in is granted nothing; broker-config writes per-user ACL lines only for the coordinator.
The device's files left in DIR/credentials (from broker-config) are deleted. Enrolling the device again
(``fedbe-coordinator enroll --force``) gives it a new certificate (a new serial) or a new password.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from coordinator.broker_config import CONF_HEADER, COORDINATOR_USER
from coordinator.certificate_authority import CONFIG, CRL, Issued, read_index, revoke_certificates
from coordinator.enrolment import acl_federation, read_broker_file, uses_client_certs
from fedbe.errors import ConfigError
from fedbe.protocol import check_name

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Revocation:
    """What :func:`revoke` did, and what the operator must do next."""

    device: str
    client_certs: bool
    serials: tuple[str, ...]  # the certificates revoked (mutual TLS)
    removed: tuple[Path, ...]  # files deleted from DIR/credentials
    changed: Path  # crl.pem or passwd

    @property
    def next_step(self) -> str:
        return next_step(self.device, self.client_certs)


def next_step(device: str, client_certs: bool) -> str:
    """What the broker needs before it refuses ``device`` (found by experiment with mosquitto 2.0.11)."""
    if client_certs:
        return (
            "restart the broker: systemctl restart mosquitto (or stop it and start it again). A reload "
            f"(SIGHUP) is not enough: mosquitto re-reads {CRL} then and refuses {device}'s new connections, "
            f"but keeps a connection {device} already has open. The coordinator and the other devices "
            "reconnect by themselves."
        )
    return (
        "reload the broker: systemctl reload mosquitto (or kill -HUP the mosquitto process). mosquitto "
        f"then re-reads passwd, closes {device}'s connection if it has one, and refuses it from then on."
    )


def valid_serials(issued: list[Issued], device: str) -> list[str]:
    """Serials of the certificates with CN = ``device`` that are not revoked yet."""
    return [i.serial for i in issued if i.common_name == device and not i.revoked]


def without_user(passwd_text: str, device: str) -> tuple[str, bool]:
    """``passwd_text`` less ``device``'s line, and whether it had one."""
    lines = passwd_text.splitlines()
    kept = [line for line in lines if line.split(":", 1)[0] != device]
    return "".join(line + "\n" for line in kept), len(kept) != len(lines)


def _check_broker_dir(broker_dir: Path) -> bool:
    """Whether ``broker_dir`` (checked to be a broker-config folder) uses client certificates."""
    conf = broker_dir / "mosquitto.conf"
    text = read_broker_file(conf, "the broker configuration")
    if (
        not text.startswith(CONF_HEADER)
        or acl_federation(read_broker_file(broker_dir / "acl", "the broker's ACL")) is None
    ):
        raise ConfigError(
            f"{broker_dir} is not a folder that `fedbe-coordinator broker-config` wrote ({conf} or its acl is "
            "not fedbe's); point --broker-dir at the folder of the federation's broker"
        )
    certs = uses_client_certs(text)
    if certs and not any(line.split()[:1] == ["crlfile"] for line in text.splitlines()):
        raise ConfigError(
            f"{conf} has no crlfile line, so the broker would not check revocations (it was written before "
            "revocation existed); regenerate the folder with broker-config --client-certs, or add "
            f"'crlfile {broker_dir / CRL}' below its listener line"
        )
    if certs and not (broker_dir / CONFIG).is_file():
        raise ConfigError(
            f"{broker_dir / CONFIG} is missing: this CA keeps no record of the certificates it issued, so "
            "none can be revoked; regenerate the folder with broker-config --client-certs"
        )
    return certs


def revoke(broker_dir: Path, device: str) -> Revocation:
    """Revoke ``device``'s credentials in ``broker_dir`` (see the module docstring). Everything is checked
    before anything is changed."""
    check_name(device)
    if device == COORDINATOR_USER:
        raise ConfigError(
            f"{device!r} is the coordinator's own identity: revoking it would cut the coordinator off the "
            "broker; to replace the coordinator's credentials, regenerate the folder with broker-config"
        )
    broker_dir = broker_dir.resolve()
    certs = _check_broker_dir(broker_dir)
    serials: tuple[str, ...] = ()
    if certs:
        issued = read_index(broker_dir)
        serials = tuple(valid_serials(issued, device))
        if not serials:
            known = any(i.common_name == device for i in issued)
            raise ConfigError(
                f"{device!r} has no valid certificate of this CA"
                + (" (it is revoked already)" if known else f" (no certificate with CN={device} was issued)")
                + f"; the devices it knows are in {broker_dir / 'ca' / 'index.txt'}"
            )
        changed = revoke_certificates(broker_dir, serials)
    else:
        changed = broker_dir / "passwd"
        text, had = without_user(read_broker_file(changed, "the password file"), device)
        if not had:
            raise ConfigError(
                f"{device!r} has no password in {changed} (an unknown device, or revoked already); check the "
                "device id"
            )
        with changed.open("w", encoding="utf-8") as f:  # in place: its owner and mode stay the broker's
            f.write(text)
    removed = []
    for suffix in (".crt", ".key", ".password"):
        path = broker_dir / "credentials" / f"{device}{suffix}"
        if path.exists():
            path.unlink()
            removed.append(path)
    log.info("revoked %s (%s) in %s", device, "certificate" if certs else "password", broker_dir)
    return Revocation(device, certs, serials, tuple(removed), changed)
