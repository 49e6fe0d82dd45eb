"""Aggregation: per-block weighted averages, staleness, server optimizers and update screening."""

from __future__ import annotations

import math

import pytest
import torch

from coordinator.aggregation import (
    AggregationError,
    ClientUpdate,
    FedAdam,
    FedAdamState,
    FedAvgM,
    FedAvgMState,
    aggregate,
    screen_update,
    update_norm,
)
from fedbe.blocks import BlockState
from fedbe.errors import BlockStateError


def full(value: float, shape: tuple[int, ...] = (2,)) -> torch.Tensor:
    return torch.full(shape, float(value))


def state(**blocks: float) -> BlockState:
    """``state(b0=1.0, b2=3.0)`` -> blocks 0 and 2, each one parameter ``w`` of two equal values."""
    return {int(name[1:]): {"w": full(v)} for name, v in blocks.items()}


GLOBAL = state(b0=10.0, b1=20.0, b2=30.0)


# -- weighted averages ---------------------------------------------------------------------------------


def test_each_block_is_averaged_over_its_trainers_only() -> None:
    a = ClientUpdate("A", state(b0=1.0, b1=2.0), num_samples=100)
    b = ClientUpdate("B", state(b0=3.0), num_samples=300)
    result = aggregate(GLOBAL, [a, b])
    # block 0: (100 * 1 + 300 * 3) / 400 = 2.5; block 1: A alone, 2.0; block 2: untouched
    assert torch.equal(result.new_state[0]["w"], full(12.5))
    assert torch.equal(result.new_state[1]["w"], full(22.0))
    assert result.new_state[2]["w"] is GLOBAL[2]["w"]
    assert torch.equal(GLOBAL[0]["w"], full(10.0))  # the input is not modified
    report = result.per_block
    assert (report[0].trainers, report[0].weight_total) == (("A", "B"), 400.0)
    assert report[0].update_norm == pytest.approx(2.5 * math.sqrt(2))
    assert (report[1].trainers, report[1].weight_total) == (("A",), 100.0)
    assert (report[2].trainers, report[2].weight_total, report[2].update_norm) == ((), 0.0, 0.0)
    assert result.optimizer_state is None


def test_round_average_counts_a_missing_block_as_a_zero_delta() -> None:
    # The same updates as above, averaged over the round: A (100) trained blocks 0 and 1, B (300)
    # block 0 only. Block 0 is unchanged (both trained it); block 1 moves by 100 / 400 of A's delta,
    # not by all of it: A's change counts for its share of the round's data, however many blocks it held.
    a = ClientUpdate("A", state(b0=1.0, b1=2.0), num_samples=100)
    b = ClientUpdate("B", state(b0=3.0), num_samples=300)
    result = aggregate(GLOBAL, [a, b], block_average="round")
    assert torch.equal(result.new_state[0]["w"], full(12.5))
    assert torch.equal(result.new_state[1]["w"], full(20.5))
    assert result.new_state[2]["w"] is GLOBAL[2]["w"]
    assert (result.per_block[1].trainers, result.per_block[1].update_norm) == (
        ("A",),
        pytest.approx(0.5 * math.sqrt(2)),
    )
    with pytest.raises(AggregationError, match="block_average 'blocks'"):
        aggregate(GLOBAL, [a, b], block_average="blocks")


def test_staleness_discounts_late_updates() -> None:
    fresh = ClientUpdate("A", state(b0=1.0), num_samples=100)
    late = ClientUpdate("B", state(b0=3.0), num_samples=300, staleness=2)
    result = aggregate(GLOBAL, [fresh, late], staleness_decay=0.5)
    # weights 100 and 300 * 0.5^2 = 75: (100 * 1 + 75 * 3) / 175 = 325 / 175
    assert result.new_state[0]["w"] == pytest.approx(full(10 + 325 / 175))
    assert result.per_block[0].weight_total == 175.0


def test_blocks_whose_trainers_all_weigh_nothing_stay_put() -> None:
    result = aggregate(GLOBAL, [ClientUpdate("A", state(b1=5.0), num_samples=0)])
    assert result.new_state[1]["w"] is GLOBAL[1]["w"]
    assert result.per_block[1].trainers == ()


