"""Tests of fedbe.protocol: frames, tensor encoding, schema validation and hostile input."""

from __future__ import annotations

import copy
import math
import struct
import tracemalloc
import zlib
from dataclasses import dataclass, replace
from typing import Any

import msgpack
import pytest
import torch
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedbe.compression import (
    BlockLayout,
    CompressedState,
    CompressedTensor,
    Level,
    compress_state,
    decompress_state,
)
from fedbe.errors import CodecError
from fedbe.protocol import (
    DEFAULT_MAX_MESSAGE_BYTES,
    HEADER_SIZE,
    MAGIC,
    MESSAGE_CODECS,
    AnnounceMessage,
    BodyCompression,
    CoordinatorStatusMessage,
    EvalResultMessage,
    MessageCodec,
    MessageType,
    NoticeMessage,
    StatusMessage,
    TaskErrorMessage,
    TaskMessage,
    UpdateMessage,
    decode,
    encode,
    pack_frame,
    unpack_frame,
)
from fedbe.recipe import Recipe

HYPOTHESIS = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
LAYOUT: BlockLayout = {
    0: {"self_attn.o_proj.weight": (6, 4), "input_layernorm.weight": (4,)},
    2: {"self_attn.o_proj.weight": (6, 4), "input_layernorm.weight": (4,)},
}


