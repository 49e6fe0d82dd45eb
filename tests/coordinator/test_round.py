"""The round as pure functions: what the daemon and the bench both run (coordinator.round)."""

from __future__ import annotations

import json
import random

import pytest
import torch

from coordinator.aggregation import FedAvgM
from coordinator.allocation import AllocationPolicy
from coordinator.round import (
    Candidate,
    Reply,
    RoundPolicy,
    close_round,
    plan_from_json,
    plan_round,
    plan_to_json,
    select_clients,
    trained_blocks,
)
from fedbe.expansion import BlockRegistry, NewBlock
from fedbe.recipe import Recipe

# 4 base layers + 2 new blocks at layers 2 and 5 of the 6-layer expanded stack
REGISTRY = BlockRegistry(base_num_layers=4, blocks=(NewBlock(0, 2, 1), NewBlock(1, 5, 3)))
LAYOUT = {0: {"w": (2,)}, 1: {"w": (2,)}}
RECIPE = Recipe(steps=4, batch_size=2)


def candidate(cid: str, max_blocks: int = 2, backward: float = 1.0) -> Candidate:
    return Candidate(cid, max_blocks, forward_seconds=1.0, backward_seconds=backward, label_histogram={"a": 1.0})


def policy(**changes: object) -> RoundPolicy:
    return RoundPolicy(**{"recipe": RECIPE, "clients_per_round": 10, "deadline_seconds": 1000.0, **changes})  # type: ignore[arg-type]


def state(value: float = 0.0) -> dict[int, dict[str, torch.Tensor]]:
    return {b: {"w": torch.full((2,), value)} for b in (0, 1)}


def test_selection_takes_everyone_without_a_draw_when_they_are_few() -> None:
    rng = random.Random(3)
    before = rng.getstate()
    assert select_clients(["b", "a"], 5, rng) == ["a", "b"]
    assert rng.getstate() == before  # a resumed coordinator draws the same later samples
    assert len(select_clients([f"c{i}" for i in range(9)], 4, rng)) == 4
    assert rng.getstate() != before


def test_the_plan_allocates_under_the_deadline_and_carries_the_recipe() -> None:
    # a step with the lowest block trained costs 1 + backward x (6 - 2) s; with the top one, 1 + backward
    fleet = [candidate("fast"), candidate("slow", backward=10.0)]
    plan = plan_round(policy(deadline_seconds=30.0), 1, fleet, REGISTRY, {}, seed=0, rng=random.Random(0))
    assert plan.selected == ("fast", "slow") and plan.recipe is RECIPE
    assert plan.assignments["fast"] == (0, 1)  # 4 steps x 5 s = 20 s <= 30 s
    assert "slow" not in plan.assignments  # even the top block takes 4 x 11 s = 44 s
    assert plan.allocation_deadline == 30.0


def test_a_deadline_factor_plans_with_the_median_clients_time_to_train_every_block() -> None:
    fleet = [candidate("a", backward=1.0), candidate("b", backward=2.0), candidate("c", backward=4.0)]
    plan = plan_round(policy(deadline_factor=0.5), 1, fleet, REGISTRY, {}, seed=0, rng=random.Random(0))
    # every block: 4 steps x (1 + backward x 4): 20, 36, 68 s; the median 36 x 0.5 = 18 s
    assert plan.allocation_deadline == pytest.approx(18.0)
    assert plan.assignments == {"a": (1,), "b": (1,)}  # the top block alone: 4 x (1 + b x 1) = 8 / 12 s


def test_clients_that_do_not_distill_are_kept_off_the_riskiest_block() -> None:
    # block 0 was trained last round, so a distilling client is given the stale top block; in a round
    # whose recipe does not distill, the top block (forgetting risk 1) is out of its reach
    fleet, trained = [candidate("a", max_blocks=1)], {0: 1}
    for distill_lambda, want in (((3.0,), (1,)), ((3.0, 0.0), (0,))):
        recipe = policy(recipe=Recipe(steps=4, distill_lambda=distill_lambda))
        plan = plan_round(recipe, 2, fleet, REGISTRY, trained, seed=0, rng=random.Random(0))
        assert plan.assignments == {"a": want}, distill_lambda


def test_a_saved_plan_reads_back_as_the_same_plan_and_a_plan_for_other_blocks_is_refused() -> None:
    fleet = [candidate("fast"), candidate("mid", backward=3.0), candidate("slow", backward=10.0)]
    plan = plan_round(policy(deadline_seconds=30.0), 2, fleet, REGISTRY, {}, seed=0, rng=random.Random(0))
    assert "slow" in plan.allocation.assignments and "slow" not in plan.assignments  # selected, no blocks
    saved = json.loads(json.dumps(plan_to_json(plan)))  # what the state directory holds
    assert plan_from_json(saved, 2, RECIPE, REGISTRY.block_ids) == plan
    with pytest.raises(ValueError, match="plan of round 2"):
        plan_from_json(saved, 3, RECIPE, REGISTRY.block_ids)
    with pytest.raises(ValueError, match=r"trains blocks \[1\], not in \[0\]"):
        plan_from_json(saved, 2, RECIPE, (0,))  # the expansion changed since the plan was saved
    with pytest.raises(ValueError, match="not a round plan"):
        plan_from_json({k: v for k, v in saved.items() if k != "selected"}, 2, RECIPE, REGISTRY.block_ids)


