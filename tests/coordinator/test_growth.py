"""Growing the new blocks: the size ``blocks: auto`` picks, the plateau that adds one more, and where."""

from __future__ import annotations

from coordinator.config import AutoExpansionConfig
from coordinator.growth import Best, auto_block_count, next_source_layer, plan_growth, renumbering
from fedbe.expansion import ExpansionPlan

AUTO = AutoExpansionConfig(trainers_per_block=2.0, plateau_rounds=2, plateau_min_delta=0.01)
TWO = ExpansionPlan(8, (1, 5)).registry()  # new blocks after base layers 1 and 5 of 8


def test_auto_size_is_capacity_over_trainers_per_block_within_its_limits() -> None:
    n, reason = auto_block_count([3, 3, 2], 30, AUTO)
    assert n == 4
    assert (
        reason
        == "3 clients can train 8 blocks per round in all; 8 / trainers_per_block 2 -> 4 blocks (limit 30)"
    )
    assert auto_block_count([3, 3, 2], 30, AutoExpansionConfig(max_blocks=3))[0] == 3
    assert auto_block_count([9, 9], 4, AUTO)[0] == 4  # never more blocks than base layers
    assert auto_block_count([], 30, AUTO)[0] == 1  # never none


def test_a_gain_above_min_delta_moves_the_best_and_a_plateau_grows_the_model() -> None:
    assert plan_growth(None, 0.5, 1, TWO, AUTO, "interleave") == (Best(0.5, 1), None)
    assert plan_growth(Best(0.5, 1), 0.52, 2, TWO, AUTO, "interleave") == (Best(0.52, 2), None)
    # a gain of min_delta or less is no gain; plateau_rounds have not passed yet
    assert plan_growth(Best(0.5, 1), 0.51, 2, TWO, AUTO, "interleave") == (Best(0.5, 1), None)
    best, growth = plan_growth(Best(0.5, 1), 0.505, 3, TWO, AUTO, "interleave")
    assert best == Best(0.505, 3) and growth is not None
    assert growth.after_base_layer == 7  # farthest from layers 1 and 5 (3 ties with it; the higher wins)
    assert [b.source_layer for b in growth.registry.blocks] == [1, 5, 7]
    assert growth.reason == "accuracy 0.505 has not improved by 0.01 on 0.500 (round 1) for 2 rounds"


def test_no_growth_past_max_blocks_or_base_layers() -> None:
    full = AutoExpansionConfig(max_blocks=2, plateau_rounds=2)
    assert plan_growth(Best(0.5, 1), 0.5, 5, TWO, full, "interleave") == (Best(0.5, 1), None)
    assert next_source_layer(ExpansionPlan(2, (0, 1)).registry(), "interleave", None) is None
    assert next_source_layer(TWO, "top", None) == 7


def test_old_blocks_keep_their_place_among_the_renumbered_ones() -> None:
    grown = ExpansionPlan(8, (1, 3, 5)).registry()
    keep, added = renumbering(TWO, grown)
    assert keep == {0: 0, 1: 2} and added == 1  # ids follow depth: the block after layer 3 is now 1
    assert all(grown.block(keep[b.block_id]).source_layer == b.source_layer for b in TWO.blocks)
    top = ExpansionPlan(8, (7,)).registry()
    assert renumbering(top, ExpansionPlan(8, (7, 7)).registry()) == ({0: 0}, 1)
