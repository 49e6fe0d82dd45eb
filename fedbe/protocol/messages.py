"""Message dataclasses, their msgpack schemas, and ``encode`` / ``decode`` of whole messages.

Each message type is a frozen dataclass, a :class:`MessageType` member and a
:class:`MessageCodec` entry in :data:`MESSAGE_CODECS`; ``encode`` and ``decode`` dispatch
through that table only. Frame layout, tensors and field checks live in
:mod:`fedbe.protocol.frames`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from dataclasses import dataclass
from enum import IntEnum
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


@dataclass(frozen=True)
class UpdateMessage:
    """What a client returns after a round: its compressed block update and how it was made."""

    round: int
    client_id: str
    task_id: str
    level: Level
    blocks: CompressedState
    num_samples: int
    num_steps: int
    mean_loss: float
    wall_seconds: float
    peak_memory_bytes: int


@dataclass(frozen=True)
class AnnounceMessage:
    """A client introduces itself: what it can do (measured), what data it holds, which base it runs.

    Capacity fields are what the allocation needs: memory for the frozen base, per trainable block
    (weights, gradients, AdamW state) and activations per layer above the lowest trainable block;
    seconds per training step of one block and per forward of one frozen layer, at the announced
    batch size and sequence length, already multiplied by any emulated slowdown.
    """

    client_id: str
    profile_name: str
    device_kind: str
    device_name: str
    precision: str
    memory_budget_bytes: int
    base_memory_bytes: int
    block_memory_bytes: int
    activation_bytes_per_layer: int
    max_trainable_blocks: int
    block_step_seconds: float
    layer_forward_seconds: float
    link_bandwidth_bps: float
    batch_size: int
    max_tokens: int
    num_examples: int
    label_histogram: dict[str, float]
    base_fingerprint: str


CLIENT_STATES = ("online", "offline", "training", "stopping")


@dataclass(frozen=True)
class StatusMessage:
    """A client's state (retained on the broker; the last will publishes ``offline``)."""

    client_id: str
    state: str
    round: int
    detail: str


@dataclass(frozen=True)
class TaskMessage:
    """A round's work for one client: train ``block_ids`` from ``weights`` (sent at ``download_level``)
    with ``recipe`` in round ``round``, and send the change back at ``upload_level``.

    No ``block_ids`` with ``evaluate`` set asks only for a federated evaluation of ``weights``.
    ``balance_labels`` are the federation's labels: with ``recipe.label_balance`` the client trains the
    label-balanced loss over them with its own counts (a label it lacks counts 0); empty = plain CE.
    """

    round: int
    task_id: str
    client_id: str
    block_ids: tuple[int, ...]
    download_level: Level
    weights: CompressedState
    upload_level: Level
    recipe: Recipe
    deadline_seconds: float
    seed: int
    evaluate: bool
    balance_labels: tuple[str, ...] = ()


TASK_ERROR_CODES = ("refused_memory", "invalid_task", "failed", "abandoned", "busy")


@dataclass(frozen=True)
class TaskErrorMessage:
    """A client could not do (or finish) a task; ``code`` says which way, ``reason`` says why."""

    round: int
    task_id: str
    client_id: str
    code: str
    reason: str


NOTICE_CODES = ("refused", "accepted")


@dataclass(frozen=True)
class NoticeMessage:
    """The coordinator tells one client something it must act on (e.g. its base model differs)."""

    client_id: str
    code: str
    reason: str


@dataclass(frozen=True)
class EvalResultMessage:
    """Federated evaluation on the client's held-out split."""

    round: int
    task_id: str
    client_id: str
    num_examples: int
    loss: float
    accuracy: float


COORDINATOR_STATES = ("starting", "running", "finished", "stopped")


@dataclass(frozen=True)
class CoordinatorStatusMessage:
    """Retained: the federation's model structure and progress. A client expands its base from it."""

    state: str
    round: int
    base_fingerprint: str
    base_num_layers: int
    new_layer_indices: tuple[int, ...]
    source_layers: tuple[int, ...]


Message = (
    UpdateMessage
    | AnnounceMessage
    | StatusMessage
    | TaskMessage
    | TaskErrorMessage
    | NoticeMessage
    | EvalResultMessage
    | CoordinatorStatusMessage
)
M = TypeVar("M")


@dataclass(frozen=True)
class MessageCodec(Generic[M]):
    """How one message dataclass maps to and from its msgpack payload."""

    cls: type[M]
    to_payload: Callable[[M], dict[str, object]]
    from_payload: Callable[[object], M]
    blocks_of: Callable[[M], CompressedState] | None = None