def _plan(assignments: dict[str, tuple[int, ...]]):  # type: ignore[no-untyped-def]
    fleet = [candidate(c) for c in assignments]
    plan = plan_round(policy(allocation=AllocationPolicy(strategy="all")), 3, fleet, REGISTRY, {}, 0,
                      random.Random(0))  # fmt: skip
    return plan.__class__(**{**plan.__dict__, "assignments": assignments})


def test_close_averages_each_block_and_caps_the_claimed_samples() -> None:
    plan = _plan({"a": (0, 1), "b": (1,)})
    replies = [
        Reply("b", {1: {"w": torch.full((2,), 3.0)}}, num_samples=10**6, round=3),  # claims a huge weight
        Reply("a", {0: {"w": torch.full((2,), 1.0)}, 1: {"w": torch.full((2,), 1.0)}}, num_samples=8, round=3),
    ]
    out = close_round(policy(block_average="trainers"), plan, state(), LAYOUT, replies)
    assert out.accepted == ("a", "b") and not out.rejected
    assert torch.allclose(out.new_state[0]["w"], torch.full((2,), 1.0))
    # b's weight is capped at what its task allowed (4 steps x 2 examples = 8): an even average
    assert torch.allclose(out.new_state[1]["w"], torch.full((2,), 2.0))
    assert sorted(trained_blocks(out)) == [0, 1]


def test_close_screens_out_unassigned_blocks_and_outliers_but_keeps_the_round() -> None:
    plan = _plan({"a": (0,), "b": (0,), "c": (0,), "d": (0,)})
    small = {0: {"w": torch.full((2,), 0.1)}}
    replies = [Reply(c, small, 8, 3) for c in "abc"]
    replies.append(Reply("d", {0: {"w": torch.full((2,), 100.0)}}, 8, 3))
    replies.append(Reply("e", {1: {"w": torch.full((2,), 0.1)}}, 8, 3))  # a block it was not given
    out = close_round(policy(), plan, state(), LAYOUT, replies)
    assert out.accepted == ("a", "b", "c")
    assert {(c, code) for c, code, _ in out.rejected} == {("d", "norm_outlier"), ("e", "unassigned_block")}
    assert torch.allclose(out.new_state[0]["w"], torch.full((2,), 0.1))
    assert torch.equal(out.new_state[1]["w"], state()[1]["w"])  # nobody trained block 1


def test_the_order_replies_arrive_in_does_not_change_the_result() -> None:
    plan = _plan({"a": (0,), "b": (0,), "c": (0,)})
    g = torch.Generator().manual_seed(0)
    replies = [Reply(c, {0: {"w": torch.randn(2, generator=g)}}, n, 3) for c, n in zip("abc", (3, 5, 8), strict=True)]
    first = close_round(policy(), plan, state(), LAYOUT, replies)
    again = close_round(policy(), plan, state(), LAYOUT, list(reversed(replies)))
    assert torch.equal(first.new_state[0]["w"], again.new_state[0]["w"])


def test_late_updates_fold_with_staleness_only_when_the_policy_says_so() -> None:
    plan = _plan({"a": (0,)})
    on_time = [Reply("a", {0: {"w": torch.full((2,), 1.0)}}, 8, 3)]
    late = [Reply("z", {0: {"w": torch.full((2,), 4.0)}}, 8, 2)]
    dropped = close_round(policy(), plan, state(), LAYOUT, on_time, late=late)
    assert torch.allclose(dropped.new_state[0]["w"], torch.full((2,), 1.0)) and dropped.late_accepted == ()
    folded = close_round(policy(late_updates="fold", staleness_decay=0.5, block_average="trainers"), plan,
                         state(), LAYOUT, on_time, late=late)  # fmt: skip
    assert folded.late_accepted == ("z",) and folded.accepted == ("a",)
    # weights 8 and 8 x 0.5: (1 x 8 + 4 x 4) / 12 = 2
    assert torch.allclose(folded.new_state[0]["w"], torch.full((2,), 2.0))


def test_the_server_optimizer_state_comes_back_to_be_checkpointed() -> None:
    plan = _plan({"a": (0,)})
    server = policy(server_optimizer=FedAvgM(lr=1.0, momentum=0.9))
    out = close_round(server, plan, state(), LAYOUT, [Reply("a", {0: {"w": torch.ones(2)}}, 8, 3)])
    assert out.optimizer_state is not None
    again = close_round(server, plan, out.new_state, LAYOUT, [Reply("a", {0: {"w": torch.ones(2)}}, 8, 3)],
                        out.optimizer_state)  # fmt: skip
    # momentum: the second step moves by 1 + 0.9
    assert torch.allclose(again.new_state[0]["w"] - out.new_state[0]["w"], torch.full((2,), 1.9))
