"""Client-level DP of the updates (coordinator.privacy) and its path through coordinator.round.close_round."""

from __future__ import annotations

import math
import random

import dp_accounting
import pytest
import torch
from dp_accounting import rdp

from coordinator.aggregation import FedAvgM, update_norm
from coordinator.privacy import (
    PrivacyError,
    PrivacyLedger,
    PrivacyPolicy,
    RoundPrivacy,
    SeededNoise,
    SystemNoise,
    budget_check,
    clip_update,
    epsilon,
    history_from_json,
    history_to_json,
    sample_rate,
)
from coordinator.round import Candidate, Reply, RoundPolicy, close_round, plan_round
from fedbe.blocks import BlockState
from fedbe.expansion import BlockRegistry, NewBlock
from fedbe.recipe import Recipe

REGISTRY = BlockRegistry(base_num_layers=4, blocks=(NewBlock(0, 1, 0), NewBlock(1, 3, 1), NewBlock(2, 5, 2)))
SIZE = 20_000  # coordinates per block: the noise's sample std is within about 0.5% of the true one
LAYOUT = {b: {"w": (SIZE,), "b": (4,)} for b in (0, 1, 2)}


def policy(dp: PrivacyPolicy | None, **changes: object) -> RoundPolicy:
    fields: dict[str, object] = {"recipe": Recipe(steps=4, batch_size=2), "clients_per_round": 10,
                                 "deadline_seconds": 1000.0, "privacy": dp, **changes}  # fmt: skip
    return RoundPolicy(**fields)  # type: ignore[arg-type]


def global_state() -> BlockState:
    return {b: {"w": torch.zeros(SIZE), "b": torch.zeros(4)} for b in (0, 1, 2)}


def delta(blocks: tuple[int, ...], seed: int, scale: float = 1.0) -> BlockState:
    g = torch.Generator().manual_seed(seed)
    return {
        b: {"w": torch.randn(SIZE, generator=g) * scale, "b": torch.randn(4, generator=g) * scale}
        for b in blocks
    }


def plan_for(assignments: dict[str, tuple[int, ...]]):  # type: ignore[no-untyped-def]
    """A real plan whose assignments are ``assignments`` (the plan only names who trains what)."""
    fleet = [Candidate(c, 3, 1.0, 1.0, {"a": 1.0}) for c in assignments]
    plan = plan_round(policy(None), 1, fleet, REGISTRY, {}, seed=0, rng=random.Random(0))
    return type(plan)(plan.round, plan.selected, plan.allocation, dict(assignments), 1000.0, plan.recipe)


def seeded(seed: int = 0) -> SeededNoise:
    return SeededNoise(seed)


def test_clipping_bounds_the_norm_over_all_blocks_and_leaves_small_updates_alone() -> None:
    big = delta((0, 1), seed=1)
    norm = update_norm(big)
    clipped, before = clip_update(big, 0.5)
    assert before == pytest.approx(norm) and update_norm(clipped) == pytest.approx(0.5, rel=1e-6)
    # scaled as one vector: every block by the same factor, not each block to 0.5
    for b in (0, 1):
        torch.testing.assert_close(clipped[b]["w"], big[b]["w"] * (0.5 / norm))
    small, before = clip_update(big, 2 * norm)
    assert small is big and before == pytest.approx(norm)


def test_the_noise_has_the_configured_std_and_only_trained_blocks_get_it() -> None:
    # zero updates: what the blocks move by is the noise alone, divided by the block's trainers
    dp = PrivacyPolicy(noise_multiplier=1.5, clip_norm=0.2)
    plan = plan_for({"a": (0, 1), "b": (0,)})
    replies = [Reply("a", delta((0, 1), 1, scale=0.0), 8, 1), Reply("b", delta((0,), 2, scale=0.0), 8, 1)]
    start = global_state()
    out = close_round(policy(dp, block_average="trainers"), plan, start, LAYOUT, replies, noise=seeded())
    for block_id, trainers in ((0, 2), (1, 1)):
        moved = out.new_state[block_id]["w"].double()
        assert moved.std().item() == pytest.approx(0.3 / trainers, rel=0.03), block_id
        assert abs(moved.mean().item()) < 4 * 0.3 / trainers / math.sqrt(SIZE)
        assert out.per_block[block_id].trainers == ("a", "b")[:trainers]
    assert out.new_state[2]["w"] is start[2]["w"] and out.per_block[2].trainers == ()
    # "round": each trained block's sum is divided by the round's two clients
    out = close_round(policy(dp, block_average="round"), plan, start, LAYOUT, replies, noise=seeded())
    assert out.new_state[1]["w"].double().std().item() == pytest.approx(0.15, rel=0.03)


