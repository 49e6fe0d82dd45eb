"""Message dataclasses, their msgpack schemas, and ``encode`` / ``decode`` of whole messages.

Each message type is a frozen dataclass and a :class:`MessageType` member. Every field declares
its wire kind once, in its metadata (``field(metadata=_COUNT)``, ``field(metadata=_choice(NOTICE_CODES))``):
the payload is the map of the fields, each written and checked by its kind, so the schema, the
encoder and the decoder are one declaration and can not disagree. :data:`MESSAGE_CODECS` holds the
codec derived for each type byte; ``encode`` and ``decode`` dispatch through that table only.
Frame layout, tensors and field checks live in :mod:`fedbe.protocol.frames`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field, fields
from enum import IntEnum
from functools import partial
from operator import attrgetter
from typing import Any, Generic, TypeVar, overload

import msgpack

from fedbe.compression import BlockLayout, CompressedState, Level
from fedbe.errors import CodecError
from fedbe.protocol.frames import (
    DEFAULT_MAX_MESSAGE_BYTES,
    PROTOCOL_VERSION,
    BodyCompression,
    _as_count,
    _as_level,
    _as_real,
    _as_text,
    _decode_blocks,
    _encode_blocks,
    _Fields,
    _kind,
    _tensor_bytes,
    _unpack_body,
    pack_frame,
    unpack_frame,
    validate_blocks,
)
from fedbe.recipe import Recipe, RecipeError

logger = logging.getLogger(__name__)

MAX_LABELS = 1024


class MessageType(IntEnum):
    """The type byte of a frame."""

    UPDATE = 1
    ANNOUNCE = 2
    STATUS = 3
    TASK = 4
    TASK_ERROR = 5
    NOTICE = 6
    EVAL_RESULT = 7
    COORDINATOR_STATUS = 8


# ---------------------------------------------------------------------------------------------
# Wire kinds: each message field declares one in its metadata (``field(metadata=_COUNT)``)


@dataclass(frozen=True)
class _Wire:
    """How one field travels: ``encode(value, name, message)`` checks and writes it, ``decode(raw,
    name, where, fields read so far)`` checks and reads it; blocks name the field of their level."""

    encode: Callable[[Any, str, Any], object]
    decode: Callable[[Any, str, str, Mapping[str, Any]], Any]
    level_field: str | None = None


def _wire(check: Callable[[Any, str], Any], *, qualified: bool = False, sequence: bool = False
          ) -> dict[str, _Wire]:  # fmt: skip
    """The metadata of a field that ``check(value, what)`` checks both ways. ``qualified``: a decode
    error names the message too (``update field 'round'``), as it always has for numbers and ids;
    ``sequence``: a tuple in Python, a list on the wire."""

    def encode(value: Any, name: str, msg: object) -> object:
        return list(check(list(value), name)) if sequence else check(value, name)

    def decode(raw: object, name: str, where: str, earlier: Mapping[str, Any]) -> Any:
        return check(raw, f"{where} field {name!r}" if qualified else name)

    return {"wire": _Wire(encode, decode)}


def _fraction(value: object, what: str) -> float:
    number = _as_real(value, what, 0.0)
    if number > 1.0:
        raise CodecError(f"{what} must be in [0, 1], got {number}")
    return number


def _free_text(value: object, what: str, limit: int = 4096) -> str:
    """Human-readable text (may be empty), bounded."""
    if not isinstance(value, str):
        raise CodecError(f"{what} must be a string, got {_kind(value)}")
    if len(value) > limit:
        raise CodecError(f"{what} is longer than {limit} characters")
    return value


def _flag(value: object, what: str) -> bool:
    if not isinstance(value, bool):
        raise CodecError(f"{what} must be true or false, got {_kind(value)}")
    return value


def _histogram(value: object, what: str) -> dict[str, float]:
    if not isinstance(value, dict):
        raise CodecError(f"{what} must be a map of label to count, got {_kind(value)}")
    if len(value) > MAX_LABELS:
        raise CodecError(f"{what} has {len(value)} labels; at most {MAX_LABELS}")
    return {
        _as_text(k, f"{what} label"): _as_real(v, f"{what} count of {k!r}", 0.0) for k, v in value.items()
    }


def _block_ids(value: object, what: str) -> tuple[int, ...]:
    if not isinstance(value, list | tuple):
        raise CodecError(f"{what} must be a list, got {_kind(value)}")
    ids = tuple(_as_count(b, "block id", 1 << 20) for b in value)
    if len(set(ids)) != len(ids):
        raise CodecError(f"{what} {list(ids)} repeats a block")
    return ids


def _layer_indices(value: object, what: str) -> tuple[int, ...]:
    if not isinstance(value, list | tuple) or len(value) > 4096:
        raise CodecError(f"{what} must be a list of at most 4096 layer indices")
    return tuple(_as_count(v, what, 1 << 20) for v in value)


def check_labels(value: object, what: str = "balance_labels") -> tuple[str, ...]:
    """A task's ``balance_labels``: distinct label names (1 to MAX_TEXT_BYTES bytes), at most
    :data:`MAX_LABELS`; :class:`CodecError` saying what is wrong otherwise (also what the coordinator
    checks its configured ``labels`` with, ``what`` naming it, so a list it accepts always
    encodes)."""
    if not isinstance(value, list):
        raise CodecError(f"{what} must be a list of label names, got {_kind(value)}")
    if len(value) > MAX_LABELS:
        raise CodecError(f"{what} has {len(value)} labels; at most {MAX_LABELS}")
    labels = tuple(_as_text(v, f"{what} label") for v in value)
    if len(set(labels)) != len(labels):
        raise CodecError(f"{what} repeats a label: {sorted(labels)}")
    return labels


def _level_to_wire(value: object, name: str, msg: object) -> str:
    if not isinstance(value, Level):
        raise CodecError(f"{name} must be a Level, got {value!r}")
    return value.value


def _recipe_to_wire(value: object, name: str, msg: object) -> object:
    if not isinstance(value, Recipe):
        raise CodecError(f"{name} must be a Recipe, got {_kind(value)}")
    return value.to_payload()


def _recipe_from_wire(raw: object, name: str, where: str, earlier: Mapping[str, Any]) -> Recipe:
    """The nested, versioned recipe map; the recipe checks its own fields."""
    if not isinstance(raw, dict):
        raise CodecError(f"{where} {name} must be a map of its fields, got {_kind(raw)}")
    try:
        return Recipe.from_mapping({str(k): v for k, v in raw.items()}, versioned=True)
    except RecipeError as exc:
        raise CodecError(f"{where} {name}: {exc}") from None


def _choice(choices: tuple[str, ...]) -> dict[str, _Wire]:
    def one_of(value: object, what: str) -> str:
        text = _as_text(value, what)
        if text not in choices:
            raise CodecError(f"{what} must be one of {', '.join(choices)}, got {text!r}")
        return text

    return _wire(one_of)


def _blocks(level_field: str) -> dict[str, _Wire]:
    """Compressed blocks, at the level held by the (earlier) field ``level_field``."""
    return {"wire": _Wire(lambda value, _, msg: _encode_blocks(value, getattr(msg, level_field)),
                          lambda raw, _, __, earlier: _decode_blocks(raw, earlier[level_field]),
                          level_field)}  # fmt: skip


_COUNT = _wire(_as_count, qualified=True)
_TEXT = _wire(_as_text, qualified=True)
_REAL = _wire(_as_real, qualified=True)
_NON_NEGATIVE = _wire(partial(_as_real, minimum=0.0), qualified=True)
_FRACTION = _wire(_fraction, qualified=True)
_FREE_TEXT = _wire(_free_text)
_FLAG = _wire(_flag)
_HISTOGRAM = _wire(_histogram)
_BLOCK_IDS = _wire(_block_ids, sequence=True)
_LABELS = _wire(check_labels, sequence=True)
_LAYER_INDICES = _wire(_layer_indices, sequence=True)
_LEVEL = {"wire": _Wire(_level_to_wire, lambda raw, *_: _as_level(raw))}
_RECIPE = {"wire": _Wire(_recipe_to_wire, _recipe_from_wire)}

# ---------------------------------------------------------------------------------------------
# Messages


@dataclass(frozen=True)
class UpdateMessage:
    """What a client returns after a round: its compressed block update and how it was made."""

    round: int = field(metadata=_COUNT)
    client_id: str = field(metadata=_TEXT)
    task_id: str = field(metadata=_TEXT)
    level: Level = field(metadata=_LEVEL)
    blocks: CompressedState = field(metadata=_blocks("level"))
    num_samples: int = field(metadata=_COUNT)
    num_steps: int = field(metadata=_COUNT)
    mean_loss: float = field(metadata=_REAL)
    wall_seconds: float = field(metadata=_NON_NEGATIVE)
    peak_memory_bytes: int = field(metadata=_COUNT)


@dataclass(frozen=True)
class AnnounceMessage:
    """A client introduces itself: what it can do (measured), what data it holds, which base it runs.

    Capacity fields are what the allocation needs: memory for the frozen base, per trainable block
    (weights, gradients, AdamW state) and activations per layer above the lowest trainable block;
    seconds per training step of one block and per forward of one frozen layer, at the announced
    batch size and sequence length, already multiplied by any emulated slowdown.
    """

    client_id: str = field(metadata=_TEXT)
    profile_name: str = field(metadata=_TEXT)
    device_kind: str = field(metadata=_TEXT)
    device_name: str = field(metadata=_TEXT)
    precision: str = field(metadata=_TEXT)
    memory_budget_bytes: int = field(metadata=_COUNT)
    base_memory_bytes: int = field(metadata=_COUNT)
    block_memory_bytes: int = field(metadata=_COUNT)
    activation_bytes_per_layer: int = field(metadata=_COUNT)
    max_trainable_blocks: int = field(metadata=_COUNT)
    block_step_seconds: float = field(metadata=_NON_NEGATIVE)
    layer_forward_seconds: float = field(metadata=_NON_NEGATIVE)
    link_bandwidth_bps: float = field(metadata=_NON_NEGATIVE)
    batch_size: int = field(metadata=_COUNT)
    max_tokens: int = field(metadata=_COUNT)
    num_examples: int = field(metadata=_COUNT)
    label_histogram: dict[str, float] = field(metadata=_HISTOGRAM)
    base_fingerprint: str = field(metadata=_TEXT)


# The announce payload groups its keys by kind (texts, counts, reals, histogram), not in field
# order; the wire keeps that order so its bytes do not change. MessageCodec.derive checks that it
# names every field exactly once.
_ANNOUNCE_KEYS = (
    "client_id", "profile_name", "device_kind", "device_name", "precision", "base_fingerprint",
    "memory_budget_bytes", "base_memory_bytes", "block_memory_bytes", "activation_bytes_per_layer",
    "max_trainable_blocks", "batch_size", "max_tokens", "num_examples",
    "block_step_seconds", "layer_forward_seconds", "link_bandwidth_bps", "label_histogram",
)  # fmt: skip

CLIENT_STATES = ("online", "offline", "training", "stopping")


@dataclass(frozen=True)
class StatusMessage:
    """A client's state (retained on the broker; the last will publishes ``offline``)."""

    client_id: str = field(metadata=_TEXT)
    state: str = field(metadata=_choice(CLIENT_STATES))
    round: int = field(metadata=_COUNT)
    detail: str = field(metadata=_FREE_TEXT)