def _delta(seed: int = 0) -> dict[int, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return {bid: {n: torch.randn(s, generator=g) for n, s in p.items()} for bid, p in LAYOUT.items()}


def _update(level: Level = Level.FP32, blocks: CompressedState | None = None, **fields: Any) -> UpdateMessage:
    if blocks is None:
        blocks = compress_state(_delta(), level)[0]
    values: dict[str, Any] = dict(round=3, client_id="edge-7", task_id="task-3-edge-7", level=level)
    values.update(num_samples=120, num_steps=4, mean_loss=2.25, wall_seconds=41.5, peak_memory_bytes=1 << 30)
    values.update(fields)
    return UpdateMessage(blocks=blocks, **values)


def _tiny_update(level: Level = Level.FP32) -> UpdateMessage:
    blocks = compress_state({1: {"w": torch.tensor([[0.5, -1.0, 2.0], [0.0, 1.5, -0.25]])}}, level)[0]
    return _update(level, blocks, client_id="c", task_id="t")


def _seal(message_type: int, flags: int, body: bytes, *, version: int = 4, reserved: int = 0) -> bytes:
    """A frame built from the documented layout, independently of pack_frame."""
    head = MAGIC + struct.pack("<BBBBI", version, message_type, flags, reserved, len(body))
    return head + struct.pack("<I", zlib.crc32(head + body)) + body


def _payload(frame: bytes) -> Any:
    return msgpack.unpackb(unpack_frame(frame).body, raw=False)


def _frame_of(payload: Any, compression: BodyCompression = BodyCompression.NONE) -> bytes:
    return pack_frame(MessageType.UPDATE, msgpack.packb(payload, use_bin_type=True), compression=compression)


def _bytes_of(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).clone().view(torch.uint8) if t.numel() else torch.zeros(0, dtype=torch.uint8)


def _assert_same_blocks(a: CompressedState, b: CompressedState) -> None:
    assert a.keys() == b.keys()
    for bid in a:
        assert a[bid].keys() == b[bid].keys()
        for name, x in a[bid].items():
            y = b[bid][name]
            assert (x.level, x.shape, x.data.dtype) == (y.level, y.shape, y.data.dtype)
            assert torch.equal(_bytes_of(x.data), _bytes_of(y.data))  # bit-exact, -0.0 included
            if x.scales is None or y.scales is None:
                assert x.scales is None and y.scales is None
            else:
                assert torch.equal(x.scales, y.scales)


# ------------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("compression", list(BodyCompression))
@pytest.mark.parametrize("level", list(Level))
def test_every_level_and_body_compression_round_trips_exactly(
    level: Level, compression: BodyCompression
) -> None:
    msg = _update(level)
    frame = encode(msg, compression=compression)
    assert frame[:4] == MAGIC and frame[6] == compression
    back = decode(frame, expected_type=UpdateMessage, expected_layout=LAYOUT)
    assert replace(back, blocks={}) == replace(msg, blocks={})
    _assert_same_blocks(back.blocks, msg.blocks)


def test_fp32_round_trip_is_bit_exact_including_special_values() -> None:
    t = torch.tensor([[0.0, -0.0, 1e-45, -3.4e38], [3.4e38, 1.0 / 3.0, -1e-38, 7.0]])
    msg = _update(Level.FP32, compress_state({5: {"w": t}}, Level.FP32)[0])
    back = decompress_state(decode(encode(msg, compression=BodyCompression.ZSTD)).blocks)[5]["w"]
    assert torch.equal(back.view(torch.int32), t.view(torch.int32))


@pytest.mark.parametrize("shape", [(), (0,), (0, 3), (3, 0), (5,), (2, 3, 2)])
@pytest.mark.parametrize("level", list(Level))
def test_edge_shapes_round_trip(shape: tuple[int, ...], level: Level) -> None:
    msg = _update(level, compress_state({0: {"w": torch.randn(shape)}}, level)[0])
    _assert_same_blocks(decode(encode(msg)).blocks, msg.blocks)


def test_int8_update_reconstructs_gaussian_within_one_percent() -> None:
    delta = {
        0: {"mlp.down_proj.weight": 1e-3 * torch.randn(576, 1536, generator=torch.Generator().manual_seed(3))}
    }
    frame = encode(
        _update(Level.INT8, compress_state(delta, Level.INT8)[0]), compression=BodyCompression.ZSTD
    )
    back = decompress_state(decode(frame).blocks)[0]["mlp.down_proj.weight"]
    original = delta[0]["mlp.down_proj.weight"]
    assert float((back - original).norm() / original.norm()) < 0.01
    assert len(frame) < original.numel() * 1.05  # about one byte per value


def test_decode_accepts_bytearray_and_memoryview_and_rejects_other_types() -> None:
    frame = encode(_tiny_update())
    _assert_same_blocks(decode(memoryview(frame)).blocks, decode(bytearray(frame)).blocks)
    with pytest.raises(CodecError, match="must be bytes"):
        decode(frame.hex())  # type: ignore[call-overload]


def _one_of_each() -> dict[str, Any]:
    """One message of every type, with values that use every wire kind (int8 scales, bf16, a recipe)."""
    values = torch.tensor([[1, -2, 3], [4, 5, -6]], dtype=torch.int8)
    int8 = CompressedTensor(Level.INT8, (2, 3), values, torch.tensor([0.5, 0.25]))
    bias = CompressedTensor(Level.INT8, (2,), torch.tensor([7, -8], dtype=torch.int8), torch.tensor([0.125]))
    bf16 = CompressedTensor(Level.BF16, (2,), torch.tensor([1.5, -2.0]).to(torch.bfloat16))
    return {
        "update": UpdateMessage(
            round=3, client_id="edge-7", task_id="task-3-edge-7", level=Level.INT8,
            blocks={2: {"w": int8, "b": bias}}, num_samples=120, num_steps=4, mean_loss=2.25,
            wall_seconds=41.5, peak_memory_bytes=1 << 30,
        ),
        "announce": AnnounceMessage(
            client_id="edge-7", profile_name="jetson", device_kind="cuda", device_name="Orin", precision="nf4",
            memory_budget_bytes=8 << 30, base_memory_bytes=1 << 30, block_memory_bytes=1 << 24,
            activation_bytes_per_layer=1 << 20, max_trainable_blocks=3, block_step_seconds=0.5,
            layer_forward_seconds=0.01, link_bandwidth_bps=1e7, batch_size=4, max_tokens=128,
            num_examples=240, label_histogram={"sport": 120.0, "tech": 119.5}, base_fingerprint="llama-6L",
        ),
        "status": StatusMessage(client_id="edge-7", state="training", round=3, detail="round 3"),
        "task": TaskMessage(
            round=3, task_id="task-3-edge-7", client_id="edge-7", block_ids=(2, 5), download_level=Level.BF16,
            weights={5: {"norm": bf16}}, upload_level=Level.INT8,
            recipe=Recipe(steps=4, lr=1e-3, distill_lambda=(3.0, 12.0)), deadline_seconds=60.0, seed=11,
            evaluate=True, balance_labels=("sport", "tech"),
        ),
        "task_error": TaskErrorMessage(
            round=3, task_id="task-3-edge-7", client_id="edge-7", code="refused_memory", reason="needs 9 GiB"
        ),
        "notice": NoticeMessage(client_id="edge-7", code="refused", reason="base differs"),
        "eval_result": EvalResultMessage(
            round=3, task_id="eval-3-edge-7", client_id="edge-7", num_examples=60, loss=0.75, accuracy=0.875
        ),
        "coordinator_status": CoordinatorStatusMessage(
            state="running", round=3, base_fingerprint="llama-6L", base_num_layers=6,
            new_layer_indices=(2, 5), source_layers=(1, 4),
        ),
    }  # fmt: skip


# The frames of _one_of_each(), uncompressed, as the hand-written codecs encoded them.
GOLDEN_FRAMES = {
    "update": (
        "46424557040100000901000033ef8d348aa5726f756e6403a9636c69656e745f6964a6656467652d37a77461736b5f69"
        "64ad7461736b2d332d656467652d37a56c6576656ca4696e7438a6626c6f636b739182a2696402a774656e736f727382"
        "a17784a56474797065a4696e7438a57368617065920203a464617461c40601fe030405faa67363616c6573c408000000"
        "3f0000803ea16284a56474797065a4696e7438a573686170659102a464617461c40207f8a67363616c6573c404000000"
        "3eab6e756d5f73616d706c657378a96e756d5f737465707304a96d65616e5f6c6f7373cb4002000000000000ac77616c"
        "6c5f7365636f6e6473cb4044c00000000000b17065616b5f6d656d6f72795f6279746573ce40000000"
    ),
    "announce": (
        "4642455704020000a10100006adf296dde0012a9636c69656e745f6964a6656467652d37ac70726f66696c655f6e616d"
        "65a66a6574736f6eab6465766963655f6b696e64a463756461ab6465766963655f6e616d65a44f72696ea97072656369"
        "73696f6ea36e6634b0626173655f66696e6765727072696e74a86c6c616d612d364cb36d656d6f72795f627564676574"
        "5f6279746573cf0000000200000000b1626173655f6d656d6f72795f6279746573ce40000000b2626c6f636b5f6d656d"
        "6f72795f6279746573ce01000000ba61637469766174696f6e5f62797465735f7065725f6c61796572ce00100000b46d"
        "61785f747261696e61626c655f626c6f636b7303aa62617463685f73697a6504aa6d61785f746f6b656e73cc80ac6e75"
        "6d5f6578616d706c6573ccf0b2626c6f636b5f737465705f7365636f6e6473cb3fe0000000000000b56c617965725f66"
        "6f72776172645f7365636f6e6473cb3f847ae147ae147bb26c696e6b5f62616e6477696474685f627073cb416312d000"
        "000000af6c6162656c5f686973746f6772616d82a573706f7274cb405e000000000000a474656368cb405de000000000"
        "00"
    ),
    "status": (
        "464245570403000037000000d92c52e284a9636c69656e745f6964a6656467652d37a57374617465a8747261696e696e"
        "67a5726f756e6403a664657461696ca7726f756e642033"
    ),
    "task": (
        "4642455704040000c9010000d978adbe8ca5726f756e6403a77461736b5f6964ad7461736b2d332d656467652d37a963"
        "6c69656e745f6964a6656467652d37a9626c6f636b5f696473920205ae646f776e6c6f61645f6c6576656ca462663136"
        "a7776569676874739182a2696405a774656e736f727381a46e6f726d84a56474797065a862666c6f61743136a5736861"
        "70659102a464617461c404c03f00c0a67363616c6573c0ac75706c6f61645f6c6576656ca4696e7438a6726563697065"
        "8da776657273696f6e01a5737465707304a26c72cb3f50624dd2f1a9fca86c725f6465636179cb3ff0000000000000aa"
        "62617463685f73697a6504aa6d61785f746f6b656e73cc80ac7765696768745f6465636179cb0000000000000000ad6d"
        "61785f677261645f6e6f726dcb3ff0000000000000ae64697374696c6c5f6c616d62646192cb4008000000000000cb40"
        "28000000000000ad64697374696c6c5f746f705f6b20ae64697374696c6c5f73616d706c65cc80ac64697374696c6c5f"
        "726f777301ad6c6162656c5f62616c616e6365c3b0646561646c696e655f7365636f6e6473cb404e000000000000a473"
        "6565640ba86576616c75617465c3ae62616c616e63655f6c6162656c7392a573706f7274a474656368"
    ),
    "task_error": (
        "464245570405000056000000764bc99885a5726f756e6403a77461736b5f6964ad7461736b2d332d656467652d37a963"
        "6c69656e745f6964a6656467652d37a4636f6465ae726566757365645f6d656d6f7279a6726561736f6eab6e65656473"
        "203920476942"
    ),
    "notice": (
        "464245570406000033000000bc9397a083a9636c69656e745f6964a6656467652d37a4636f6465a772656675736564a6"
        "726561736f6eac626173652064696666657273"
    ),
    "eval_result": (
        "46424557040700005d00000069df6e9f86a5726f756e6403a77461736b5f6964ad6576616c2d332d656467652d37a963"
        "6c69656e745f6964a6656467652d37ac6e756d5f6578616d706c65733ca46c6f7373cb3fe8000000000000a861636375"
        "72616379cb3fec000000000000"
    ),
    "coordinator_status": (
        "4642455704080000670000008d025d8f86a57374617465a772756e6e696e67a5726f756e6403b0626173655f66696e67"
        "65727072696e74a86c6c616d612d364caf626173655f6e756d5f6c617965727306b16e65775f6c617965725f696e6469"
        "636573920205ad736f757263655f6c6179657273920104"
    ),
}


def test_every_message_type_keeps_its_wire_bytes() -> None:
    """A change here changes the wire (it needs a new protocol or recipe version), never a refactoring."""
    messages = _one_of_each()
    assert [type(m) for m in messages.values()] == [c.cls for c in MESSAGE_CODECS.values()]
    for name, msg in messages.items():
        frame = encode(msg)
        assert frame.hex() == GOLDEN_FRAMES[name], name
        back = decode(frame, expected_type=type(msg))
        assert encode(back) == frame, name
        if not isinstance(msg, UpdateMessage | TaskMessage):  # tensors do not compare with ==
            assert back == msg, name


# ------------------------------------------------------------------------------- frame integrity


@pytest.mark.parametrize("compression", [BodyCompression.NONE, BodyCompression.ZLIB])
def test_every_single_bit_flip_is_rejected(compression: BodyCompression) -> None:
    frame = encode(_tiny_update(), compression=compression)
    assert len(frame) < 400
    for i in range(len(frame) * 8):
        flipped = bytearray(frame)
        flipped[i // 8] ^= 1 << (i % 8)
        with pytest.raises(CodecError):
            decode(bytes(flipped))


def test_truncation_at_every_length_is_rejected() -> None:
    frame = encode(_tiny_update(), compression=BodyCompression.ZSTD)
    for n in range(len(frame)):
        with pytest.raises(CodecError, match="truncated"):
            decode(frame[:n])


def test_frame_layout_is_as_documented() -> None:
    body = msgpack.packb(_payload(encode(_tiny_update())), use_bin_type=True)
    msg = decode(_seal(MessageType.UPDATE, BodyCompression.NONE, body))
    assert msg.client_id == "c" and HEADER_SIZE == 16


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda f: b"XXXX" + f[4:], "not a fedbe frame"),
        (
            lambda f: f[:4] + b"\x01" + f[5:],
            r"unsupported protocol version 1; this build supports \[4\]: run the same",
        ),
        (lambda f: f[:4] + b"\x03" + f[5:], r"unsupported protocol version 3; this build supports \[4\]"),
        (lambda f: f[:4] + b"\x05" + f[5:], r"unsupported protocol version 5; this build supports \[4\]"),
        (lambda f: f[:-1] + bytes([f[-1] ^ 0x40]), "frame corrupted in transit"),
        (lambda f: f[:12] + b"\0\0\0\0" + f[16:], "frame corrupted in transit"),
        (lambda f: f + b"\0", "truncated or padded"),
        (
            lambda f: _seal(77, 0, f[16:]),
            r"unknown message type 77 \(known: UpdateMessage \(type 1\), AnnounceMessage",
        ),
        (lambda f: _seal(1, 9, f[16:]), "unknown flags 0x09"),
        (lambda f: _seal(1, 0, f[16:], reserved=1), "reserved header byte"),
        (lambda f: _seal(1, 1, f[16:]), "zlib body is malformed"),
        (lambda f: _seal(1, 2, f[16:]), "zstd body is malformed"),
        (lambda f: _seal(1, 1, zlib.compress(f[16:])[:-2]), "zlib body is truncated"),
        (lambda f: _seal(1, 1, zlib.compress(f[16:]) + b"x"), "followed by extra bytes"),
        (lambda f: _seal(1, 2, zstandard.ZstdCompressor().compress(f[16:])[:-3]), "zstd body is truncated"),
        (lambda f: _seal(1, 2, zstandard.ZstdCompressor().compress(f[16:]) * 2), "more data than"),
        (
            lambda f: _seal(1, 2, zstandard.ZstdCompressor(write_content_size=False).compress(f[16:])),
            "does not declare its content size",
        ),
    ],
)
def test_header_and_body_errors_say_what_is_wrong(mutate: Any, message: str) -> None:
    frame = encode(_tiny_update())
    with pytest.raises(CodecError, match=message):
        decode(mutate(frame))


