"""The federation's certificate authority: its certificates, the record of what it issued, and its CRL.

Everything is done with the ``openssl`` command line. ``broker-config`` makes the CA and the broker's
certificate with ``openssl req`` and ``openssl x509`` (commands in :func:`make_certificates`). Client
certificates are signed with ``openssl ca``, which records each one (serial number, CN, expiry) in a
database that lives in ``DIR/ca/`` and keeps a copy of it in ``DIR/ca/issued/SERIAL.pem``::

    ca/openssl.cnf   the CA's settings (:func:`ca_config_text`; paths are relative to DIR)
    ca/index.txt     one line per issued certificate: V (valid) or R (revoked), expiry, serial, /CN=ID
    ca/issued/       a copy of every issued certificate (``openssl ca -revoke`` reads it)
    crl.pem          the certificate revocation list, signed by the CA (read by mosquitto's ``crlfile``)

so that a lost device is revoked with (run from DIR)::

    openssl ca -config ca/openssl.cnf -revoke ca/issued/SERIAL.pem
    openssl ca -config ca/openssl.cnf -gencrl -crldays 36500 -out crl.pem

``crl.pem`` exists from the start, empty: mosquitto refuses to start when its ``crlfile`` is missing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fedbe.errors import ConfigError, FedbeError
from fedbe.protocol import check_name

DATABASE = "ca"  # the folder of the CA's database, in the broker folder
CONFIG = f"{DATABASE}/openssl.cnf"
INDEX = f"{DATABASE}/index.txt"
ISSUED = f"{DATABASE}/issued"
CRL = "crl.pem"
# The CRL is rewritten at every revocation, but nothing renews it in between, and OpenSSL refuses every
# client certificate once a CRL's next-update time has passed ("CRL has expired"): make it outlive the CA.
CRL_DAYS = 36500


class BrokerConfigError(FedbeError):
    """The broker configuration could not be generated."""


def run_tool(args: Sequence[str], cwd: Path, what: str) -> None:
    try:
        done = subprocess.run(list(args), cwd=cwd, capture_output=True, text=True, timeout=120, check=False)
    except OSError as exc:
        raise BrokerConfigError(f"{what}: can not run {args[0]}: {exc}") from exc
    if done.returncode != 0:
        raise BrokerConfigError(f"{what} failed ({' '.join(args[:3])} ...): {done.stderr.strip()[-800:]}")


def find_tool(name: str, package: str) -> str:
    found = shutil.which(name) or next(
        (p for p in (f"/usr/bin/{name}", f"/usr/sbin/{name}") if os.access(p, os.X_OK)), None
    )
    if found is None:
        raise BrokerConfigError(f"{name} is not installed: apt-get install {package}")
    return found


def make_certificates(out_dir: Path, federation: str, hosts: Sequence[str], days: int = 825) -> None:
    """A self-signed CA and a server certificate for ``hosts`` (plus 127.0.0.1 and localhost)."""
    openssl = find_tool("openssl", "openssl")
    names = ["IP:127.0.0.1", "DNS:localhost"]
    for h in hosts:
        entry = f"IP:{h}" if h.replace(".", "").isdigit() or ":" in h else f"DNS:{h}"
        if entry not in names:
            names.append(entry)
    (out_dir / "server.ext").write_text(
        f"subjectAltName = {','.join(names)}\nextendedKeyUsage = serverAuth\nbasicConstraints = CA:FALSE\n"
    )
    cn = hosts[0] if hosts else "localhost"
    run_tool([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256", "-days", str(days),
          "-subj", f"/CN=fedbe CA {federation}", "-keyout", "ca.key", "-out", "ca.crt"], out_dir, "the CA")  # fmt: skip
    run_tool([openssl, "req", "-newkey", "rsa:2048", "-nodes", "-sha256", "-subj", f"/CN={cn}",
          "-keyout", "server.key", "-out", "server.csr"], out_dir, "the server key")  # fmt: skip
    run_tool([openssl, "x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
          "-sha256", "-days", str(days), "-extfile", "server.ext", "-out", "server.crt"], out_dir,
         "signing the server certificate")  # fmt: skip
    for leftover in ("server.csr", "server.ext", "ca.srl"):
        (out_dir / leftover).unlink(missing_ok=True)


def ca_config_text() -> str:
    """The ``openssl ca`` settings of a broker folder. ``unique_subject = no``: a device enrolled again
    (``enroll --force``) gets a new certificate with the same CN while the old one is still recorded."""
    return f"""# fedbe's certificate authority (written by fedbe-coordinator broker-config); run openssl from the
# broker folder: openssl ca -config {CONFIG} ...
[ ca ]
default_ca = fedbe_ca

[ fedbe_ca ]
database = {INDEX}
new_certs_dir = {ISSUED}
certificate = ca.crt
private_key = ca.key
serial = {DATABASE}/serial
crlnumber = {DATABASE}/crlnumber
default_md = sha256
policy = fedbe_policy
unique_subject = no
email_in_dn = no
copy_extensions = none

[ fedbe_policy ]
commonName = supplied

