"""Enrolment: the one folder a new device needs to join a federation.

``fedbe-coordinator enroll --broker-dir DIR --device ID --broker-url mqtts://HOST:8883 --out BUNDLE``
reads the broker folder that ``fedbe-coordinator broker-config`` wrote and writes into BUNDLE::

    ca.crt                 the federation's CA (the device verifies the broker with it)
    device.crt, device.key the device's certificate (CN = ID) and key, signed by DIR's CA
                           (a broker made with --client-certs)
    password               or: a fresh password, whose hash is added to DIR/passwd (password mode;
                           the broker reads it after a reload: SIGHUP, ``systemctl reload mosquitto``)
    edge.yaml              the settings of ``fedbe-edge run --config BUNDLE/edge.yaml``: broker URL,
                           client id, federation, TLS files, credentials (paths relative to BUNDLE),
                           and ``data``, ``model``, ``profile`` where given

The folder is mode 0700 and every file 0600: copy it to the device as it is (``scp -rp``), or pass
its files to the agent with systemd's ``LoadCredential=`` (``deploy/fedbe-edge.service``). The mode
(certificate or password) is the broker's: ``use_identity_as_username true`` in DIR/mosquitto.conf
means certificates. The federation is the one DIR's ACL serves; ``--federation`` must match it.

An existing bundle, or an existing password of the device in DIR/passwd, is kept unless ``--force``
(then the device's old password stops working at the broker's next reload). A device has one valid
certificate: the one in its newest bundle. Issuing it revokes the device's earlier ones (the one
broker-config put in DIR/credentials, or an earlier bundle's), effective for new connections after a
broker reload and for an open connection after a restart (:mod:`coordinator.revocation`).
"""

from __future__ import annotations

import logging
import os
import secrets
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from coordinator.broker_config import COORDINATOR_USER, hash_passwords
from coordinator.certificate_authority import issue_client_certificate, read_index, revoke_certificates
from fedbe.errors import ConfigError
from fedbe.protocol import Topics, check_name
from fedbe.transport import BrokerConfig

log = logging.getLogger(__name__)

EDGE_CONFIG = "edge.yaml"
CERT, KEY, PASSWORD, CA = "device.crt", "device.key", "password", "ca.crt"


@dataclass(frozen=True)
class Bundle:
    """What :func:`enroll` wrote."""

    out_dir: Path
    device: str
    federation: str
    broker_url: str
    client_certs: bool
    edge_config: Path
    files: tuple[Path, ...]
    # mutual TLS: the device's earlier certificates, revoked when this one was issued (one valid
    # certificate per device)
    superseded: tuple[str, ...] = ()


def uses_client_certs(conf_text: str) -> bool:
    """Whether a mosquitto.conf takes clients by certificate (``use_identity_as_username true``)."""
    return any(
        line.split("#", 1)[0].split() == ["use_identity_as_username", "true"]
        for line in conf_text.splitlines()
    )


def acl_federation(acl: str) -> str | None:
    """The federation an ACL of :func:`coordinator.broker_config.acl_text` serves (None if none is found)."""
    for line in acl.splitlines():
        words = line.split()
        if words[:2] == ["pattern", "read"] and len(words) == 3 and words[2].count("/") >= 2:
            name = words[2].split("/")[2]
            try:
                if Topics(check_name(name, "federation name")).coordinator_status() == words[2]:
                    return name
            except ConfigError:
                continue
    return None


def edge_config_text(settings: dict[str, object], device: str) -> str:
    """The edge.yaml of a bundle: a comment that says how to use it, then the settings."""
    head = (
        f"# fedbe-edge settings of device {device!r} (written by fedbe-coordinator enroll).\n"
        "# Run: fedbe-edge run --config edge.yaml [--data FILE] [--model DIR] [--profile NAME]\n"
        "# Keys are the flags of fedbe-edge run; relative paths are from this file's folder.\n"
    )
    return head + yaml.safe_dump(settings, sort_keys=False)