def test_oversized_frames_are_refused_on_encode_and_on_decode() -> None:
    msg = _update(Level.FP32)
    frame = encode(msg)
    assert decode(encode(msg, max_bytes=len(frame)), max_bytes=len(frame)) is not None
    with pytest.raises(CodecError, match="exceeds the limit"):
        encode(msg, max_bytes=len(frame) - 1)
    with pytest.raises(CodecError, match="exceeds the limit"):
        encode(msg, max_bytes=100)  # refused before any tensor is copied
    with pytest.raises(CodecError, match=f"frame of {len(frame)} bytes exceeds the limit"):
        decode(frame, max_bytes=len(frame) - 1)
    assert DEFAULT_MAX_MESSAGE_BYTES == 256 * 1024 * 1024


@pytest.mark.parametrize("compression", [BodyCompression.ZLIB, BodyCompression.ZSTD])
def test_decompression_bomb_is_rejected_without_inflating_it(compression: BodyCompression) -> None:
    max_bytes = 1 << 20
    zeros = bytes(64 << 20)
    body = zlib.compress(zeros, 9) if compression is BodyCompression.ZLIB else zstandard.compress(zeros)
    del zeros
    frame = _seal(MessageType.UPDATE, compression, body)
    assert len(frame) < max_bytes
    tracemalloc.start()
    try:
        with pytest.raises(CodecError, match="inflates beyond the limit"):
            decode(frame, max_bytes=max_bytes)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * max_bytes