@dataclass(frozen=True)
class TaskMessage:
    """A round's work for one client: train ``block_ids`` from ``weights`` (sent at ``download_level``)
    with ``recipe`` in round ``round``, and send the change back at ``upload_level``.

    No ``block_ids`` with ``evaluate`` set asks only for a federated evaluation of ``weights``.
    ``balance_labels`` are the federation's labels: with ``recipe.label_balance`` the client trains the
    label-balanced loss over them with its own counts (a label it lacks counts 0); empty = plain CE.
    """

    round: int = field(metadata=_COUNT)
    task_id: str = field(metadata=_TEXT)
    client_id: str = field(metadata=_TEXT)
    block_ids: tuple[int, ...] = field(metadata=_BLOCK_IDS)
    download_level: Level = field(metadata=_LEVEL)
    weights: CompressedState = field(metadata=_blocks("download_level"))
    upload_level: Level = field(metadata=_LEVEL)
    recipe: Recipe = field(metadata=_RECIPE)
    deadline_seconds: float = field(metadata=_NON_NEGATIVE)
    seed: int = field(metadata=_COUNT)
    evaluate: bool = field(metadata=_FLAG)
    balance_labels: tuple[str, ...] = field(default=(), metadata=_LABELS)


TASK_ERROR_CODES = ("refused_memory", "invalid_task", "failed", "abandoned", "busy")