[ client_cert ]
extendedKeyUsage = clientAuth
keyUsage = digitalSignature, keyEncipherment
basicConstraints = CA:FALSE
"""


def init_database(ca_dir: Path) -> None:
    """Start the CA's database in ``ca_dir`` (nothing issued yet) and write its empty CRL."""
    db = ca_dir / DATABASE
    (ca_dir / ISSUED).mkdir(parents=True, exist_ok=True)
    os.chmod(db, 0o700)
    (ca_dir / CONFIG).write_text(ca_config_text())
    (ca_dir / INDEX).write_text("")
    (db / "index.txt.attr").write_text("unique_subject = no\n")
    (db / "crlnumber").write_text("1000\n")
    write_crl(ca_dir)


def write_crl(ca_dir: Path) -> Path:
    """(Re)write ``ca_dir``/crl.pem from the database: every revoked certificate, signed by the CA."""
    openssl = find_tool("openssl", "openssl")
    new = ca_dir / f".{CRL}.new"
    run_tool([openssl, "ca", "-config", CONFIG, "-gencrl", "-crldays", str(CRL_DAYS), "-out", str(new)], ca_dir,
             "writing the certificate revocation list")  # fmt: skip
    os.chmod(new, 0o644)  # mosquitto reads it after dropping root; it holds nothing secret
    os.replace(new, ca_dir / CRL)  # whole or not at all: a broker reloading now reads one or the other
    return ca_dir / CRL


def issue_client_certificate(ca_dir: Path, name: str, cert: Path, key: Path, days: int = 825) -> str:
    """Write ``cert`` and ``key`` (mode 0600): a client certificate whose CN is ``name`` (the user name the
    broker gives it under ``use_identity_as_username``), signed by ``ca_dir``'s ca.crt and ca.key and
    recorded in its database. Returns its serial number (hex, random)."""
    check_name(name, "certificate name")
    for needed in (ca_dir / "ca.crt", ca_dir / "ca.key"):
        if not needed.is_file():
            raise ConfigError(
                f"{needed} is missing: point at the folder `fedbe-coordinator broker-config` wrote"
            )
    if not (ca_dir / CONFIG).is_file():  # a folder made before the CA kept a database
        init_database(ca_dir)
    openssl = find_tool("openssl", "openssl")
    key.parent.mkdir(parents=True, exist_ok=True)
    key.unlink(missing_ok=True)
    os.close(os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))  # openssl keeps the mode it finds
    before = {e.serial for e in read_index(ca_dir)}
    with tempfile.TemporaryDirectory(prefix=".fedbe-cert-", dir=key.parent) as tmp:
        csr = Path(tmp) / "client.csr"
        run_tool([openssl, "req", "-newkey", "rsa:2048", "-nodes", "-sha256", "-subj", f"/CN={name}",
                  "-keyout", str(key), "-out", str(csr)], ca_dir, f"the key of {name}")  # fmt: skip
        run_tool([openssl, "ca", "-config", CONFIG, "-batch", "-notext", "-rand_serial", "-days", str(days),
                  "-extensions", "client_cert", "-in", str(csr), "-out", str(cert)], ca_dir,
                 f"signing the certificate of {name}")  # fmt: skip
    os.chmod(cert, 0o600)
    (serial,) = {e.serial for e in read_index(ca_dir)} - before
    return serial


@dataclass(frozen=True)
class Issued:
    """One line of the CA's index: a certificate it issued."""

    serial: str  # hex, as openssl writes it
    subject: str  # e.g. /CN=dev1
    revoked: bool

    @property
    def common_name(self) -> str | None:
        return self.subject[len("/CN=") :] if self.subject.startswith("/CN=") else None


def parse_index(text: str) -> list[Issued]:
    """The certificates in an ``openssl ca`` index (tab-separated: status, expiry, revocation, serial,
    file, subject). Expired (E) entries count as not revoked: the broker refuses them anyway."""
    issued = []
    for line in text.splitlines():
        fields = line.split("\t")
        if len(fields) == 6 and fields[0] in ("V", "R", "E"):
            issued.append(Issued(serial=fields[3], subject=fields[5], revoked=fields[0] == "R"))
    return issued


def read_index(ca_dir: Path) -> list[Issued]:
    path = ca_dir / INDEX
    try:
        return parse_index(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise ConfigError(f"can not read the CA's index {path}: {exc}") from exc


def revoke_certificates(ca_dir: Path, serials: Sequence[str]) -> Path:
    """Mark ``serials`` revoked in the database and rewrite the CRL; returns its path."""
    openssl = find_tool("openssl", "openssl")
    for serial in serials:
        copy = ca_dir / ISSUED / f"{serial}.pem"
        if not copy.is_file():
            raise ConfigError(
                f"{copy} is missing: the CA's copy of certificate {serial} is needed to revoke it"
            )
        run_tool(
            [openssl, "ca", "-config", CONFIG, "-revoke", str(copy)], ca_dir, f"revoking certificate {serial}"
        )
    return write_crl(ca_dir)