# ------------------------------------------------------------------------------- schema and layout


def _with(path: tuple[Any, ...], value: Any = None, *, delete: bool = False) -> dict[str, Any]:
    payload = _payload(encode(_update(Level.INT8 if "int8" in path else Level.FP32)))
    path = tuple(p for p in path if p != "int8")
    node = payload
    for key in path[:-1]:
        node = node[key]
    if delete:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return payload


TENSOR = ("blocks", 0, "tensors", "self_attn.o_proj.weight")
NAN32 = struct.pack("<24f", *([1.0] * 23 + [math.nan]))


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (_with(("round",), delete=True), r"missing fields \['round'\]"),
        (_with(("extra",), 1), r"unexpected fields \['extra'\]"),
        (_with(("round",), True), "'round' must be an integer, got bool"),
        (_with(("round",), 1.0), "'round' must be an integer, got float"),
        (_with(("num_samples",), -1), "'num_samples' must be between 0 and"),
        (_with(("peak_memory_bytes",), 2**64 - 1), "'peak_memory_bytes' must be between 0 and"),
        (_with(("mean_loss",), math.nan), "'mean_loss' must be finite"),
        (_with(("wall_seconds",), math.inf), "'wall_seconds' must be finite"),
        (_with(("wall_seconds",), -1.0), "'wall_seconds' must be at least 0"),
        (_with(("mean_loss",), "low"), "'mean_loss' must be a number, got str"),
        (_with(("client_id",), ""), "'client_id' must be 1 to"),
        (_with(("task_id",), b"t"), "'task_id' must be a string, got bytes"),
        (_with(("level",), "int4"), "unknown level 'int4'"),
        (_with(("blocks",), {}), "blocks must be a list, got dict"),
        (_with(("blocks", 0, "id"), -2), "'id' must be between 0"),
        (_with(("blocks", 1, "id"), 0), "block 0 appears twice"),
        (_with(("blocks", 0, "tensors"), []), "block 0 tensors must be a map"),
        (
            _with((*TENSOR[:-1], ""), _with(TENSOR, None)["blocks"][0]["tensors"]["input_layernorm.weight"]),
            "parameter name must be 1 to",
        ),
        (_with((*TENSOR, "dtype"), "float64"), "unknown dtype 'float64'"),
        (_with((*TENSOR, "dtype"), "int8"), "dtype int8 is not allowed at level fp32"),
        (_with((*TENSOR, "shape"), "6x4"), "shape must be a list"),
        (_with((*TENSOR, "shape"), [6, -4]), "shape entry must be between 0"),
        (_with((*TENSOR, "shape"), [1] * 9), "at most 8"),
        (_with((*TENSOR, "shape"), [4, 6.0]), "shape entry must be an integer"),
        (_with((*TENSOR, "shape"), [6, 5]), r"shape \(6, 5\) needs 120 bytes of float32, got 96"),
        (_with((*TENSOR, "shape"), [2**31 - 1] * 8), "needs"),
        (_with((*TENSOR, "data"), "abc"), "data must be bin, got str"),
        (_with((*TENSOR, "data"), NAN32), "data holds NaN or Inf"),
        (_with((*TENSOR, "scales"), b"\0" * 24), "level fp32 carries no scales"),
        (_with((*TENSOR, "scales"), None, delete=True), r"missing fields \['scales'\]"),
        (_with(("int8", *TENSOR, "scales"), None), "int8 needs scales as bin of 6 float32"),
        (_with(("int8", *TENSOR, "scales"), b"\0" * 20), "int8 needs scales as bin of 6 float32"),
        (
            _with(("int8", *TENSOR, "scales"), struct.pack("<6f", 1, 1, 1, 1, math.inf, 1)),
            "finite and non-neg",
        ),
        (
            _with(("int8", *TENSOR, "scales"), struct.pack("<6f", 1, 1, 1, 1, -1, 1)),
            "finite and non-negative",
        ),
        ([1, 2, 3], "update must be a map, got list"),
    ],
)
def test_schema_errors_say_which_field_is_wrong(payload: Any, message: str) -> None:
    with pytest.raises(CodecError, match=message):
        decode(_frame_of(payload))


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "not valid msgpack"),
        (b"\xc1", "not valid msgpack"),
        (msgpack.packb({"a": 1}) + b"\x00", "ExtraData"),
        (b"\x91" * 5000 + b"\xc0", "not valid msgpack"),
        (msgpack.packb({1: 2}), "not valid msgpack"),
        (msgpack.packb(msgpack.ExtType(5, b"abcd")), "not valid msgpack"),
        (b"\xa2\xff\xfe", "UnicodeDecodeError"),
        (b"\x82\xa1a\x01\xa1a\x02", "repeats a key"),
        (b"\xdb\xff\xff\xff\xff", "not valid msgpack"),
    ],
)
def test_malformed_msgpack_is_a_codec_error(body: bytes, message: str) -> None:
    with pytest.raises(CodecError, match=message):
        decode(_seal(MessageType.UPDATE, BodyCompression.NONE, body))