@pytest.mark.parametrize("block_average", ["trainers", "round"])
def test_without_noise_and_clipping_it_is_the_plain_path_with_equal_weights(block_average: str) -> None:
    plan = plan_for({"a": (0, 1), "b": (1, 2), "c": (0,)})
    samples = {"a": 8, "b": 3, "c": 5}
    replies = [Reply(c, delta(plan.assignments[c], i), samples[c], 1) for i, c in enumerate("abc")]
    dp = PrivacyPolicy(noise_multiplier=0.0, clip_norm=1e9)
    server = FedAvgM(lr=0.5, momentum=0.9)
    private = close_round(policy(dp, block_average=block_average, server_optimizer=server), plan, global_state(),
                          LAYOUT, replies, noise=seeded())  # fmt: skip
    equal = [Reply(r.client_id, r.delta, 8, r.round) for r in replies]
    plain = close_round(policy(None, block_average=block_average, server_optimizer=server), plan, global_state(),
                        LAYOUT, equal)  # fmt: skip
    for b in (0, 1, 2):
        for name in ("w", "b"):
            torch.testing.assert_close(private.new_state[b][name], plain.new_state[b][name])
    assert private.clipped_fraction == 0.0 and plain.clipped_fraction is None
    assert private.optimizer_state is not None
    # the sample counts did weigh in without DP
    weighted = close_round(policy(None, block_average=block_average), plan, global_state(), LAYOUT, replies)
    assert not torch.allclose(weighted.new_state[0]["w"], plain.new_state[0]["w"])


def test_clipped_updates_are_averaged_with_equal_weights_and_the_outlier_test_is_skipped() -> None:
    plan = plan_for({"a": (0,), "b": (0,), "c": (0,)})
    # c's update is 100x the others': without DP the outlier test rejects it, with DP clipping bounds it
    replies = [Reply("a", delta((0,), 1), 8, 1), Reply("b", delta((0,), 2), 8, 1),
               Reply("c", delta((0,), 3, scale=100.0), 1, 1)]  # fmt: skip
    plain = close_round(policy(None), plan, global_state(), LAYOUT, replies)
    assert [r[:2] for r in plain.rejected] == [("c", "norm_outlier")]
    dp = PrivacyPolicy(noise_multiplier=0.0, clip_norm=1.0)
    out = close_round(
        policy(dp, block_average="trainers"), plan, global_state(), LAYOUT, replies, noise=seeded()
    )
    assert out.accepted == ("a", "b", "c") and out.clipped_fraction == 1.0
    want = sum(clip_update(r.delta, 1.0)[0][0]["w"] for r in replies) / 3
    torch.testing.assert_close(out.new_state[0]["w"], want)


def test_seeded_noise_does_not_depend_on_the_order_updates_came_in() -> None:
    dp = PrivacyPolicy(noise_multiplier=1.0, clip_norm=1.0)
    plan = plan_for({"a": (0, 1), "b": (1,)})
    replies = [Reply("a", delta((0, 1), 1), 8, 1), Reply("b", delta((1,), 2), 8, 1)]
    one = close_round(policy(dp), plan, global_state(), LAYOUT, replies, noise=seeded(5))
    two = close_round(policy(dp), plan, global_state(), LAYOUT, replies[::-1], noise=seeded(5))
    other = close_round(policy(dp), plan, global_state(), LAYOUT, replies, noise=seeded(6))
    torch.testing.assert_close(one.new_state[1]["w"], two.new_state[1]["w"])
    assert not torch.allclose(one.new_state[1]["w"], other.new_state[1]["w"])


def test_dp_refuses_what_breaks_the_sensitivity_bound_and_needs_a_generator() -> None:
    dp = PrivacyPolicy(noise_multiplier=1.0, clip_norm=1.0)
    with pytest.raises(PrivacyError, match="late_updates 'fold'"):
        policy(dp, late_updates="fold")
    plan = plan_for({"a": (0,)})
    with pytest.raises(PrivacyError, match="noise generator"):
        close_round(policy(dp), plan, global_state(), LAYOUT, [Reply("a", delta((0,), 1), 8, 1)])
    for bad in ({"noise_multiplier": -1.0}, {"clip_norm": 0.0}, {"delta": 1.0}, {"epsilon_budget": 0.0}):
        with pytest.raises(PrivacyError):
            PrivacyPolicy(**{"noise_multiplier": 1.0, "clip_norm": 1.0, **bad})  # type: ignore[arg-type]