_UPDATE_FIELDS = (
    "round", "client_id", "task_id", "level", "blocks",
    "num_samples", "num_steps", "mean_loss", "wall_seconds", "peak_memory_bytes",
)  # fmt: skip


def _update_to_payload(m: UpdateMessage) -> dict[str, object]:
    if not isinstance(m.level, Level):
        raise CodecError(f"level must be a Level, got {m.level!r}")
    return {
        "round": _as_count(m.round, "round"),
        "client_id": _as_text(m.client_id, "client_id"),
        "task_id": _as_text(m.task_id, "task_id"),
        "level": m.level.value,
        "blocks": _encode_blocks(m.blocks, m.level),
        "num_samples": _as_count(m.num_samples, "num_samples"),
        "num_steps": _as_count(m.num_steps, "num_steps"),
        "mean_loss": _as_real(m.mean_loss, "mean_loss"),
        "wall_seconds": _as_real(m.wall_seconds, "wall_seconds", 0.0),
        "peak_memory_bytes": _as_count(m.peak_memory_bytes, "peak_memory_bytes"),
    }


def _update_from_payload(payload: object) -> UpdateMessage:
    f = _Fields(payload, "update", _UPDATE_FIELDS)
    level = _as_level(f.raw("level"))
    return UpdateMessage(
        round=f.count("round"),
        client_id=f.text("client_id"),
        task_id=f.text("task_id"),
        level=level,
        blocks=_decode_blocks(f.raw("blocks"), level),
        num_samples=f.count("num_samples"),
        num_steps=f.count("num_steps"),
        mean_loss=f.real("mean_loss"),
        wall_seconds=f.real("wall_seconds", 0.0),
        peak_memory_bytes=f.count("peak_memory_bytes"),
    )


def _update_blocks(m: UpdateMessage) -> CompressedState:
    return m.blocks


def _choice(value: object, what: str, choices: tuple[str, ...]) -> str:
    text = _as_text(value, what)
    if text not in choices:
        raise CodecError(f"{what} must be one of {', '.join(choices)}, got {text!r}")
    return text


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


MAX_LABELS = 1024


def _histogram(value: object) -> dict[str, float]:
    if not isinstance(value, dict):
        raise CodecError(f"label_histogram must be a map of label to count, got {_kind(value)}")
    if len(value) > MAX_LABELS:
        raise CodecError(f"label_histogram has {len(value)} labels; at most {MAX_LABELS}")
    return {
        _as_text(k, "label_histogram label"): _as_real(v, f"label_histogram count of {k!r}", 0.0)
        for k, v in value.items()
    }


def _block_ids(value: object) -> tuple[int, ...]:
    if not isinstance(value, list | tuple):
        raise CodecError(f"block_ids must be a list, got {_kind(value)}")
    ids = tuple(_as_count(b, "block id", 1 << 20) for b in value)
    if len(set(ids)) != len(ids):
        raise CodecError(f"block_ids {list(ids)} repeats a block")
    return ids


_ANNOUNCE_INTS = (
    "memory_budget_bytes", "base_memory_bytes", "block_memory_bytes", "activation_bytes_per_layer",
    "max_trainable_blocks", "batch_size", "max_tokens", "num_examples",
)  # fmt: skip
_ANNOUNCE_REALS = ("block_step_seconds", "layer_forward_seconds", "link_bandwidth_bps")
_ANNOUNCE_TEXTS = ("client_id", "profile_name", "device_kind", "device_name", "precision", "base_fingerprint")
_ANNOUNCE_FIELDS = _ANNOUNCE_TEXTS + _ANNOUNCE_INTS + _ANNOUNCE_REALS + ("label_histogram",)


def _announce_to_payload(m: AnnounceMessage) -> dict[str, object]:
    payload: dict[str, object] = {n: _as_text(getattr(m, n), n) for n in _ANNOUNCE_TEXTS}
    payload.update({n: _as_count(getattr(m, n), n) for n in _ANNOUNCE_INTS})
    payload.update({n: _as_real(getattr(m, n), n, 0.0) for n in _ANNOUNCE_REALS})
    payload["label_histogram"] = _histogram(m.label_histogram)
    return payload


def _announce_from_payload(payload: object) -> AnnounceMessage:
    f = _Fields(payload, "announce", _ANNOUNCE_FIELDS)
    values: dict[str, Any] = {n: f.text(n) for n in _ANNOUNCE_TEXTS}
    values.update({n: f.count(n) for n in _ANNOUNCE_INTS})
    values.update({n: f.real(n, 0.0) for n in _ANNOUNCE_REALS})
    values["label_histogram"] = _histogram(f.raw("label_histogram"))
    return AnnounceMessage(**values)