def test_layout_mismatch_names_block_parameter_and_shapes() -> None:
    frame = encode(_update())
    wrong = {bid: dict(params) for bid, params in LAYOUT.items()}
    wrong[2]["self_attn.o_proj.weight"] = (4, 6)
    with pytest.raises(
        CodecError, match=r"block 2 parameter 'self_attn.o_proj.weight' has shape \(6, 4\), expected \(4, 6\)"
    ):
        decode(frame, expected_layout=wrong)
    with pytest.raises(CodecError, match="block 2 is not in the expected layout"):
        decode(frame, expected_layout={0: LAYOUT[0]})
    with pytest.raises(CodecError, match="block 2 was not assigned"):
        decode(frame, expected_layout=LAYOUT, allowed_blocks=[0])
    extra: BlockLayout = {0: {**LAYOUT[0], "mlp.up_proj.weight": (6, 4)}, 2: {"input_layernorm.weight": (4,)}}
    with pytest.raises(CodecError) as info:
        decode(frame, expected_layout=extra)
    assert "block 0 parameter 'mlp.up_proj.weight' is missing" in str(info.value)
    assert "block 2 parameter 'self_attn.o_proj.weight' is not part of the block" in str(info.value)
    subset = decode(
        encode(_update(blocks={2: _update().blocks[2]})), expected_layout=LAYOUT, allowed_blocks={2}
    )
    assert set(subset.blocks) == {2}


