"""Tests of fedbe.compression: casts, int8 per-row quantization and error feedback."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, arrays

from fedbe.compression import (
    INT8_MAX,
    BlockLayout,
    BlockState,
    CompressedTensor,
    Level,
    all_finite,
    compress,
    compress_state,
    decompress,
    decompress_state,
    layout_of,
    layout_problems,
    rows_and_columns,
)
from fedbe.errors import BlockStateError


def _state(seed: int = 0, scale: float = 1.0) -> BlockState:
    g = torch.Generator().manual_seed(seed)
    return {
        4: {
            "self_attn.o_proj.weight": scale * torch.randn(16, 16, generator=g),
            "mlp.down_proj.weight": scale * torch.randn(16, 40, generator=g),
            "input_layernorm.weight": scale * torch.randn(16, generator=g),
        },
        9: {"mlp.down_proj.weight": scale * torch.randn(16, 40, generator=g)},
    }


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


def test_fp32_round_trips_bit_exactly_including_special_values() -> None:
    t = torch.tensor([0.0, -0.0, 1e-45, -1e-45, 3.4e38, -3.4e38, 1.0 / 3.0, 1e-38])
    t = torch.cat([t, torch.randn(1000)]).reshape(4, -1)
    c = compress(t, Level.FP32)
    assert c.data.dtype == torch.float32 and c.scales is None
    assert torch.equal(_bits(decompress(c)), _bits(t))  # -0.0 and subnormals survive


@pytest.mark.parametrize("level", [Level.FP16, Level.BF16])
def test_half_levels_round_trip_their_own_dtype_exactly(level: Level) -> None:
    dtype = torch.float16 if level is Level.FP16 else torch.bfloat16
    t = torch.randn(8, 33).to(dtype).to(torch.float32)  # representable values
    c = compress(t, level)
    assert c.data.dtype == dtype
    assert torch.equal(decompress(c), t)
    assert torch.equal(compress(decompress(c), level).data, c.data)


def test_half_levels_lose_precision_on_general_values() -> None:
    t = torch.randn(64, 64)
    assert not torch.equal(decompress(compress(t, Level.BF16)), t)
    err = (decompress(compress(t, Level.BF16)) - t).norm() / t.norm()
    assert 0 < err < 5e-3


def test_int8_relative_error_on_gaussian_is_below_one_percent() -> None:
    t = torch.randn(576, 1536, generator=torch.Generator().manual_seed(1))
    c = compress(t, Level.INT8)
    assert c.data.dtype == torch.int8 and c.scales is not None and c.scales.shape == (576,)
    err = float((decompress(c) - t).norm() / t.norm())
    assert 1e-4 < err < 0.01
    assert int(c.data.abs().max()) == INT8_MAX  # the absmax of each row maps to +-127


def test_int8_scales_are_per_row_not_per_tensor() -> None:
    t = torch.randn(4, 256, generator=torch.Generator().manual_seed(2))
    t[0] *= 1000.0  # one loud row must not cost the other rows their precision
    back = decompress(compress(t, Level.INT8))
    for row in range(1, 4):
        assert float((back[row] - t[row]).norm() / t[row].norm()) < 0.01


def test_int8_zero_rows_get_scale_zero_and_decode_to_exact_zeros() -> None:
    t = torch.randn(5, 7)
    t[1] = 0.0
    t[3] = 0.0
    c = compress(t, Level.INT8)
    assert c.scales is not None
    assert float(c.scales[1]) == 0.0 and float(c.scales[3]) == 0.0
    back = decompress(c)
    assert not torch.isnan(back).any()
    assert torch.equal(back[1], torch.zeros(7)) and torch.equal(back[3], torch.zeros(7))
    assert torch.equal(decompress(compress(torch.zeros(3, 3), Level.INT8)), torch.zeros(3, 3))


@pytest.mark.parametrize(
    ("shape", "rows"),
    [((), 1), ((7,), 1), ((3, 4), 3), ((2, 3, 4), 2), ((0,), 1), ((0, 5), 0), ((3, 0), 3), ((1, 1), 1)],
)
@pytest.mark.parametrize("level", list(Level))
def test_every_shape_keeps_its_shape(shape: tuple[int, ...], rows: int, level: Level) -> None:
    t = torch.randn(shape)
    c = compress(t, level)
    assert c.shape == shape and tuple(c.data.shape) == shape
    if level is Level.INT8:
        assert rows_and_columns(shape)[0] == rows
        assert c.scales is not None and c.scales.shape == (rows,)
    back = decompress(c)
    assert back.shape == t.shape and back.dtype == torch.float32
    assert torch.allclose(back, t, rtol=0.02, atol=0.02)


@settings(max_examples=200, deadline=None)
@given(
    arrays(
        np.float32,
        array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=6),
        elements=st.floats(-(2.0**99), 2.0**99, width=32),
    )
)
def test_int8_error_is_at_most_half_a_step_per_element(values: np.ndarray) -> None:
    t = torch.from_numpy(values.copy())
    c = compress(t, Level.INT8)
    assert c.scales is not None
    rows, cols = rows_and_columns(tuple(t.shape))
    err = (decompress(c) - t).abs().reshape(rows, cols)
    bound = c.scales[:, None] * 0.5 * (1 + 1e-5) + 1e-37
    assert bool((err <= bound).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_all_finite_finds_a_bad_value_at_every_position(dtype: torch.dtype, bad: float) -> None:
    t = torch.randn(3, 45).to(dtype)
    assert all_finite(t) and all_finite(torch.zeros(0, 3)) and all_finite(t.to(torch.int8))
    for i in range(t.numel()):
        u = t.clone()
        u.view(-1)[i] = bad
        assert not all_finite(u)
        assert all_finite(u[:, 1:]) == (i % 45 == 0)  # a strided view, without column 0


def test_compress_rejects_non_finite_and_fp16_overflow() -> None:
    for level in Level:
        for bad in (float("nan"), float("inf"), float("-inf")):
            with pytest.raises(BlockStateError, match="NaN or Inf"):
                compress(torch.tensor([[1.0, 2.0], [bad, 0.0]]), level)
    with pytest.raises(BlockStateError, match="bf16 or fp32"):
        compress(torch.tensor([1e6]), Level.FP16)
    assert float(decompress(compress(torch.tensor([1e6]), Level.BF16))[0]) == pytest.approx(1e6, rel=0.01)


def test_compressed_tensor_checks_its_own_consistency() -> None:
    with pytest.raises(BlockStateError, match="must be torch.float16"):
        CompressedTensor(Level.FP16, (2,), torch.zeros(2))
    with pytest.raises(BlockStateError, match="scales"):
        CompressedTensor(Level.INT8, (2, 3), torch.zeros(2, 3, dtype=torch.int8))
    with pytest.raises(BlockStateError, match="scales"):
        CompressedTensor(Level.INT8, (2, 3), torch.zeros(2, 3, dtype=torch.int8), torch.zeros(3))
    with pytest.raises(BlockStateError, match="carries no scales"):
        CompressedTensor(Level.FP32, (2,), torch.zeros(2), torch.zeros(1))
    with pytest.raises(BlockStateError, match="differs"):
        CompressedTensor(Level.FP32, (3,), torch.zeros(2))


def test_state_round_trip_and_fp32_residual_is_zero() -> None:
    state = _state()
    compressed, residual = compress_state(state, Level.FP32)
    back = decompress_state(compressed)
    assert layout_of(back) == layout_of(state) == layout_of(residual)
    for bid, params in state.items():
        for name, t in params.items():
            assert torch.equal(_bits(back[bid][name]), _bits(t))
            assert not residual[bid][name].any()


def test_compress_state_names_the_bad_tensor_and_checks_the_residual_layout() -> None:
    state = _state()
    state[9]["mlp.down_proj.weight"][0, 0] = float("inf")
    with pytest.raises(BlockStateError, match=r"block 9 parameter 'mlp.down_proj.weight'"):
        compress_state(state, Level.INT8)
    residual = _state()
    residual[4]["self_attn.o_proj.weight"] = torch.zeros(8, 16)
    with pytest.raises(BlockStateError, match=r"block 4 parameter 'self_attn.o_proj.weight' has shape"):
        compress_state(_state(), Level.INT8, residual)


def _tracking_errors(level: Level, rounds: int, feedback: bool) -> list[float]:
    """Norm of (sum of decoded updates - sum of true updates) after each round."""
    true_sum = {b: {n: torch.zeros_like(t) for n, t in p.items()} for b, p in _state().items()}
    sent_sum = {b: {n: torch.zeros_like(t) for n, t in p.items()} for b, p in _state().items()}
    residual: BlockState | None = None
    errors = []
    for k in range(rounds):
        delta = _state(seed=100 + k, scale=1e-3)
        compressed, new_residual = compress_state(delta, level, residual)
        residual = new_residual if feedback else None
        decoded = decompress_state(compressed)
        err2 = 0.0
        for bid, params in delta.items():
            for name, t in params.items():
                true_sum[bid][name] += t
                sent_sum[bid][name] += decoded[bid][name]
                err2 += float((sent_sum[bid][name] - true_sum[bid][name]).norm() ** 2)
        errors.append(err2**0.5)
    return errors


@pytest.mark.parametrize("level", [Level.INT8, Level.FP16, Level.BF16])
def test_error_feedback_keeps_the_sum_of_updates_on_track(level: Level) -> None:
    rounds = 64
    with_feedback = _tracking_errors(level, rounds, feedback=True)
    without = _tracking_errors(level, rounds, feedback=False)
    one_round = without[0]  # the quantization error of a single round
    assert one_round > 0
    # with feedback the error is the last residual: one round's error, whatever the number of rounds
    assert max(with_feedback) <= 1.5 * one_round
    assert with_feedback[-1] <= 1.5 * with_feedback[7]
    # without it the errors add up (about sqrt(K) for independent rounds)
    assert without[-1] > 4 * one_round
    assert without[-1] > 3 * with_feedback[-1]


def test_error_feedback_sends_small_persistent_updates_eventually() -> None:
    # a row with one large entry: the small entries (under half a step) round to zero every round
    delta: BlockState = {0: {"w": torch.full((2, 64), 1e-3)}}
    delta[0]["w"][:, 0] = 1.0
    step = 1.0 / INT8_MAX
    residual: BlockState | None = None
    sent_with = torch.zeros(2, 64)
    sent_without = torch.zeros(2, 64)
    for _ in range(100):
        compressed, residual = compress_state(delta, Level.INT8, residual)
        sent_with += decompress_state(compressed)[0]["w"]
        sent_without += decompress_state(compress_state(delta, Level.INT8)[0])[0]["w"]
    truth = 100 * delta[0]["w"]
    assert float((sent_without - truth).abs().max()) == pytest.approx(0.1, rel=1e-3)  # all lost
    assert float((sent_with - truth).abs().max()) <= step / 2 + 1e-6


def test_layout_problems_report_every_difference() -> None:
    expected: BlockLayout = {1: {"a": (2, 3), "b": (3,)}, 2: {"a": (2, 3)}}
    assert layout_problems(expected, expected) == []
    actual: BlockLayout = {1: {"a": (3, 2), "c": (1,)}, 5: {"a": (2, 3)}}
    problems = layout_problems(actual, expected)
    assert "block 5 is not in the expected layout (expected blocks [1, 2])" in problems
    assert "block 2 is missing" in problems
    assert "block 1 parameter 'b' is missing" in problems
    assert "block 1 parameter 'c' is not part of the block" in problems
    assert "block 1 parameter 'a' has shape (3, 2), expected (2, 3)" in problems
    assert "block 2 is missing" not in layout_problems(actual, expected, require_all_blocks=False)
