"""A locked-down mosquitto configuration for one federation: TLS, one credential per client, ACLs.

``fedbe-coordinator broker-config --clients FILE --out DIR`` writes into DIR::

    mosquitto.conf          exactly one TLS listener (no plain port), no anonymous clients, a message
                            size limit, the files below
    acl                     who may publish and read which topic (derived from fedbe.protocol.topics)
    passwd                  hashed credentials (made by ``mosquitto_passwd -U``; password mode only)
    ca.crt, ca.key          a self-signed certificate authority (give ca.crt to every device; keep
                            ca.key: ``fedbe-coordinator enroll`` signs new devices' certificates with it)
    ca/, crl.pem            the CA's record of the client certificates it issued, and its revocation
                            list (``--client-certs`` mode)
    server.crt, server.key  the broker's certificate, signed by that CA, for the given host names
    credentials/ID.password the plain password of each client (and of the coordinator): hand each
                            device its own file, then delete the folder (password mode)
    credentials/ID.crt, ID.key  each client's (and the coordinator's) certificate, CN = its id, and
                            key (``--client-certs`` mode)
    data/                   mosquitto's persistence (sessions, queued tasks, retained statuses)

Two ways for a client to prove who it is. By default a user name and password (the listener still
uses TLS, but takes clients without a certificate). With ``--client-certs`` (mutual TLS), the
listener has ``require_certificate true`` and ``use_identity_as_username true``: the TLS handshake
fails without a certificate signed by the federation's CA, the certificate's CN is the user name
(so, with ``use_username_as_clientid``, also the client id), any user name or password sent in
CONNECT is ignored, and there is no password file. Client certificates are signed by ``openssl ca``,
which records each one in DIR/ca/ (see :mod:`coordinator.certificate_authority`), and the listener
reads the CA's revocation list, DIR/crl.pem (``crlfile``; empty at first). ``fedbe-coordinator revoke``
cuts a lost device off: its certificate goes on that list (mutual TLS) or its line leaves ``passwd``
(see :mod:`coordinator.revocation`).

The certificates are made with the ``openssl`` command line, exactly these commands (run from
DIR; ``SAN`` is ``IP:127.0.0.1,DNS:localhost`` plus the ``--host`` names)::

    openssl req -x509 -newkey rsa:2048 -nodes -sha256 -days DAYS -subj "/CN=fedbe CA FED" \\
        -keyout ca.key -out ca.crt
    openssl req -newkey rsa:2048 -nodes -sha256 -subj "/CN=HOST" -keyout server.key -out server.csr
    openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -sha256 -days DAYS \\
        -extfile server.ext -out server.crt        # server.ext: subjectAltName = SAN, serverAuth

The listener's own options (``use_username_as_clientid`` and the TLS files) follow its ``listener``
line: mosquitto 2.0 applies such an option written before the first ``listener`` line to its
*default* listener, which it then opens in plain MQTT on port 1883 of every address, and the TLS
listener goes without it.

Message size: the broker takes messages (MQTT payloads, i.e. fedbe frames) of at most
``max_message_bytes`` (``--max-message-mb``, default 128 MiB: a task or update carries the new
blocks' weights; a block of SmolLM2-135M is 13.5 MiB in fp32, of a 1B Llama-type model about 58 MiB
in int8). The generated config sets ``message_size_limit`` to that and ``max_packet_size`` to it
plus :data:`fedbe.transport.PUBLISH_HEADROOM`: a larger packet is refused before the broker reads
it, and MQTT v5 clients are told the packet size in CONNACK. :class:`fedbe.transport.Connection`
derives its own limit from that announcement, so the coordinator and every client refuse (with an
error that says so) a message the broker would drop, whatever their ``max_message_bytes``: the
coordinator's limit is derived from the broker's, not the other way round.

Authorization (``acl``), with ``use_username_as_clientid`` on the listener so that a client's MQTT
id is its user name and nobody can take over another client's session (nor the tasks queued for it
while it is offline):

* a client publishes only under ``fedbe/v1/FED/clients/<its name>/`` (announce, status, update,
  eval, error) and reads only its own ``task`` and ``notice`` and the coordinator's ``status``;
* the coordinator (user ``fedbe-coordinator``) reads every client's announce, status, update, eval
  and error, publishes tasks and notices, and is the only one that publishes the federation status.

Pure text generation (:func:`acl_text`, :func:`mosquitto_conf_text`, :func:`read_clients`) is
separate from the few subprocess calls (:func:`make_certificates`, :func:`hash_passwords`).
"""