def direct_epsilon(q: float, sigma: float, rounds: int, delta: float) -> float:
    accountant = rdp.RdpAccountant()
    accountant.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), rounds)
    return float(accountant.get_epsilon(delta))


def test_epsilon_is_dp_accountings_and_grows_with_the_rounds() -> None:
    q, sigma, delta = 0.1, 1.1, 1e-5
    values = [epsilon([RoundPrivacy(q, sigma)] * n, delta) for n in (1, 10, 50)]
    assert values == pytest.approx([direct_epsilon(q, sigma, n, delta) for n in (1, 10, 50)], rel=1e-9)
    assert 0 < values[0] < values[1] < values[2]
    # rounds of different sampling rates compose; the order does not matter
    mixed = [RoundPrivacy(0.1, sigma)] * 5 + [RoundPrivacy(0.5, sigma)] * 3
    direct = rdp.RdpAccountant()
    direct.compose(dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.GaussianDpEvent(sigma)), 5)
    direct.compose(dp_accounting.PoissonSampledDpEvent(0.5, dp_accounting.GaussianDpEvent(sigma)), 3)
    assert epsilon(mixed, delta) == pytest.approx(direct.get_epsilon(delta), rel=1e-9)
    assert epsilon(mixed[::-1], delta) == pytest.approx(epsilon(mixed, delta), rel=1e-9)
    assert epsilon([], delta) == 0.0 and epsilon([RoundPrivacy(q, 0.0)], delta) == math.inf
    assert sample_rate(3, 12) == 0.25
    with pytest.raises(PrivacyError):
        sample_rate(0, 12)


def test_the_history_survives_json_and_gives_the_same_epsilon() -> None:
    history = [RoundPrivacy(0.25, 1.0)] * 3 + [RoundPrivacy(1 / 3, 1.0)]
    restored = history_from_json(history_to_json(history))
    assert list(restored) == history
    assert epsilon(restored, 1e-5) == epsilon(history, 1e-5)
    for bad in ([[0.5]], [[0.5, "x"]], [[1.5, 1.0]], {"q": 1}):
        with pytest.raises(PrivacyError):
            history_from_json(bad)


def test_the_ledger_refuses_the_first_round_past_the_budget() -> None:
    q, sigma, delta = 0.5, 1.0, 1e-5
    spent = [direct_epsilon(q, sigma, n, delta) for n in range(1, 30)]
    budget = (spent[6] + spent[7]) / 2  # 7 rounds fit, the 8th would pass the budget
    ledger = PrivacyLedger(PrivacyPolicy(sigma, 1.0, delta, budget), [])
    while (refusal := ledger.refusal(2, 4)) is None:
        record = ledger.record(2, 4, clipped_fraction=0.5)
    assert len(ledger.history) == 7
    assert record["epsilon"] == pytest.approx(spent[6]) and record["sample_rate"] == q
    assert f"epsilon {spent[6]:.4g} of {budget:g} after 7 rounds" in refusal
    # without a budget every round fits, epsilon is only reported
    fits, before, after = budget_check(
        PrivacyPolicy(sigma, 1.0, delta), ledger.history, RoundPrivacy(q, sigma)
    )
    assert fits and before == pytest.approx(spent[6]) and after == pytest.approx(spent[7])


def test_system_noise_is_standard_normal_and_never_repeats() -> None:
    source = SystemNoise()
    source.CHUNK = 1000  # several chunks, and an odd count that ends inside one
    draws = source.normal((301, 333)).flatten().double()
    n = draws.numel()
    assert torch.isfinite(draws).all()
    # mean within 5 standard errors, variance within 5 of its own (Var of s^2 is 2/n for a normal)
    assert abs(draws.mean().item()) < 5 / math.sqrt(n)
    assert abs(draws.var().item() - 1.0) < 5 * math.sqrt(2 / n)
    # a normal's tails: about 4.55% beyond 2 sigma (a uniform or a truncated source fails this)
    beyond = (draws.abs() > 2).double().mean().item()
    assert abs(beyond - 0.0455) < 5 * math.sqrt(0.0455 * 0.9545 / n)
    assert not torch.equal(SystemNoise().normal((64,)), SystemNoise().normal((64,)))