@dataclass(frozen=True)
class TaskErrorMessage:
    """A client could not do (or finish) a task; ``code`` says which way, ``reason`` says why."""

    round: int = field(metadata=_COUNT)
    task_id: str = field(metadata=_TEXT)
    client_id: str = field(metadata=_TEXT)
    code: str = field(metadata=_choice(TASK_ERROR_CODES))
    reason: str = field(metadata=_FREE_TEXT)


NOTICE_CODES = ("refused", "accepted")


@dataclass(frozen=True)
class NoticeMessage:
    """The coordinator tells one client something it must act on (e.g. its base model differs)."""

    client_id: str = field(metadata=_TEXT)
    code: str = field(metadata=_choice(NOTICE_CODES))
    reason: str = field(metadata=_FREE_TEXT)


@dataclass(frozen=True)
class EvalResultMessage:
    """Federated evaluation on the client's held-out split."""

    round: int = field(metadata=_COUNT)
    task_id: str = field(metadata=_TEXT)
    client_id: str = field(metadata=_TEXT)
    num_examples: int = field(metadata=_COUNT)
    loss: float = field(metadata=_NON_NEGATIVE)
    accuracy: float = field(metadata=_FRACTION)


COORDINATOR_STATES = ("starting", "running", "finished", "stopped")