from __future__ import annotations

import grp
import logging
import os
import pwd
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from coordinator.certificate_authority import (
    CRL,
    find_tool,
    init_database,
    issue_client_certificate,
    make_certificates,
    run_tool,
)
from fedbe.errors import ConfigError
from fedbe.protocol import Topics, check_name
from fedbe.protocol.topics import FROM_CLIENT, TO_CLIENT
from fedbe.transport import PUBLISH_HEADROOM

log = logging.getLogger(__name__)

COORDINATOR_USER = "fedbe-coordinator"
DEFAULT_PORT = 8883
LOOPBACK = "127.0.0.1"
MIB = 1024 * 1024
# the first line of every mosquitto.conf broker-config writes: how other commands recognise its folder
CONF_HEADER = "# fedbe broker (generated by fedbe-coordinator broker-config): TLS only, one user per client."
DEFAULT_MAX_MESSAGE_MB = 128
# mosquitto's ceiling for both limits is MQTT's largest packet body, 268,435,455 bytes
MAX_MESSAGE_MB = (268_435_455 - PUBLISH_HEADROOM) // MIB  # 255


@dataclass(frozen=True)
class BrokerFiles:
    """What :func:`generate` wrote."""

    out_dir: Path
    conf: Path
    acl: Path
    passwd: Path | None  # None with client certificates
    ca_cert: Path
    server_cert: Path
    server_key: Path
    credentials: dict[str, Path]  # user name -> file holding its plain password (password mode)
    host: str
    port: int
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_MB * MIB
    certificates: dict[str, tuple[Path, Path]] = field(default_factory=dict)  # user -> (cert, key)

    @property
    def client_certs(self) -> bool:
        """Whether clients prove who they are with a certificate (mutual TLS) instead of a password."""
        return self.passwd is None

    @property
    def url(self) -> str:
        return f"mqtts://{self.host}:{self.port}"


