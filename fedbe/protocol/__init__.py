"""The wire protocol: the only place in fedbe that touches bytes, msgpack, zlib, zstd or topic strings.

* :mod:`fedbe.protocol.frames` — the versioned binary frame (header + CRC32 + msgpack body),
  body compression with bounded decompression, field checks and tensor encoding.
* :mod:`fedbe.protocol.messages` — the message dataclasses, their exact schemas, ``encode``/``decode``.
* :mod:`fedbe.protocol.topics` — MQTT topic names.
"""

from fedbe.protocol.frames import (
    DEFAULT_MAX_MESSAGE_BYTES,
    HEADER,
    HEADER_SIZE,
    MAGIC,
    PROTOCOL_VERSION,
    SUPPORTED_VERSIONS,
    BodyCompression,
    Frame,
    pack_frame,
    unpack_frame,
    validate_blocks,
)
from fedbe.protocol.messages import (
    CLIENT_STATES,
    COORDINATOR_STATES,
    MESSAGE_CODECS,
    NOTICE_CODES,
    TASK_ERROR_CODES,
    AnnounceMessage,
    CoordinatorStatusMessage,
    EvalResultMessage,
    Message,
    MessageCodec,
    MessageType,
    NoticeMessage,
    StatusMessage,
    TaskErrorMessage,
    TaskMessage,
    UpdateMessage,
    check_labels,
    decode,
    encode,
)
from fedbe.protocol.topics import ClientTopic, Topics, check_name

__all__ = [
    "COORDINATOR_STATES",
    "CoordinatorStatusMessage",
    "CLIENT_STATES",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "HEADER",
    "HEADER_SIZE",
    "MAGIC",
    "MESSAGE_CODECS",
    "NOTICE_CODES",
    "PROTOCOL_VERSION",
    "SUPPORTED_VERSIONS",
    "TASK_ERROR_CODES",
    "AnnounceMessage",
    "BodyCompression",
    "ClientTopic",
    "EvalResultMessage",
    "Frame",
    "Message",
    "MessageCodec",
    "MessageType",
    "NoticeMessage",
    "StatusMessage",
    "TaskErrorMessage",
    "TaskMessage",
    "Topics",
    "UpdateMessage",
    "check_labels",
    "check_name",
    "decode",
    "encode",
    "pack_frame",
    "unpack_frame",
    "validate_blocks",
]