def read_broker_file(path: Path, what: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(
            f"can not read {what} {path}: {exc}; --broker-dir must be the folder `fedbe-coordinator "
            "broker-config` wrote"
        ) from exc


def set_password(passwd: Path, device: str, password: str, *, replace: bool) -> None:
    """Add ``device`` with ``password`` (hashed by ``mosquitto_passwd``) to ``passwd``, in place (so its
    owner and mode stay what the broker needs). An existing entry is an error unless ``replace``."""
    lines = read_broker_file(passwd, "the password file").splitlines()
    others = [line for line in lines if line.split(":", 1)[0] != device]
    if len(others) != len(lines) and not replace:
        raise ConfigError(
            f"{device!r} already has a password in {passwd}; pass --force to give it a new one (the old one "
            "stops working when the broker reloads)"
        )
    # The plain password goes through a private file, never a command line (ps shows those).
    with tempfile.TemporaryDirectory(prefix=".fedbe-enroll-", dir=passwd.parent) as tmp:
        single = Path(tmp) / "passwd"
        hash_passwords(single, {device: password})
        hashed = single.read_text(encoding="utf-8").strip()
    with passwd.open("w", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in [*others, hashed]))


def _write(path: Path, text: str) -> Path:
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    return path


def _prepare(out_dir: Path, force: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out {out_dir} is a file; name a new folder for the bundle")
    if out_dir.exists() and any(out_dir.iterdir()):
        if not force:
            raise ConfigError(
                f"{out_dir} already holds a bundle (or other files); choose a new folder, or pass --force to "
                "replace its credentials"
            )
        for name in (CERT, KEY, PASSWORD, CA, EDGE_CONFIG):
            (out_dir / name).unlink(missing_ok=True)
    out_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(out_dir, 0o700)


def enroll(
    broker_dir: Path,
    device: str,
    broker_url: str,
    out_dir: Path,
    *,
    federation: str | None = None,
    data: Path | None = None,
    model: str | None = None,
    profile: str | None = None,
    days: int = 825,
    force: bool = False,
) -> Bundle:
    """Write the bundle of ``device`` into ``out_dir`` (see the module docstring). Everything is checked
    before anything is written."""
    check_name(device)
    if device == COORDINATOR_USER:
        raise ConfigError(f"{device!r} is the coordinator's user name; choose another device id")
    BrokerConfig(broker_url, device, require_tls=True).endpoint()  # mqtts://HOST:PORT, or a clear error
    broker_dir = broker_dir.resolve()
    certs = uses_client_certs(read_broker_file(broker_dir / "mosquitto.conf", "the broker configuration"))
    served = acl_federation(read_broker_file(broker_dir / "acl", "the broker's ACL"))
    if served is None:
        raise ConfigError(f"{broker_dir / 'acl'} names no federation; regenerate it with broker-config")
    if federation is not None and federation != served:
        raise ConfigError(f"the broker in {broker_dir} serves federation {served!r}, not {federation!r}")
    if not (broker_dir / CA).is_file():
        raise ConfigError(
            f"{broker_dir / CA} is missing; --broker-dir must be the folder broker-config wrote"
        )
    if not certs and not (broker_dir / "passwd").is_file():
        raise ConfigError(
            f"{broker_dir / 'passwd'} is missing; --broker-dir must be the folder broker-config wrote"
        )
    out_dir = out_dir.resolve()
    _prepare(out_dir, force)
    settings: dict[str, object] = {
        "broker": broker_url, "client_id": device, "federation": served, "tls_ca": CA, "require_tls": True,
    }  # fmt: skip
    _write(out_dir / CA, read_broker_file(broker_dir / CA, "the CA certificate"))
    superseded: tuple[str, ...] = ()
    if certs:
        earlier = [i.serial for i in read_index(broker_dir) if i.common_name == device and not i.revoked]
        issue_client_certificate(broker_dir, device, out_dir / CERT, out_dir / KEY, days=days)
        if earlier:  # a device has one valid certificate: the one in its newest bundle
            revoke_certificates(broker_dir, earlier)
            superseded = tuple(earlier)
            for suffix in (".crt", ".key"):
                (broker_dir / "credentials" / f"{device}{suffix}").unlink(missing_ok=True)
        settings |= {"tls_cert": CERT, "tls_key": KEY}
    else:
        password = secrets.token_urlsafe(24)
        set_password(broker_dir / "passwd", device, password, replace=force)
        _write(out_dir / PASSWORD, password + "\n")
        settings |= {"username": device, "password_file": PASSWORD}
    extra = {"data": None if data is None else str(data), "model": model, "profile": profile}
    settings |= {key: value for key, value in extra.items() if value is not None}
    edge = _write(out_dir / EDGE_CONFIG, edge_config_text(settings, device))
    files = tuple(sorted(p for p in out_dir.iterdir() if p.is_file()))
    for path in files:
        os.chmod(path, 0o600)
    log.info("enrolled %s (%s) into %s", device, "certificate" if certs else "password", out_dir)
    return Bundle(out_dir, device, served, broker_url, certs, edge, files, superseded)