def read_clients(path: Path) -> list[str]:
    """Client ids from a text file: one per line; blank lines and ``#`` comments are ignored."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ConfigError(f"can not read the client list {path}: {exc}") from exc
    clients: list[str] = []
    for number, line in enumerate(lines, 1):
        name = line.split("#", 1)[0].strip()
        if not name:
            continue
        try:
            check_name(name)
        except ConfigError as exc:
            raise ConfigError(f"{path}:{number}: {exc}") from None
        if name == COORDINATOR_USER:
            raise ConfigError(f"{path}:{number}: {name!r} is reserved for the coordinator")
        if name in clients:
            raise ConfigError(f"{path}:{number}: client {name!r} is listed twice")
        clients.append(name)
    if not clients:
        raise ConfigError(f"{path} lists no client (one client id per line)")
    return clients


def acl_text(federation: str) -> str:
    """The mosquitto ACL file: patterns per client (``%u``), explicit grants for the coordinator."""
    topics = Topics(federation)
    own = "%u"  # the user name; with use_username_as_clientid it is also the client id
    lines = [
        f"# fedbe ACL for federation {federation!r} (generated by fedbe-coordinator broker-config)",
        "# Every client: publish only under its own name, read only its own task and notice",
        "# and the coordinator's status. Pattern lines apply to every user.",
    ]
    for kind in FROM_CLIENT:
        lines.append(f"pattern write {topics.root}/clients/{own}/{kind.value}")
    for kind in TO_CLIENT:
        lines.append(f"pattern read {topics.root}/clients/{own}/{kind.value}")
    lines.append(f"pattern read {topics.coordinator_status()}")
    lines += ["", "# The coordinator: reads what clients send, sends tasks and notices, owns the status.",
              f"user {COORDINATOR_USER}"]  # fmt: skip
    for kind in FROM_CLIENT:
        lines.append(f"topic read {topics.all_clients(kind)}")
    for kind in TO_CLIENT:
        lines.append(f"topic write {topics.all_clients(kind)}")
    lines.append(f"topic readwrite {topics.coordinator_status()}")
    return "\n".join(lines) + "\n"


def check_max_message_bytes(max_message_bytes: int) -> int:
    """``max_message_bytes`` if mosquitto can enforce it (1 MiB to 255 MiB), else :class:`ConfigError`."""
    if not MIB <= max_message_bytes <= MAX_MESSAGE_MB * MIB:
        raise ConfigError(
            f"the broker's message limit must be 1 to {MAX_MESSAGE_MB} MiB, got {max_message_bytes / MIB:g} MiB "
            "(--max-message-mb)"
        )
    return max_message_bytes


def mosquitto_conf_text(
    out_dir: Path,
    host: str,
    port: int,
    broker_user: str | None = None,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_MB * MIB,
    client_certs: bool = False,
) -> str:
    """mosquitto.conf for exactly one TLS listener on ``host:port`` using the files in ``out_dir``; with
    ``client_certs``, clients must present a certificate of the CA, whose CN is their user name."""
    check_max_message_bytes(max_message_bytes)
    lines = [
        CONF_HEADER,
        "per_listener_settings false",
        "allow_anonymous false",
        *([] if client_certs else [f"password_file {out_dir / 'passwd'}"]),
        f"acl_file {out_dir / 'acl'}",
        "persistence true",
        f"persistence_location {out_dir / 'data'}/",
        "max_queued_messages 10000",
        "# message_size_limit: the largest message (payload) taken, whatever its topic. max_packet_size: the",
        "# same plus room for topic and header; a larger packet is refused before it is read, and MQTT v5",
        "# clients learn it at connect (fedbe's then refuse larger messages). Both, not max_packet_size",
        "# alone as mosquitto's start-up note suggests: alone, the message limit would depend on the topic.",
        f"message_size_limit {max_message_bytes}",
        f"max_packet_size {max_message_bytes + PUBLISH_HEADROOM}",
        "log_dest stderr",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "",
        "# Listener options go below their listener line: above the first one, mosquitto applies them",
        "# to a default listener that it opens in plain MQTT on port 1883 of every address.",
        f"listener {port} {host}",
        "use_username_as_clientid true",
        f"cafile {out_dir / 'ca.crt'}",
        f"certfile {out_dir / 'server.crt'}",
        f"keyfile {out_dir / 'server.key'}",
        "tls_version tlsv1.2",
    ]
    if client_certs:
        lines += [
            "# Mutual TLS: no certificate of our CA, no connection; its CN is the user name (and so the",
            "# client id), whatever user name or password the client sends.",
            "require_certificate true",
            "use_identity_as_username true",
            "# Certificates revoked by `fedbe-coordinator revoke`. Restart after a revocation: a reload",
            "# re-reads this list for new connections but keeps the revoked device's open one.",
            f"crlfile {out_dir / CRL}",
        ]
    else:
        lines.append("require_certificate false")
    if broker_user:
        lines.insert(1, f"user {broker_user}")
    return "\n".join(lines) + "\n"


def hash_passwords(passwd: Path, credentials: dict[str, str]) -> None:
    """Write ``user:password`` lines and hash them in place with ``mosquitto_passwd -U``."""
    tool = find_tool("mosquitto_passwd", "mosquitto")
    passwd.write_text("".join(f"{user}:{password}\n" for user, password in credentials.items()))
    os.chmod(passwd, 0o600)
    run_tool([tool, "-U", str(passwd)], passwd.parent, "hashing the password file")


def _broker_group(broker_user: str) -> int | None:
    """The group id mosquitto will run as, when we are root (it drops to that user); else None."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(broker_user).pw_gid
    except KeyError:
        try:
            return grp.getgrnam("nogroup").gr_gid
        except KeyError:
            return None


