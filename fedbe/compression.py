"""Compression of block updates: fp32/fp16/bf16 casts and int8 per-row quantization.

Pure torch: tensors in, tensors and dataclasses out. Nothing here touches bytes; the wire format
of a :class:`CompressedTensor` lives in :mod:`fedbe.protocol`.

Shared data model:

* :data:`BlockState` -- new-block id -> parameter name relative to the block
  (``"self_attn.o_proj.weight"``) -> float32 tensor.
* :data:`BlockLayout` -- the same keys with the expected shapes; a receiver knows it from its model.

INT8 is symmetric absmax quantization per row. The rows of a tensor with ``ndim >= 2`` are its
first dimension (the tensor is viewed as ``(shape[0], -1)``); a 1-D tensor is one row; a 0-d
tensor is one row of one element. ``scale = absmax(row) / 127`` and
``q = clamp(round(x / scale), -127, 127)``; an all-zero row gets scale 0 and decodes to exact zeros.

Error feedback (:func:`compress_state`): a client keeps the part of its update that compression
lost and adds it to the next round's update, so the sum of what the server receives over K rounds
differs from the sum of the true updates by one round's quantization error at most, instead of an
error that grows with K.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum

import torch

from fedbe.errors import BlockStateError

BlockState = dict[int, dict[str, torch.Tensor]]
"""New-block id -> parameter name relative to the block -> tensor (float32 normally)."""

BlockLayout = dict[int, dict[str, tuple[int, ...]]]
"""New-block id -> parameter name relative to the block -> expected shape."""

INT8_MAX = 127
"""Largest quantized magnitude; -128 is never produced so the code is symmetric."""


class Level(str, Enum):
    """How the values of an update travel: a float cast or int8 with per-row scales."""

    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"
    INT8 = "int8"


STORAGE_DTYPE: dict[Level, torch.dtype] = {
    Level.FP32: torch.float32,
    Level.FP16: torch.float16,
    Level.BF16: torch.bfloat16,
    Level.INT8: torch.int8,
}
"""The dtype of :attr:`CompressedTensor.data` at each level."""


def rows_and_columns(shape: tuple[int, ...]) -> tuple[int, int]:
    """The (rows, columns) view that INT8 quantizes per row (see the module docstring)."""
    if len(shape) == 0:
        return 1, 1
    if len(shape) == 1:
        return 1, shape[0]
    return shape[0], math.prod(shape[1:])


@dataclass(frozen=True)
class CompressedTensor:
    """One tensor as it travels: ``data`` in the level's storage dtype, plus int8 row scales.

    ``data`` has the tensor's own ``shape``; ``scales`` is a float32 vector of one scale per row
    (see :func:`rows_and_columns`) at :attr:`Level.INT8` and ``None`` at every other level.
    """

    level: Level
    shape: tuple[int, ...]
    data: torch.Tensor
    scales: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.level, Level):
            raise BlockStateError(f"level must be a Level, got {self.level!r}")
        if any(isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in self.shape):
            raise BlockStateError(f"shape must be non-negative ints, got {self.shape!r}")
        expected = STORAGE_DTYPE[self.level]
        if self.data.dtype != expected:
            raise BlockStateError(f"{self.level.value} data must be {expected}, got {self.data.dtype}")
        if tuple(self.data.shape) != self.shape:
            raise BlockStateError(f"data shape {tuple(self.data.shape)} differs from shape {self.shape}")
        if self.level is Level.INT8:
            rows, _ = rows_and_columns(self.shape)
            if self.scales is None or self.scales.dtype != torch.float32 or self.scales.shape != (rows,):
                got = None if self.scales is None else (self.scales.dtype, tuple(self.scales.shape))
                raise BlockStateError(f"int8 needs float32 scales of shape ({rows},), got {got}")
        elif self.scales is not None:
            raise BlockStateError(f"{self.level.value} carries no scales")

    @property
    def nbytes(self) -> int:
        """Bytes of values and scales (what dominates the message size)."""
        scale_bytes = 0 if self.scales is None else self.scales.numel() * self.scales.element_size()
        return self.data.numel() * self.data.element_size() + scale_bytes


CompressedState = dict[int, dict[str, CompressedTensor]]
"""A :data:`BlockState` with every tensor compressed."""


def all_finite(t: torch.Tensor) -> bool:
    """True if ``t`` holds no NaN or Inf (one reduction pass; NaN propagates through aminmax)."""
    if t.numel() == 0 or not t.is_floating_point():
        return True
    low, high = torch.aminmax(t)
    return math.isfinite(float(low)) and math.isfinite(float(high))


_DIVERGED = "tensor holds NaN or Inf values; the update diverged and can not be sent"


def compress(t: torch.Tensor, level: Level) -> CompressedTensor:
    """Compress one tensor; raises :class:`BlockStateError` if it holds NaN/Inf or overflows fp16."""
    x = t.detach().to(torch.float32)
    shape = tuple(x.shape)
    if level is Level.INT8:
        return _quantize_int8(x, shape)
    if not all_finite(x):
        raise BlockStateError(_DIVERGED)
    data = x.to(STORAGE_DTYPE[level], copy=True).contiguous()
    if level is not Level.FP32 and not all_finite(data):
        raise BlockStateError(f"values exceed the {level.value} range; send this update as bf16 or fp32")
    return CompressedTensor(level=level, shape=shape, data=data)


def _quantize_int8(x: torch.Tensor, shape: tuple[int, ...]) -> CompressedTensor:
    rows, cols = rows_and_columns(shape)
    matrix = x.reshape(rows, cols)
    if cols == 0:  # rows without columns are zero rows
        scales = torch.zeros(rows, dtype=torch.float32)
    else:
        low, high = torch.aminmax(matrix, dim=1)  # a NaN or Inf in a row reaches its absmax
        scales = torch.maximum(high, low.neg()) / INT8_MAX
        if not all_finite(scales):
            raise BlockStateError(_DIVERGED)
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    q = (matrix / safe[:, None]).round_().clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return CompressedTensor(level=Level.INT8, shape=shape, data=q.reshape(shape), scales=scales.contiguous())


def decompress(c: CompressedTensor) -> torch.Tensor:
    """The float32 tensor that ``c`` stands for (a fresh tensor, never a view of ``c.data``)."""
    if c.level is Level.INT8:
        if c.scales is None:  # excluded by CompressedTensor.__post_init__; narrows the type
            raise BlockStateError("int8 tensor without scales")
        rows, cols = rows_and_columns(c.shape)
        matrix = c.data.reshape(rows, cols).to(torch.float32) * c.scales[:, None]
        return matrix.reshape(c.shape)
    return c.data.to(torch.float32, copy=True)


def layout_of(state: Mapping[int, Mapping[str, torch.Tensor | CompressedTensor]]) -> BlockLayout:
    """The shapes of every tensor in ``state`` (plain or compressed)."""
    return {bid: {name: tuple(t.shape) for name, t in params.items()} for bid, params in state.items()}


def layout_problems(
    actual: Mapping[int, Mapping[str, tuple[int, ...]]],
    expected: Mapping[int, Mapping[str, tuple[int, ...]]],
    *,
    require_all_blocks: bool = True,
) -> list[str]:
    """Every way ``actual`` differs from ``expected``, one readable line each (empty if it matches).

    Within a block the parameter names must match exactly and every shape must match. With
    ``require_all_blocks=False`` blocks of ``expected`` may be absent from ``actual``.
    """
    problems: list[str] = []
    for bid in sorted(set(actual) - set(expected)):
        problems.append(f"block {bid} is not in the expected layout (expected blocks {sorted(expected)})")
    if require_all_blocks:
        for bid in sorted(set(expected) - set(actual)):
            problems.append(f"block {bid} is missing")
    for bid in sorted(set(actual) & set(expected)):
        got, want = actual[bid], expected[bid]
        for name in sorted(set(want) - set(got)):
            problems.append(f"block {bid} parameter {name!r} is missing")
        for name in sorted(set(got) - set(want)):
            problems.append(f"block {bid} parameter {name!r} is not part of the block")
        for name in sorted(set(got) & set(want)):
            if tuple(got[name]) != tuple(want[name]):
                shapes = f"{tuple(got[name])}, expected {tuple(want[name])}"
                problems.append(f"block {bid} parameter {name!r} has shape {shapes}")
    return problems


def compress_state(
    delta: BlockState, level: Level, residual: BlockState | None = None
) -> tuple[CompressedState, BlockState]:
    """Compress ``delta + residual`` and return it with the new residual (error feedback).

    The new residual is ``(delta + residual) - decompress(compressed)``; at :attr:`Level.FP32` it
    is exactly zero. Pass ``residual=None`` in the first round (same as a zero residual).
    """
    if residual is not None:
        problems = layout_problems(layout_of(residual), layout_of(delta))
        if problems:
            raise BlockStateError("residual does not match the update: " + "; ".join(problems))
    compressed: CompressedState = {}
    new_residual: BlockState = {}
    for bid, params in delta.items():
        compressed[bid], new_residual[bid] = {}, {}
        for name, t in params.items():
            target = t.detach().to(torch.float32)
            if residual is not None:
                target = target + residual[bid][name].to(torch.float32)
            try:
                c = compress(target, level)
            except BlockStateError as exc:
                raise BlockStateError(f"block {bid} parameter {name!r}: {exc}") from exc
            compressed[bid][name] = c
            if level is Level.FP32:
                new_residual[bid][name] = torch.zeros_like(target)
            else:
                new_residual[bid][name] = target - decompress(c)
    return compressed, new_residual


def decompress_state(compressed: Mapping[int, Mapping[str, CompressedTensor]]) -> BlockState:
    """The float32 :data:`BlockState` that ``compressed`` stands for."""
    return {bid: {name: decompress(c) for name, c in params.items()} for bid, params in compressed.items()}