_STATUS_FIELDS = ("client_id", "state", "round", "detail")


def _status_to_payload(m: StatusMessage) -> dict[str, object]:
    return {
        "client_id": _as_text(m.client_id, "client_id"),
        "state": _choice(m.state, "state", CLIENT_STATES),
        "round": _as_count(m.round, "round"),
        "detail": _free_text(m.detail, "detail"),
    }


def _status_from_payload(payload: object) -> StatusMessage:
    f = _Fields(payload, "status", _STATUS_FIELDS)
    return StatusMessage(
        client_id=f.text("client_id"),
        state=_choice(f.raw("state"), "state", CLIENT_STATES),
        round=f.count("round"),
        detail=_free_text(f.raw("detail"), "detail"),
    )


_TASK_FIELDS = (
    "round", "task_id", "client_id", "block_ids", "download_level", "weights", "upload_level", "recipe",
    "deadline_seconds", "seed", "evaluate", "balance_labels",
)  # fmt: skip


def _task_to_payload(m: TaskMessage) -> dict[str, object]:
    if not isinstance(m.download_level, Level) or not isinstance(m.upload_level, Level):
        raise CodecError("download_level and upload_level must be Levels")
    if not isinstance(m.recipe, Recipe):
        raise CodecError(f"recipe must be a Recipe, got {_kind(m.recipe)}")
    return {
        "round": _as_count(m.round, "round"),
        "task_id": _as_text(m.task_id, "task_id"),
        "client_id": _as_text(m.client_id, "client_id"),
        "block_ids": list(_block_ids(list(m.block_ids))),
        "download_level": m.download_level.value,
        "weights": _encode_blocks(m.weights, m.download_level),
        "upload_level": m.upload_level.value,
        "recipe": m.recipe.to_payload(),
        "deadline_seconds": _as_real(m.deadline_seconds, "deadline_seconds", 0.0),
        "seed": _as_count(m.seed, "seed"),
        "evaluate": _flag(m.evaluate, "evaluate"),
        "balance_labels": list(check_labels(list(m.balance_labels))),
    }


def _recipe(value: object) -> Recipe:
    if not isinstance(value, dict):
        raise CodecError(f"task recipe must be a map of its fields, got {_kind(value)}")
    try:
        return Recipe.from_mapping({str(k): v for k, v in value.items()}, versioned=True)
    except RecipeError as exc:
        raise CodecError(f"task recipe: {exc}") from None


def _task_from_payload(payload: object) -> TaskMessage:
    f = _Fields(payload, "task", _TASK_FIELDS)
    download_level = _as_level(f.raw("download_level"))
    return TaskMessage(
        round=f.count("round"),
        task_id=f.text("task_id"),
        client_id=f.text("client_id"),
        block_ids=_block_ids(f.raw("block_ids")),
        download_level=download_level,
        weights=_decode_blocks(f.raw("weights"), download_level),
        upload_level=_as_level(f.raw("upload_level")),
        recipe=_recipe(f.raw("recipe")),
        deadline_seconds=f.real("deadline_seconds", 0.0),
        seed=f.count("seed"),
        evaluate=_flag(f.raw("evaluate"), "evaluate"),
        balance_labels=check_labels(f.raw("balance_labels")),
    )


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


_TASK_ERROR_FIELDS = ("round", "task_id", "client_id", "code", "reason")


def _task_error_to_payload(m: TaskErrorMessage) -> dict[str, object]:
    return {
        "round": _as_count(m.round, "round"),
        "task_id": _as_text(m.task_id, "task_id"),
        "client_id": _as_text(m.client_id, "client_id"),
        "code": _choice(m.code, "code", TASK_ERROR_CODES),
        "reason": _free_text(m.reason, "reason"),
    }


def _task_error_from_payload(payload: object) -> TaskErrorMessage:
    f = _Fields(payload, "task error", _TASK_ERROR_FIELDS)
    return TaskErrorMessage(
        round=f.count("round"),
        task_id=f.text("task_id"),
        client_id=f.text("client_id"),
        code=_choice(f.raw("code"), "code", TASK_ERROR_CODES),
        reason=_free_text(f.raw("reason"), "reason"),
    )


_NOTICE_FIELDS = ("client_id", "code", "reason")


def _notice_to_payload(m: NoticeMessage) -> dict[str, object]:
    return {
        "client_id": _as_text(m.client_id, "client_id"),
        "code": _choice(m.code, "code", NOTICE_CODES),
        "reason": _free_text(m.reason, "reason"),
    }


