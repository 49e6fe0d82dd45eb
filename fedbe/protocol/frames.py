"""Frames: the versioned binary header, body compression, msgpack limits, field checks and tensors.

The package fedbe.protocol is the only place in fedbe that touches bytes, msgpack, zlib or zstd.

Frame layout (integers little-endian; a 16-byte header, then the body)::

    offset  size  field
    0       4     magic        b"FBEW"
    4       1     version      PROTOCOL_VERSION (4)
    5       1     type         MessageType
    6       1     flags        BodyCompression of the body: 0 none, 1 zlib, 2 zstd; nothing else
    7       1     reserved     0
    8       4     body_length  bytes of body after the header (the frame is exactly 16 + body_length)
    12      4     crc32        zlib.crc32 over header bytes 0..11 followed by the body
    16      n     body         msgpack payload, compressed as the flags say

The CRC covers every byte of the frame except itself, so any single-bit flip is detected.
A zstd body must be one frame that declares its content size (``encode`` writes it).

The body is a msgpack map with str keys; the schema of each message type is exact: a missing or
an extra field is an error (adding a field is a protocol version change). Version 4 carries the
training knobs of a task as one nested ``recipe`` map (:class:`fedbe.recipe.Recipe`, with its own
``version``) and names the two precisions ``download_level`` and ``upload_level``; a build refuses a
frame of any other version, naming both, so mixed fleets fail loudly instead of training wrongly. A build speaks one
version. A tensor is the map ``{"dtype": str, "shape": [int, ...], "data": bin, "scales": bin | nil}``:
the raw little-endian values (bfloat16 as its int16 bit pattern) and, at int8 only, one float32 scale
per row.
An update carries its blocks as ``[{"id": int, "tensors": {name: tensor}}, ...]``.

``decode`` accepts any bytes: whatever is wrong, it raises :class:`CodecError` saying what. Sizes
are checked before anything is allocated and decompression stops at ``max_bytes``, so decoding
holds a few copies of at most ``max_bytes`` (frame, body, tensors) and never more.

A new message type is a frozen dataclass whose fields declare their wire kinds, a :class:`MessageType`
member and its derived :class:`MessageCodec` in :data:`MESSAGE_CODECS` (see :mod:`fedbe.protocol.messages`).
"""

from __future__ import annotations

import logging
import math
import struct
import zlib
from collections.abc import Collection
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import msgpack
import numpy as np
import torch
import zstandard

from fedbe.compression import (
    BlockLayout,
    CompressedState,
    CompressedTensor,
    Level,
    all_finite,
    layout_of,
    layout_problems,
    rows_and_columns,
)
from fedbe.errors import BlockStateError, CodecError

logger = logging.getLogger(__name__)

MAGIC = b"FBEW"
PROTOCOL_VERSION = 4  # see the module docstring for what each version changed
SUPPORTED_VERSIONS: frozenset[int] = frozenset({4})
DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024
HEADER = struct.Struct("<4sBBBBII")
HEADER_SIZE = HEADER.size  # 16
_CRC_OFFSET = 12

MAX_TEXT_BYTES = 1024  # ids and parameter names
MAX_NDIM = 8
MAX_DIM = 2**31 - 1
MAX_COUNT = 2**63 - 1
_MAX_ZSTD_WINDOW_LOG = 23  # 8 MiB: the encoder never needs more, the decoder never allocates more
_READ_CHUNK = 1 << 20


class BodyCompression(IntEnum):
    """The flags byte of a frame: how the msgpack body is compressed."""

    NONE = 0
    ZLIB = 1
    ZSTD = 2


@dataclass(frozen=True)
class Frame:
    """A checked frame: its header fields and the decompressed (still msgpack) body."""

    version: int
    message_type: int
    compression: BodyCompression
    body: bytes


# ---------------------------------------------------------------------------------------------
# Field checks shared by encode and decode (so the encoder never writes what the decoder rejects)


def _kind(value: object) -> str:
    return type(value).__name__