def test_bad_aggregation_inputs_are_named() -> None:
    one = ClientUpdate("A", state(b0=1.0), 10)
    with pytest.raises(AggregationError, match="more than one update"):
        aggregate(GLOBAL, [one, one])
    with pytest.raises(AggregationError, match="staleness_decay"):
        aggregate(GLOBAL, [one], staleness_decay=0.0)
    with pytest.raises(AggregationError, match="num_samples"):
        aggregate(GLOBAL, [ClientUpdate("A", state(b0=1.0), -1)])
    with pytest.raises(AggregationError, match=r"block\(s\) \[7\]"):
        aggregate(GLOBAL, [ClientUpdate("A", state(b7=1.0), 10)])
    with pytest.raises(BlockStateError):
        aggregate(GLOBAL, [ClientUpdate("A", {0: {"w": full(1.0, (3,))}}, 10)])
    with pytest.raises(AggregationError, match="FedAdamState"):
        aggregate(GLOBAL, [one], FedAdam(), optimizer_state=FedAvgMState())
    with pytest.raises(AggregationError, match="momentum"):
        FedAvgM(momentum=1.5)


# -- server optimizers ---------------------------------------------------------------------------------


def test_fedavgm_two_steps_by_hand() -> None:
    opt = FedAvgM(lr=0.5, momentum=0.9)
    x0 = {0: {"w": full(10.0)}}
    x1, s1 = opt.step(None, x0, {0: {"w": full(2.0)}})  # u = 2; x = 10 + 0.5 * 2
    assert torch.equal(x1[0]["w"], full(11.0)) and torch.equal(s1.momentum[0]["w"], full(2.0))
    x2, s2 = opt.step(s1, x1, {0: {"w": full(2.0)}})  # u = 0.9 * 2 + 2 = 3.8; x = 11 + 1.9
    assert x2[0]["w"] == pytest.approx(full(12.9))
    assert s2.momentum[0]["w"] == pytest.approx(full(3.8))
    assert torch.equal(s1.momentum[0]["w"], full(2.0))  # the old state is not modified


def test_fedavgm_leaves_untrained_blocks_and_their_momentum_alone() -> None:
    opt = FedAvgM(lr=1.0, momentum=0.9)
    x1, s1 = opt.step(None, state(b0=0.0, b1=0.0), state(b0=1.0, b1=1.0))
    x2, s2 = opt.step(s1, x1, state(b0=1.0))  # block 1 not trained this round
    assert x2[1]["w"] is x1[1]["w"] and s2.momentum[1]["w"] is s1.momentum[1]["w"]
    x3, _ = opt.step(s2, x2, state(b1=0.0))  # u = 0.9 * 1 + 0, not 0.9^2
    assert x3[1]["w"] == pytest.approx(full(1.9))


def test_fedavgm_without_momentum_is_fedavg() -> None:
    updates = [ClientUpdate("A", state(b0=1.0, b1=2.0), 100), ClientUpdate("B", state(b0=3.0), 300)]
    plain = aggregate(GLOBAL, updates)
    stepped = aggregate(GLOBAL, updates, FedAvgM(lr=1.0, momentum=0.0))
    for block in GLOBAL:
        assert torch.equal(plain.new_state[block]["w"], stepped.new_state[block]["w"])
    assert stepped.new_state[2]["w"] is GLOBAL[2]["w"]
    assert isinstance(stepped.optimizer_state, FedAvgMState) and set(stepped.optimizer_state.momentum) == {
        0,
        1,
    }


def test_fedadam_two_steps_by_hand() -> None:
    # beta1 = beta2 = 0.5, tau = 1, so v starts at 1.
    opt = FedAdam(lr=0.6, beta1=0.5, beta2=0.5, tau=1.0)
    x0 = {0: {"w": torch.tensor([0.0, 0.0])}}
    # d = +-7: m = 3.5; v = 0.5 * 1 + 0.5 * 49 = 25; x = 0.6 * 3.5 / (5 + 1) = 0.35
    x1, s1 = opt.step(None, x0, {0: {"w": torch.tensor([7.0, -7.0])}})
    assert x1[0]["w"] == pytest.approx(torch.tensor([0.35, -0.35]))
    assert s1.v[0]["w"] == pytest.approx(torch.tensor([25.0, 25.0]))
    # d = +-5: m = 1.75 + 2.5 = 4.25; v = 12.5 + 12.5 = 25; x = 0.35 + 0.6 * 4.25 / 6 = 0.775
    x2, s2 = opt.step(s1, x1, {0: {"w": torch.tensor([5.0, -5.0])}})
    assert x2[0]["w"] == pytest.approx(torch.tensor([0.775, -0.775]))
    assert s2.m[0]["w"] == pytest.approx(torch.tensor([4.25, -4.25]))