def test_encode_refuses_what_decode_would_reject() -> None:
    nan = CompressedTensor(Level.FP32, (2,), torch.tensor([1.0, math.nan]))
    cases = [
        (_update(blocks={0: {"w": nan}}), "block 0 parameter 'w': data holds NaN"),
        (_update(round=True), "round must be an integer, got bool"),
        (_update(num_steps=-1), "num_steps must be between 0"),
        (_update(client_id=""), "client_id must be 1 to"),
        (_update(client_id="\ud800"), "not valid unicode"),
        (_update(mean_loss=math.inf), "mean_loss must be finite"),
        (_update(Level.INT8, blocks=_update(Level.FP32).blocks), "expected a CompressedTensor at level int8"),
        (_update(blocks={-1: {}}), "block id must be between 0"),
    ]
    for msg, message in cases:
        with pytest.raises(CodecError, match=message):
            encode(msg)
    with pytest.raises(CodecError, match="not a message type"):
        encode("hello")  # type: ignore[arg-type]


@dataclass(frozen=True)
class _Ping:
    text: str


def test_registry_dispatches_new_types_and_checks_the_expected_type(monkeypatch: pytest.MonkeyPatch) -> None:
    codec = MessageCodec(_Ping, lambda m: {"text": m.text}, lambda p: _Ping(p["text"]))  # type: ignore[index]
    monkeypatch.setitem(MESSAGE_CODECS, 250, codec)
    frame = encode(_Ping("hi"))  # type: ignore[arg-type]
    assert frame[5] == 250 and decode(frame) == _Ping("hi")
    with pytest.raises(CodecError, match=r"expected a UpdateMessage message, got _Ping \(type 250\)"):
        decode(frame, expected_type=UpdateMessage)
    with pytest.raises(CodecError, match="carries no blocks"):
        decode(frame, expected_layout=LAYOUT)
    with pytest.raises(CodecError, match=r"expected a _Ping message, got UpdateMessage \(type 1\)"):
        decode(encode(_tiny_update()), expected_type=_Ping)