def _as_count(value: object, what: str, maximum: int = MAX_COUNT) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise CodecError(f"{what} must be an integer, got {_kind(value)}")
    if not 0 <= value <= maximum:
        raise CodecError(f"{what} must be between 0 and {maximum}, got {value}")
    return value


def _as_real(value: object, what: str, minimum: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CodecError(f"{what} must be a number, got {_kind(value)}")
    number = float(value)
    if not math.isfinite(number):
        raise CodecError(f"{what} must be finite, got {number}")
    if minimum is not None and number < minimum:
        raise CodecError(f"{what} must be at least {minimum}, got {number}")
    return number


def _as_text(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise CodecError(f"{what} must be a string, got {_kind(value)}")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise CodecError(f"{what} is not valid unicode text") from None
    if not 0 < size <= MAX_TEXT_BYTES:
        raise CodecError(f"{what} must be 1 to {MAX_TEXT_BYTES} bytes of text, got {len(value)} characters")
    return value


def _as_level(value: object) -> Level:
    text = _as_text(value, "level")
    try:
        return Level(text)
    except ValueError:
        known = ", ".join(level.value for level in Level)
        raise CodecError(f"unknown level {text!r} (known: {known})") from None


def _check_values(c: CompressedTensor, where: str) -> None:
    if not all_finite(c.data):
        raise CodecError(f"{where}: data holds NaN or Inf", "non_finite")
    if c.scales is not None and not (all_finite(c.scales) and bool((c.scales >= 0).all())):
        raise CodecError(f"{where}: int8 scales must be finite and non-negative", "non_finite")


class _Fields:
    """The fields of one msgpack map, which must have exactly the given names."""

    def __init__(self, obj: object, what: str, names: tuple[str, ...]) -> None:
        if not isinstance(obj, dict):
            raise CodecError(f"{what} must be a map, got {_kind(obj)}")
        missing = [n for n in names if n not in obj]
        extra = [k for k in obj if k not in names]
        if missing or extra:
            problems = [f"missing fields {missing}"] if missing else []
            problems += [f"unexpected fields {extra}"] if extra else []
            raise CodecError(f"{what} has {' and '.join(problems)} (expected exactly {list(names)})")
        self._map: dict[Any, object] = obj
        self._what = what

    def raw(self, name: str) -> object:
        return self._map[name]

    def count(self, name: str, maximum: int = MAX_COUNT) -> int:
        return _as_count(self._map[name], f"{self._what} field {name!r}", maximum)

    def real(self, name: str, minimum: float | None = None) -> float:
        return _as_real(self._map[name], f"{self._what} field {name!r}", minimum)

    def text(self, name: str) -> str:
        return _as_text(self._map[name], f"{self._what} field {name!r}")


# ---------------------------------------------------------------------------------------------
# Tensors

_WIRE_DTYPE: dict[Level, tuple[str, np.dtype[Any]]] = {
    Level.FP32: ("float32", np.dtype("<f4")),
    Level.FP16: ("float16", np.dtype("<f2")),
    Level.BF16: ("bfloat16", np.dtype("<i2")),  # numpy has no bfloat16: its int16 bit pattern
    Level.INT8: ("int8", np.dtype("i1")),
}
_DTYPE_NAMES = {name for name, _ in _WIRE_DTYPE.values()}
_TENSOR_FIELDS = ("dtype", "shape", "data", "scales")
_SCALES_DTYPE = np.dtype("<f4")


def _to_le_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    array = t.numpy()
    return array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()


def _from_le_bytes(raw: bytes, wire: np.dtype[Any], shape: tuple[int, ...]) -> torch.Tensor:
    array = np.frombuffer(raw, dtype=wire).astype(wire.newbyteorder("="), copy=True)
    return torch.from_numpy(array).reshape(shape)


def _encode_tensor(c: CompressedTensor) -> dict[str, object]:
    scales = None if c.scales is None else _to_le_bytes(c.scales)
    return {
        "dtype": _WIRE_DTYPE[c.level][0],
        "shape": list(c.shape),
        "data": _to_le_bytes(c.data),
        "scales": scales,
    }


def _decode_shape(value: object, where: str) -> tuple[int, ...]:
    if not isinstance(value, list) or len(value) > MAX_NDIM:
        raise CodecError(f"{where}: shape must be a list of at most {MAX_NDIM} non-negative integers")
    return tuple(_as_count(d, f"{where}: shape entry", MAX_DIM) for d in value)


def _decode_tensor(obj: object, level: Level, where: str) -> CompressedTensor:
    f = _Fields(obj, where, _TENSOR_FIELDS)
    dtype = f.text("dtype")
    if dtype not in _DTYPE_NAMES:
        raise CodecError(
            f"{where}: unknown dtype {dtype!r} (known: {sorted(_DTYPE_NAMES)})", "dtype_mismatch"
        )
    name, wire = _WIRE_DTYPE[level]
    if dtype != name:
        raise CodecError(
            f"{where}: dtype {dtype} is not allowed at level {level.value} (expected {name})",
            "dtype_mismatch",
        )
    shape = _decode_shape(f.raw("shape"), where)
    numel = math.prod(shape)
    data = f.raw("data")
    if not isinstance(data, bytes):
        raise CodecError(f"{where}: data must be bin, got {_kind(data)}")
    if numel * wire.itemsize != len(data):
        raise CodecError(
            f"{where}: shape {shape} needs {numel * wire.itemsize} bytes of {dtype}, got {len(data)}"
        )
    values = _from_le_bytes(data, wire, shape)
    if level is Level.BF16:
        values = values.view(torch.bfloat16)
    scales_raw = f.raw("scales")
    scales: torch.Tensor | None = None
    if level is Level.INT8:
        rows, _ = rows_and_columns(shape)
        if not isinstance(scales_raw, bytes) or len(scales_raw) != rows * _SCALES_DTYPE.itemsize:
            raise CodecError(f"{where}: int8 needs scales as bin of {rows} float32 (one per row)")
        scales = _from_le_bytes(scales_raw, _SCALES_DTYPE, (rows,))
    elif scales_raw is not None:
        raise CodecError(f"{where}: level {level.value} carries no scales, got {_kind(scales_raw)}")
    try:
        c = CompressedTensor(level=level, shape=shape, data=values, scales=scales)
    except BlockStateError as exc:
        raise CodecError(f"{where}: {exc}") from exc
    _check_values(c, where)
    return c


# ---------------------------------------------------------------------------------------------
# Messages

_BLOCK_FIELDS = ("id", "tensors")


def _encode_blocks(blocks: CompressedState, level: Level) -> list[object]:
    if not isinstance(blocks, dict):
        raise CodecError(f"blocks must be a dict, got {_kind(blocks)}")
    entries: list[object] = []
    for bid, params in blocks.items():
        _as_count(bid, "block id", MAX_DIM)
        if not isinstance(params, dict):
            raise CodecError(f"block {bid} must map parameter names to tensors, got {_kind(params)}")
        tensors: dict[str, object] = {}
        for name, c in params.items():
            where = f"block {bid} parameter {_as_text(name, f'block {bid} parameter name')!r}"
            if not isinstance(c, CompressedTensor) or c.level is not level:
                raise CodecError(f"{where}: expected a CompressedTensor at level {level.value}")
            _check_values(c, where)
            tensors[name] = _encode_tensor(c)
        entries.append({"id": bid, "tensors": tensors})
    return entries


def _decode_blocks(obj: object, level: Level) -> CompressedState:
    if not isinstance(obj, list):
        raise CodecError(f"blocks must be a list, got {_kind(obj)}")
    blocks: CompressedState = {}
    for i, entry in enumerate(obj):
        f = _Fields(entry, f"blocks[{i}]", _BLOCK_FIELDS)
        bid = f.count("id", MAX_DIM)
        if bid in blocks:
            raise CodecError(f"block {bid} appears twice")
        tensors = f.raw("tensors")
        if not isinstance(tensors, dict):
            raise CodecError(f"block {bid} tensors must be a map, got {_kind(tensors)}")
        blocks[bid] = {
            _as_text(name, f"block {bid} parameter name"): _decode_tensor(
                t, level, f"block {bid} parameter {name!r}"
            )
            for name, t in tensors.items()
        }
    return blocks


def validate_blocks(
    blocks: CompressedState,
    expected_layout: BlockLayout | None,
    *,
    allowed_blocks: Collection[int] | None = None,
) -> None:
    """Raise :class:`CodecError` unless every block is in the layout with exactly its names and shapes.

    Blocks of the layout may be absent (a client may train a subset); with ``allowed_blocks``
    every block id must also be one of those (the blocks the client was asked to train).
    """
    problems: list[str] = []
    reason = "shape_mismatch"
    if expected_layout is not None:
        problems += layout_problems(layout_of(blocks), expected_layout, require_all_blocks=False)
    if allowed_blocks is not None:
        allowed = set(allowed_blocks)
        unassigned = sorted(set(blocks) - allowed)
        if unassigned:
            reason = "unassigned_block"
        problems += [f"block {b} was not assigned (assigned {sorted(allowed)})" for b in unassigned]
    if problems:
        raise CodecError("blocks do not match the model: " + "; ".join(problems), reason)


# ---------------------------------------------------------------------------------------------
# Frames


def _compress_body(body: bytes, compression: BodyCompression, level: int | None) -> bytes:
    if compression is BodyCompression.ZLIB:
        return zlib.compress(body, 6 if level is None else level)
    if compression is BodyCompression.ZSTD:
        zstd_level = 3 if level is None else level
        params = zstandard.ZstdCompressionParameters.from_level(zstd_level, source_size=len(body))
        if params.window_log > _MAX_ZSTD_WINDOW_LOG:  # levels >= 19 on large bodies
            params = zstandard.ZstdCompressionParameters.from_level(
                zstd_level, source_size=len(body), window_log=_MAX_ZSTD_WINDOW_LOG
            )
        return zstandard.ZstdCompressor(compression_params=params).compress(body)
    return body


def _inflate(body: memoryview, compression: BodyCompression, max_bytes: int) -> bytes:
    too_big = (
        f"body inflates beyond the limit of {max_bytes} bytes (a decompression bomb or a too-large message)"
    )
    if compression is BodyCompression.NONE:
        return body.tobytes()
    if compression is BodyCompression.ZLIB:
        inflater = zlib.decompressobj()
        try:
            out = inflater.decompress(body, max_bytes + 1)
        except zlib.error as exc:
            raise CodecError(f"zlib body is malformed: {exc}") from exc
        if len(out) > max_bytes:
            raise CodecError(too_big, "oversized")
        if not inflater.eof or inflater.unused_data:
            raise CodecError("zlib body is truncated or followed by extra bytes")
        return out
    try:
        declared = zstandard.frame_content_size(body)
        if declared < 0:
            raise CodecError("zstd body does not declare its content size (encode always writes it)")
        if declared > max_bytes:
            raise CodecError(too_big, "oversized")
        decompressor = zstandard.ZstdDecompressor(max_window_size=1 << _MAX_ZSTD_WINDOW_LOG)
        chunks: list[bytes] = []
        total = 0
        with decompressor.stream_reader(body, read_across_frames=True) as reader:
            while chunk := reader.read(min(_READ_CHUNK, declared - total + 1)):
                chunks.append(chunk)
                total += len(chunk)
                if total > declared:
                    raise CodecError("zstd body holds more data than its frame declares")
    except zstandard.ZstdError as exc:
        raise CodecError(f"zstd body is malformed: {exc}") from exc
    if total != declared:
        raise CodecError(f"zstd body is truncated: {total} of {declared} bytes")
    return b"".join(chunks)


def pack_frame(
    message_type: int,
    body: bytes,
    *,
    compression: BodyCompression = BodyCompression.NONE,
    compression_level: int | None = None,
    max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
) -> bytes:
    """Wrap an (uncompressed) msgpack ``body`` into a frame; refuse frames over ``max_bytes``."""
    compression = BodyCompression(compression)
    if not 0 <= message_type <= 0xFF:
        raise CodecError(f"message type {message_type} does not fit the type byte")
    if len(body) > max_bytes:
        raise CodecError(
            f"message body of {len(body)} bytes exceeds the limit of {max_bytes} bytes", "oversized"
        )
    packed = _compress_body(body, compression, compression_level)
    size = HEADER_SIZE + len(packed)
    if size > max_bytes or len(packed) > 0xFFFFFFFF:
        raise CodecError(
            f"frame of {size} bytes exceeds the limit of {max_bytes} bytes: send fewer blocks per message, "
            "compress harder (int8, zstd) or raise the limit (and the broker's message_size_limit)",
            "oversized",
        )
    head = HEADER.pack(MAGIC, PROTOCOL_VERSION, message_type, compression, 0, len(packed), 0)[:_CRC_OFFSET]
    crc = zlib.crc32(packed, zlib.crc32(head))
    return head + struct.pack("<I", crc) + packed


def unpack_frame(
    data: bytes | bytearray | memoryview, *, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
) -> Frame:
    """Check a frame's size, header and CRC and return it with its body decompressed."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise CodecError(f"a frame must be bytes, got {_kind(data)}")
    size = data.nbytes if isinstance(data, memoryview) else len(data)
    if size > max_bytes:
        raise CodecError(f"frame of {size} bytes exceeds the limit of {max_bytes} bytes", "oversized")
    if size < HEADER_SIZE:
        raise CodecError(
            f"frame of {size} bytes is shorter than the {HEADER_SIZE}-byte header: truncated", "corrupt"
        )
    raw = bytes(data)
    magic, version, type_code, flags, reserved, body_length, crc = HEADER.unpack_from(raw)
    if magic != MAGIC:
        raise CodecError(f"not a fedbe frame: magic {magic!r}, expected {MAGIC!r}", "corrupt")
    if version not in SUPPORTED_VERSIONS:
        raise CodecError(
            f"unsupported protocol version {version}; this build supports {sorted(SUPPORTED_VERSIONS)}: "
            "run the same fedbe release on coordinator and clients",
            "version",
        )
    if body_length != size - HEADER_SIZE:
        raise CodecError(
            f"header announces a body of {body_length} bytes but {size - HEADER_SIZE} follow: "
            "truncated or padded in transit",
            "corrupt",
        )
    body = memoryview(raw)[HEADER_SIZE:]
    actual = zlib.crc32(body, zlib.crc32(raw[:_CRC_OFFSET]))
    if actual != crc:
        raise CodecError(
            f"CRC mismatch (header {crc:#010x}, computed {actual:#010x}): frame corrupted in transit",
            "corrupt",
        )
    if reserved != 0:
        raise CodecError(f"reserved header byte is {reserved}, must be 0")
    if flags not in {c.value for c in BodyCompression}:
        raise CodecError(
            f"unknown flags {flags:#04x} (known: {[f'{c.value} {c.name.lower()}' for c in BodyCompression]})"
        )
    compression = BodyCompression(flags)
    return Frame(version, type_code, compression, _inflate(body, compression, max_bytes))


def _unique_map(pairs: list[tuple[object, object]]) -> dict[object, object]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueError("a map repeats a key")
    return result


def _unpack_body(body: bytes, max_bytes: int) -> object:
    try:
        return msgpack.unpackb(
            body,
            raw=False,
            strict_map_key=True,
            object_pairs_hook=_unique_map,
            max_bin_len=max_bytes,
            max_str_len=64 * 1024,
            max_array_len=1 << 16,
            max_map_len=1 << 16,
            max_ext_len=0,
        )
    # msgpack raises many types: ExtraData, FormatError, StackError, ValueError, TypeError, ...
    except Exception as exc:
        raise CodecError(f"body is not valid msgpack: {type(exc).__name__}: {exc}") from exc


def _tensor_bytes(blocks: object) -> int:
    if not isinstance(blocks, dict):
        return 0
    params = [p for p in blocks.values() if isinstance(p, dict)]
    return sum(c.nbytes for p in params for c in p.values() if isinstance(c, CompressedTensor))