def test_fedadam_through_aggregate_touches_only_trained_blocks() -> None:
    result = aggregate(
        GLOBAL, [ClientUpdate("A", state(b1=1.0), 5)], FedAdam(), optimizer_state=FedAdamState()
    )
    assert result.new_state[0]["w"] is GLOBAL[0]["w"] and result.new_state[2]["w"] is GLOBAL[2]["w"]
    # one step with d = 1 and default settings: 0.01 * 0.1 / (sqrt(0.99e-6 + 0.01) + 1e-3)
    expected = 20.0 + 0.01 * 0.1 / (math.sqrt(0.99e-6 + 0.01) + 1e-3)
    assert result.new_state[1]["w"] == pytest.approx(full(expected))
    assert isinstance(result.optimizer_state, FedAdamState) and set(result.optimizer_state.m) == {1}


# -- screening -------------------------------------------------------------------------------------------

LAYOUT = {0: {"w": (2, 2)}, 1: {"w": (2, 2)}}


def update(value: float, block: int = 0) -> BlockState:
    return {block: {"w": torch.full((2, 2), value)}}


def test_screen_accepts_a_normal_update() -> None:
    result = screen_update(update(0.5), (0, 1), LAYOUT, [1.0, 1.2], 10.0)
    assert result.accepted and result.code == "ok"


@pytest.mark.parametrize(
    ("delta", "code", "text"),
    [
        ({}, "empty", "no block"),
        (update(0.1, block=1), "unassigned_block", "block(s) [1], assigned only [0]"),
        ({0: {"w": torch.zeros(3, 2)}}, "shape_mismatch", "shape (3, 2), expected (2, 2)"),
        ({0: {"v": torch.zeros(2, 2)}}, "shape_mismatch", "'w' is missing"),
        ({0: {"w": torch.tensor([[0.0, math.nan], [0.0, 0.0]])}}, "non_finite", "NaN"),
        ({0: {"w": torch.tensor([[0.0, -math.inf], [0.0, 0.0]])}}, "non_finite", "infinite"),
    ],
)
def test_screen_rejects(delta: BlockState, code: str, text: str) -> None:
    result = screen_update(delta, (0,), LAYOUT, None, 10.0)
    assert (result.accepted, result.code) == (False, code)
    assert text in result.reason


def test_screen_rejects_the_scaled_update_and_passes_the_normal_ones() -> None:
    normal = [update(0.5), update(0.55), update(0.45)]  # norms 1.0, 1.1, 0.9
    deltas = [*normal, update(0.5 * 1e6)]  # norm 1e6
    norms = [update_norm(d) for d in deltas]
    assert norms[:3] == pytest.approx([1.0, 1.1, 0.9])
    results = [screen_update(d, (0,), LAYOUT, norms[:i] + norms[i + 1 :], 10.0) for i, d in enumerate(deltas)]
    assert [r.accepted for r in results] == [True, True, True, False]
    assert results[3].code == "norm_outlier"
    assert results[3].reason == "update norm 1e+06 is 1e+06 x the round median 1; bound is 10x"


def test_screen_norm_bounds_need_two_others_or_a_cap() -> None:
    big = update(100.0)  # norm 200
    assert screen_update(big, (0,), LAYOUT, [1.0], 10.0).accepted  # one other: no median to trust
    assert screen_update(big, (0,), LAYOUT, [0.0, 0.0], 10.0).accepted  # median 0: no scale
    capped = screen_update(big, (0,), LAYOUT, None, 10.0, max_norm=150.0)
    assert (capped.accepted, capped.code) == (False, "norm_cap")