@dataclass(frozen=True)
class CoordinatorStatusMessage:
    """Retained: the federation's model structure and progress. A client expands its base from it."""

    state: str = field(metadata=_choice(COORDINATOR_STATES))
    round: int = field(metadata=_COUNT)
    base_fingerprint: str = field(metadata=_TEXT)
    base_num_layers: int = field(metadata=_COUNT)
    new_layer_indices: tuple[int, ...] = field(metadata=_LAYER_INDICES)
    source_layers: tuple[int, ...] = field(metadata=_LAYER_INDICES)


Message = (UpdateMessage | AnnounceMessage | StatusMessage | TaskMessage | TaskErrorMessage | NoticeMessage
           | EvalResultMessage | CoordinatorStatusMessage)  # fmt: skip
M = TypeVar("M")

# ---------------------------------------------------------------------------------------------
# Codecs


@dataclass(frozen=True)
class MessageCodec(Generic[M]):
    """How one message dataclass maps to and from its msgpack payload."""

    cls: type[M]
    to_payload: Callable[[M], dict[str, object]]
    from_payload: Callable[[object], M]
    blocks_of: Callable[[M], CompressedState] | None = None

    @classmethod
    def derive(cls, message: type[M], keys: tuple[str, ...] | None = None) -> MessageCodec[M]:
        """The codec of a dataclass whose fields declare their wire kinds: its payload is the map of
        its fields (in field order, or in ``keys`` order: the bytes of a map depend on it), exactly."""
        declared = fields(message)  # type: ignore[arg-type]
        if undeclared := [f.name for f in declared if not isinstance(f.metadata.get("wire"), _Wire)]:
            raise TypeError(f"{message.__name__} fields {undeclared} declare no wire kind")
        wires: dict[str, _Wire] = {f.name: f.metadata["wire"] for f in declared}
        keys = tuple(wires) if keys is None else keys
        if sorted(keys) != sorted(wires):
            raise TypeError(f"{message.__name__} wire keys {keys} are not its fields {tuple(wires)}")
        levels = {name: w.level_field for name, w in wires.items() if w.level_field is not None}
        for name, level in levels.items():  # the decoder reads a level before the blocks at that level
            if len(levels) > 1 or level not in keys or keys.index(level) > keys.index(name):
                raise TypeError(f"{message.__name__}.{name}: one blocks field, after its level field")
        # how decode errors name the message: "task error" for TaskErrorMessage
        where = " ".join(re.findall("[A-Z][a-z]*", message.__name__.removesuffix("Message"))).lower()

        def to_payload(msg: M) -> dict[str, object]:
            return {name: wires[name].encode(getattr(msg, name), name, msg) for name in keys}

        def from_payload(payload: object) -> M:
            raw = _Fields(payload, where, keys)
            values: dict[str, Any] = {}
            for name in keys:
                values[name] = wires[name].decode(raw.raw(name), name, where, values)
            return message(**values)

        return cls(message, to_payload, from_payload, attrgetter(next(iter(levels))) if levels else None)