# ------------------------------------------------------------------------------- hostile input


def _decodes_or_codec_error(frame: bytes) -> None:
    """The contract: success or CodecError, nothing else; what decodes must also encode."""
    try:
        msg = decode(frame, max_bytes=1 << 20)
    except CodecError:
        return
    encode(msg)


VALID_FRAMES = [encode(_tiny_update(level), compression=c) for level in Level for c in BodyCompression]


@HYPOTHESIS
@given(st.binary(max_size=300) | st.binary(max_size=300).map(lambda b: MAGIC + b"\x01" + b))
def test_random_bytes_never_escape_as_other_errors(data: bytes) -> None:
    _decodes_or_codec_error(data)


@HYPOTHESIS
@given(st.sampled_from(VALID_FRAMES), st.data())
def test_mutated_frames_never_escape_as_other_errors(frame: bytes, data: st.DataObject) -> None:
    buf = bytearray(frame)
    for _ in range(data.draw(st.integers(1, 4))):
        kind = data.draw(st.sampled_from(["flip", "truncate", "insert", "delete"]))
        at = data.draw(st.integers(0, max(len(buf) - 1, 0)))
        if kind == "flip" and buf:
            buf[at] ^= 1 << data.draw(st.integers(0, 7))
        elif kind == "truncate":
            del buf[at:]
        elif kind == "insert":
            buf[at:at] = data.draw(st.binary(min_size=1, max_size=8))
        else:
            del buf[at : at + data.draw(st.integers(1, 8))]
    if bytes(buf) == frame:  # e.g. the same bit flipped twice
        return
    with pytest.raises(CodecError):
        decode(bytes(buf))  # the CRC catches every change that keeps the length


_SCALARS = (
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=12)
    | st.binary(max_size=40) | st.sampled_from(["fp32", "int8", "bf16", "float16", "int8", "id", "shape"])
)  # fmt: skip
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)
VALID_PAYLOADS = [_payload(encode(_tiny_update(level))) for level in Level]


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix] if prefix else []
    children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
    for key, child in children:
        out += _paths(child, (*prefix, key))
    return out


@HYPOTHESIS
@given(st.sampled_from(VALID_PAYLOADS), st.data(), st.sampled_from(list(BodyCompression)))
def test_mutated_payloads_in_valid_frames_never_escape(
    payload: Any, data: st.DataObject, c: BodyCompression
) -> None:
    payload = copy.deepcopy(payload)
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(_paths(payload)))
        node = payload
        for key in path[:-1]:
            node = node[key]
        action = data.draw(st.sampled_from(["replace", "replace", "delete", "add"]))
        if action == "replace":
            node[path[-1]] = data.draw(_VALUES)
        elif action == "delete":
            del node[path[-1]]
        elif isinstance(node, dict):
            node[data.draw(st.text(max_size=8))] = data.draw(_VALUES)
        else:
            node.append(data.draw(_VALUES))
    _decodes_or_codec_error(_frame_of(payload, c))


