"""MQTT topic names: the only place in fedbe that builds or parses a topic string.

Layout (``<fed>`` is the federation name, ``<id>`` a client id)::

    fedbe/v1/<fed>/coordinator/status      coordinator -> all      retained: the coordinator's state
    fedbe/v1/<fed>/clients/<id>/announce   client -> coordinator   profile, label histogram, fingerprint
    fedbe/v1/<fed>/clients/<id>/status     client -> coordinator   retained; the last will says offline
    fedbe/v1/<fed>/clients/<id>/task       coordinator -> client   a round's work (QoS 1, persistent session)
    fedbe/v1/<fed>/clients/<id>/update     client -> coordinator   the compact update
    fedbe/v1/<fed>/clients/<id>/eval       client -> coordinator   federated evaluation result
    fedbe/v1/<fed>/clients/<id>/error      client -> coordinator   a refused or failed task, with the reason
    fedbe/v1/<fed>/clients/<id>/notice     coordinator -> client   e.g. "refused: your base model differs"

Every client topic has the client id as its own level, so broker ACLs can use ``%c``/``%u``
patterns: a client publishes only under its own id and reads only its own task and notice.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

from fedbe.errors import ConfigError

PREFIX = "fedbe/v1"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class ClientTopic(str, Enum):
    ANNOUNCE = "announce"
    STATUS = "status"
    TASK = "task"
    UPDATE = "update"
    EVAL = "eval"
    ERROR = "error"
    NOTICE = "notice"


FROM_CLIENT = (
    ClientTopic.ANNOUNCE,
    ClientTopic.STATUS,
    ClientTopic.UPDATE,
    ClientTopic.EVAL,
    ClientTopic.ERROR,
)
TO_CLIENT = (ClientTopic.TASK, ClientTopic.NOTICE)


def check_name(value: str, what: str = "client id") -> str:
    """A client id or federation name: 1-64 of letters, digits, '_', '.', '-' (no MQTT wildcards)."""
    if not isinstance(value, str) or not _NAME.match(value):
        raise ConfigError(
            f"invalid {what} {value!r}: use 1-64 letters, digits, '_', '.' or '-', starting with a letter or digit"
        )
    return value


@dataclass(frozen=True)
class Topics:
    federation: str = "default"

    def __post_init__(self) -> None:
        check_name(self.federation, "federation name")

    @property
    def root(self) -> str:
        return f"{PREFIX}/{self.federation}"

    def client(self, client_id: str, kind: ClientTopic) -> str:
        return f"{self.root}/clients/{check_name(client_id)}/{kind.value}"

    def all_clients(self, kind: ClientTopic) -> str:
        """Subscription filter for one kind of topic of every client."""
        return f"{self.root}/clients/+/{kind.value}"

    def coordinator_status(self) -> str:
        return f"{self.root}/coordinator/status"

    def parse_client_topic(self, topic: str) -> tuple[str, ClientTopic] | None:
        """``(client id, kind)`` for a client topic of this federation, else None (never a guess)."""
        parts = topic.split("/")
        root = self.root.split("/")
        if len(parts) != len(root) + 3 or parts[: len(root)] != root or parts[len(root)] != "clients":
            return None
        client_id, kind = parts[len(root) + 1], parts[len(root) + 2]
        if not _NAME.match(client_id):
            return None
        try:
            return client_id, ClientTopic(kind)
        except ValueError:
            return None