MESSAGE_CODECS: dict[int, MessageCodec[Any]] = {
    MessageType.UPDATE: MessageCodec.derive(UpdateMessage),
    MessageType.ANNOUNCE: MessageCodec.derive(AnnounceMessage, _ANNOUNCE_KEYS),
    MessageType.STATUS: MessageCodec.derive(StatusMessage),
    MessageType.TASK: MessageCodec.derive(TaskMessage),
    MessageType.TASK_ERROR: MessageCodec.derive(TaskErrorMessage),
    MessageType.NOTICE: MessageCodec.derive(NoticeMessage),
    MessageType.EVAL_RESULT: MessageCodec.derive(EvalResultMessage),
    MessageType.COORDINATOR_STATUS: MessageCodec.derive(CoordinatorStatusMessage),
}
"""Type byte -> codec. ``encode`` and ``decode`` dispatch through this table only."""


def _type_name(code: int) -> str:
    codec = MESSAGE_CODECS.get(code)
    return f"type {code}" if codec is None else f"{codec.cls.__name__} (type {code})"


def encode(
    msg: Message,
    *,
    compression: BodyCompression = BodyCompression.NONE,
    compression_level: int | None = None,
    max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
) -> bytes:
    """The frame for ``msg``; :class:`CodecError` if ``msg`` is invalid or the frame exceeds ``max_bytes``."""
    found = [(code, codec) for code, codec in MESSAGE_CODECS.items() if type(msg) is codec.cls]
    if not found:
        raise CodecError(f"{_kind(msg)} is not a message type of protocol version {PROTOCOL_VERSION}")
    code, codec = found[0]
    if codec.blocks_of is not None:
        values = _tensor_bytes(codec.blocks_of(msg))
        if values > max_bytes:  # no frame can fit: refuse before copying any tensor
            raise CodecError(
                f"tensor data of {values} bytes exceeds the limit of {max_bytes} bytes", "oversized"
            )
    try:
        body = msgpack.packb(codec.to_payload(msg), use_bin_type=True)
    except CodecError as exc:
        raise CodecError(f"can not encode {_type_name(code)}: {exc}") from exc
    except (TypeError, ValueError, OverflowError) as exc:
        raise CodecError(f"can not encode {_type_name(code)}: {type(exc).__name__}: {exc}") from exc
    frame = pack_frame(
        code, body, compression=compression, compression_level=compression_level, max_bytes=max_bytes
    )
    logger.debug("encoded %s: %d bytes (%s)", _type_name(code), len(frame), BodyCompression(compression).name)
    return frame


@overload
def decode(
    data: bytes | bytearray | memoryview,
    *,
    max_bytes: int = ...,
    expected_type: type[M],
    expected_layout: BlockLayout | None = ...,
    allowed_blocks: Collection[int] | None = ...,
) -> M: ...
@overload
def decode(
    data: bytes | bytearray | memoryview,
    *,
    max_bytes: int = ...,
    expected_type: None = ...,
    expected_layout: BlockLayout | None = ...,
    allowed_blocks: Collection[int] | None = ...,
) -> Message: ...
def decode(
    data: bytes | bytearray | memoryview,
    *,
    max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    expected_type: type[Any] | None = None,
    expected_layout: BlockLayout | None = None,
    allowed_blocks: Collection[int] | None = None,
) -> Any:
    """Check and decode one frame; every problem raises :class:`CodecError` saying what was wrong.

    ``expected_type`` rejects other message types; ``expected_layout`` / ``allowed_blocks`` check
    the blocks of a message that carries blocks (see :func:`validate_blocks`).
    """
    frame = unpack_frame(data, max_bytes=max_bytes)
    codec = MESSAGE_CODECS.get(frame.message_type)
    if codec is None:
        known = ", ".join(_type_name(code) for code in MESSAGE_CODECS)
        raise CodecError(f"unknown message type {frame.message_type} (known: {known}): is the sender newer?")
    if expected_type is not None and codec.cls is not expected_type:
        raise CodecError(f"expected a {expected_type.__name__} message, got {_type_name(frame.message_type)}")
    payload = _unpack_body(frame.body, max_bytes)
    try:
        msg = codec.from_payload(payload)
    except CodecError as exc:
        raise CodecError(f"invalid {_type_name(frame.message_type)}: {exc}", exc.reason) from exc
    if expected_layout is not None or allowed_blocks is not None:
        if codec.blocks_of is None:
            raise CodecError(f"{_type_name(frame.message_type)} carries no blocks, but blocks were expected")
        validate_blocks(codec.blocks_of(msg), expected_layout, allowed_blocks=allowed_blocks)
    return msg