def generate(
    clients: Sequence[str],
    out_dir: Path,
    *,
    federation: str = "default",
    host: str = LOOPBACK,
    port: int = DEFAULT_PORT,
    extra_hosts: Sequence[str] = (),
    days: int = 825,
    broker_user: str = "mosquitto",
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_MB * MIB,
    force: bool = False,
    client_certs: bool = False,
) -> BrokerFiles:
    """Write the whole configuration for ``clients`` into ``out_dir`` (see the module docstring): one
    password per client, or with ``client_certs`` one certificate per client (mutual TLS)."""
    check_name(federation, "federation name")
    check_max_message_bytes(max_message_bytes)
    for c in clients:
        check_name(c)
    if len(set(clients)) != len(clients) or COORDINATOR_USER in clients:
        raise ConfigError(f"client ids must be distinct and not {COORDINATOR_USER!r}")
    if not 0 < port < 65536:
        raise ConfigError(f"port must be 1-65535, got {port}")
    out_dir = out_dir.resolve()
    if out_dir.exists() and any(out_dir.iterdir()) and not force:
        raise ConfigError(
            f"{out_dir} is not empty: a second run would replace the CA and every password; "
            "choose a new folder or pass --force"
        )
    (out_dir / "credentials").mkdir(parents=True, exist_ok=True)
    (out_dir / "data").mkdir(exist_ok=True)
    make_certificates(out_dir, federation, [host, *extra_hosts], days)
    users = [COORDINATOR_USER, *clients]
    credentials: dict[str, Path] = {}
    certificates: dict[str, tuple[Path, Path]] = {}
    if client_certs:
        init_database(out_dir)
        for user in users:
            pair = out_dir / "credentials" / f"{user}.crt", out_dir / "credentials" / f"{user}.key"
            issue_client_certificate(out_dir, user, *pair, days=days)
            certificates[user] = pair
    else:
        passwords = {user: secrets.token_urlsafe(24) for user in users}
        hash_passwords(out_dir / "passwd", passwords)
        for user, password in passwords.items():
            path = out_dir / "credentials" / f"{user}.password"
            path.write_text(password + "\n")
            os.chmod(path, 0o600)
            credentials[user] = path
    (out_dir / "acl").write_text(acl_text(federation))
    conf = out_dir / "mosquitto.conf"
    conf.write_text(
        mosquitto_conf_text(
            out_dir, host, port, max_message_bytes=max_message_bytes, client_certs=client_certs
        )
    )
    # The broker must read its key, passwords and ACL, and write its persistence folder; nobody
    # else may. Run as root, mosquitto drops to ``broker_user``: give that user's group read access.
    gid = _broker_group(broker_user)
    os.chmod(out_dir / "ca.key", 0o600)
    for name in ("server.key", "acl", "mosquitto.conf", *([] if client_certs else ["passwd"])):
        os.chmod(out_dir / name, 0o640)
        if gid is not None:
            os.chown(out_dir / name, 0, gid)
    os.chmod(out_dir, 0o750)
    os.chmod(out_dir / "credentials", 0o700)
    os.chmod(out_dir / "data", 0o770)
    if gid is not None:
        os.chown(out_dir, 0, gid)
        os.chown(out_dir / "data", 0, gid)
    log.info("wrote a TLS broker configuration for %d clients (%s) to %s", len(clients),
             "client certificates" if client_certs else "passwords", out_dir)  # fmt: skip
    return BrokerFiles(
        out_dir=out_dir, conf=conf, acl=out_dir / "acl", passwd=None if client_certs else out_dir / "passwd",
        ca_cert=out_dir / "ca.crt", server_cert=out_dir / "server.crt", server_key=out_dir / "server.key",
        credentials=credentials, host=host, port=port, max_message_bytes=max_message_bytes,
        certificates=certificates,
    )  # fmt: skip