def _mostly(good: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``good`` three times in four, otherwise any value."""
    return st.integers(0, 3).flatmap(lambda i: _VALUES if i == 0 else good)


@st.composite
def _update_like_payloads(draw: st.DrawFn) -> dict[str, Any]:
    """Payloads with the right field names and random, often almost right, tensors."""
    level = draw(st.sampled_from(list(Level)))
    names = {Level.FP32: "float32", Level.FP16: "float16", Level.BF16: "bfloat16", Level.INT8: "int8"}
    shape = draw(_mostly(st.lists(st.integers(0, 4), max_size=3)))
    # the data is sized from the shape only when it is one the good strategy draws: a wild value
    # (any list of huge ints) would ask for an astronomically large blob and a MemoryError here
    good_shape = (
        isinstance(shape, list) and len(shape) <= 3 and all(type(d) is int and 0 <= d <= 4 for d in shape)
    )
    numel, rows = (math.prod(shape), shape[0] if len(shape) > 1 else 1) if good_shape else (3, 1)
    size = max(numel * {Level.FP32: 4, Level.INT8: 1}.get(level, 2) + draw(st.sampled_from([0, 0, 1, -1])), 0)
    tensor = {
        "dtype": draw(_mostly(st.just(names[level]) | st.sampled_from(sorted(names.values())))),
        "shape": shape,
        "data": draw(_mostly(st.binary(min_size=size, max_size=size) | st.just(b"\xff" * size))),
        "scales": draw(_mostly(st.none() | st.binary(min_size=4 * rows, max_size=4 * rows))),
    }
    payload = _payload(encode(_tiny_update(level)))
    payload["blocks"] = [{"id": draw(_mostly(st.integers(0, 3))), "tensors": {"w": tensor}}]
    if draw(st.integers(0, 3)) == 0:
        payload[draw(st.sampled_from(sorted(payload)))] = draw(_VALUES)
    return payload


@HYPOTHESIS
@given(_VALUES | _update_like_payloads(), st.sampled_from(list(BodyCompression)))
def test_random_payloads_in_valid_frames_never_escape(payload: Any, c: BodyCompression) -> None:
    _decodes_or_codec_error(_frame_of(payload, c))


def _task(**overrides: Any) -> TaskMessage:
    fields: dict[str, Any] = dict(
        round=2, task_id="t", client_id="c", block_ids=(0,), download_level=Level.FP32,
        weights=compress_state({0: {"w": torch.ones(3)}}, Level.FP32)[0], upload_level=Level.INT8,
        recipe=Recipe(steps=4, lr=1e-3, batch_size=4, max_tokens=32, distill_lambda=(3.0, 12.0)),
        deadline_seconds=60.0, seed=1, evaluate=False,
    )  # fmt: skip
    fields.update(overrides)
    return TaskMessage(**fields)


def test_a_task_carries_the_labels_to_balance_over() -> None:
    for labels in ((), ("business", "politics", "sport")):
        got = decode(encode(_task(balance_labels=labels)), expected_type=TaskMessage)
        assert got.balance_labels == labels and got.recipe.steps == 4
    good = _payload(encode(_task(balance_labels=("a", "b"))))
    for value, message in (
        ("a,b", "balance_labels must be a list of label names, got str"),
        (["a", "a"], "balance_labels repeats a label"),
        (["a", 3], "balance_labels label must be a string"),
        (["x"] * 1025, "at most 1024"),
    ):
        payload = {**good, "balance_labels": value}
        frame = pack_frame(MessageType.TASK, msgpack.packb(payload, use_bin_type=True))
        with pytest.raises(CodecError, match=message):
            decode(frame)
    with pytest.raises(CodecError, match="repeats a label"):
        encode(_task(balance_labels=("a", "a")))


def test_a_task_carries_its_recipe_as_one_versioned_field() -> None:
    task = _task()
    got = decode(encode(task), expected_type=TaskMessage)
    assert got.recipe == task.recipe and got.recipe.distill_lambda == (3.0, 12.0)
    good = _payload(encode(task))
    assert good["recipe"]["version"] == 1 and good["recipe"]["steps"] == 4
    for recipe, message in (
        ({**good["recipe"], "steps": 0}, "steps must be a whole number >= 1"),
        ({**good["recipe"], "lr": "fast"}, "lr must be a number"),
        ({**good["recipe"], "balance_form": "vocab"}, "unknown recipe field"),
        ({k: v for k, v in good["recipe"].items() if k != "distill_rows"}, "distill_rows' is missing"),
        ({**good["recipe"], "version": 2}, "recipe version 2"),
        ([1, 2], "recipe must be a map"),
    ):
        frame = pack_frame(MessageType.TASK, msgpack.packb({**good, "recipe": recipe}, use_bin_type=True))
        with pytest.raises(CodecError, match=message):
            decode(frame)