def _notice_from_payload(payload: object) -> NoticeMessage:
    f = _Fields(payload, "notice", _NOTICE_FIELDS)
    return NoticeMessage(
        client_id=f.text("client_id"),
        code=_choice(f.raw("code"), "code", NOTICE_CODES),
        reason=_free_text(f.raw("reason"), "reason"),
    )


_EVAL_FIELDS = ("round", "task_id", "client_id", "num_examples", "loss", "accuracy")


def _eval_to_payload(m: EvalResultMessage) -> dict[str, object]:
    accuracy = _as_real(m.accuracy, "accuracy", 0.0)
    if accuracy > 1.0:
        raise CodecError(f"accuracy must be in [0, 1], got {accuracy}")
    return {
        "round": _as_count(m.round, "round"),
        "task_id": _as_text(m.task_id, "task_id"),
        "client_id": _as_text(m.client_id, "client_id"),
        "num_examples": _as_count(m.num_examples, "num_examples"),
        "loss": _as_real(m.loss, "loss", 0.0),
        "accuracy": accuracy,
    }


def _eval_from_payload(payload: object) -> EvalResultMessage:
    f = _Fields(payload, "eval result", _EVAL_FIELDS)
    accuracy = f.real("accuracy", 0.0)
    if accuracy > 1.0:
        raise CodecError(f"accuracy must be in [0, 1], got {accuracy}")
    return EvalResultMessage(
        round=f.count("round"),
        task_id=f.text("task_id"),
        client_id=f.text("client_id"),
        num_examples=f.count("num_examples"),
        loss=f.real("loss", 0.0),
        accuracy=accuracy,
    )


_COORD_FIELDS = (
    "state",
    "round",
    "base_fingerprint",
    "base_num_layers",
    "new_layer_indices",
    "source_layers",
)


def _index_list(value: object, what: str) -> tuple[int, ...]:
    if not isinstance(value, list | tuple) or len(value) > 4096:
        raise CodecError(f"{what} must be a list of at most 4096 layer indices")
    return tuple(_as_count(v, what, 1 << 20) for v in value)


def _coord_to_payload(m: CoordinatorStatusMessage) -> dict[str, object]:
    return {
        "state": _choice(m.state, "state", COORDINATOR_STATES),
        "round": _as_count(m.round, "round"),
        "base_fingerprint": _as_text(m.base_fingerprint, "base_fingerprint"),
        "base_num_layers": _as_count(m.base_num_layers, "base_num_layers"),
        "new_layer_indices": list(_index_list(list(m.new_layer_indices), "new_layer_indices")),
        "source_layers": list(_index_list(list(m.source_layers), "source_layers")),
    }


def _coord_from_payload(payload: object) -> CoordinatorStatusMessage:
    f = _Fields(payload, "coordinator status", _COORD_FIELDS)
    return CoordinatorStatusMessage(
        state=_choice(f.raw("state"), "state", COORDINATOR_STATES),
        round=f.count("round"),
        base_fingerprint=f.text("base_fingerprint"),
        base_num_layers=f.count("base_num_layers"),
        new_layer_indices=_index_list(f.raw("new_layer_indices"), "new_layer_indices"),
        source_layers=_index_list(f.raw("source_layers"), "source_layers"),
    )


def _task_blocks(m: TaskMessage) -> CompressedState:
    return m.weights


MESSAGE_CODECS: dict[int, MessageCodec[Any]] = {
    MessageType.UPDATE: MessageCodec(UpdateMessage, _update_to_payload, _update_from_payload, _update_blocks),
    MessageType.ANNOUNCE: MessageCodec(AnnounceMessage, _announce_to_payload, _announce_from_payload),
    MessageType.STATUS: MessageCodec(StatusMessage, _status_to_payload, _status_from_payload),
    MessageType.TASK: MessageCodec(TaskMessage, _task_to_payload, _task_from_payload, _task_blocks),
    MessageType.TASK_ERROR: MessageCodec(TaskErrorMessage, _task_error_to_payload, _task_error_from_payload),
    MessageType.NOTICE: MessageCodec(NoticeMessage, _notice_to_payload, _notice_from_payload),
    MessageType.EVAL_RESULT: MessageCodec(EvalResultMessage, _eval_to_payload, _eval_from_payload),
    MessageType.COORDINATOR_STATUS: MessageCodec(
        CoordinatorStatusMessage, _coord_to_payload, _coord_from_payload
    ),
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
