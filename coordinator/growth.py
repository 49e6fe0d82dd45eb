"""Growing the new blocks: how many a ``blocks: auto`` run starts with, and when and where a run with
``auto_expansion.plateau_rounds`` adds one more; pure functions of registries, scores and settings.

* :func:`auto_block_count` sizes the expansion once, before round 1, from the announced capacities:
  N = round(sum of the clients' max trainable blocks / ``trainers_per_block``), clamped to
  [1, min(base layers, ``max_blocks``)], so that at full capacity each block is trained by about
  ``trainers_per_block`` clients a round.
* :func:`plan_growth` watches the round's accuracy: after ``plateau_rounds`` rounds without a gain of
  ``plateau_min_delta`` on the best so far it plans one block more. With ``top`` placement the block
  goes on top of the stack, otherwise after the base layer farthest from every existing new block.
* :func:`renumbering` says which block of the grown registry each old block became: blocks are
  numbered by depth, so a block added below others shifts their ids.

The daemon does the rest: it loads the base again, expands it as the new registry says (the new block
is a zeroed copy of a base layer, so the model's function does not change), carries the old blocks'
weights over by :func:`renumbering` and tells the clients.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from coordinator.config_sections import AutoExpansionConfig
from fedbe.expansion import BlockRegistry, ExpansionPlan

PROVISIONAL_BLOCKS = 6  # blocks: auto measures clients on this many interleaved blocks first


@dataclass(frozen=True)
class Best:
    """The best accuracy so far and the round that reached it (a gain counts from here)."""

    score: float
    round: int


@dataclass(frozen=True)
class Growth:
    """One block more: the grown registry, the base layer the new block copies, and why."""

    registry: BlockRegistry
    after_base_layer: int
    reason: str


def auto_block_count(
    capacities: Sequence[int], base_layers: int, auto: AutoExpansionConfig
) -> tuple[int, str]:
    """How many new blocks ``blocks: auto`` gives a run whose eligible clients can each train
    ``capacities`` blocks, and the reason as the run's log and metrics state it."""
    capacity = sum(capacities)
    limit = min(base_layers, auto.max_blocks or base_layers)
    n = max(1, min(limit, round(capacity / auto.trainers_per_block)))
    reason = (
        f"{len(capacities)} clients can train {capacity} blocks per round in all; "
        f"{capacity} / trainers_per_block {auto.trainers_per_block:g} -> {n} blocks (limit {limit})"
    )
    return n, reason


def plan_growth(
    best: Best | None,
    score: float,
    round_: int,
    registry: BlockRegistry,
    auto: AutoExpansionConfig,
    placement: str | tuple[int, ...],
) -> tuple[Best, Growth | None]:
    """After a round scoring ``score``: the best to remember, and the growth to do (None: none).

    The best moves to this round when the score beats it by more than ``plateau_min_delta``, and
    when the model grows (the new block gets ``plateau_rounds`` rounds to show a gain).
    """
    if best is None or score > best.score + auto.plateau_min_delta:
        return Best(float(score), round_), None
    if round_ - best.round < auto.plateau_rounds:
        return best, None
    new_after = next_source_layer(registry, placement, auto.max_blocks)
    if new_after is None:
        return best, None
    after = [b.source_layer for b in registry.blocks]
    grown = ExpansionPlan(registry.base_num_layers, tuple(sorted([*after, new_after]))).registry()
    reason = (
        f"accuracy {score:.3f} has not improved by {auto.plateau_min_delta:g} on {best.score:.3f} "
        f"(round {best.round}) for {round_ - best.round} rounds"
    )
    return Best(float(score), round_), Growth(grown, new_after, reason)


def next_source_layer(
    registry: BlockRegistry, placement: str | tuple[int, ...], max_blocks: int | None
) -> int | None:
    """The base layer one more block would copy (and follow), or None when no more fit."""
    layers = registry.base_num_layers
    if len(registry.blocks) >= min(layers, max_blocks or layers):
        return None
    if placement == "top":
        return layers - 1
    after = [b.source_layer for b in registry.blocks]
    free = [i for i in range(layers) if i not in after]
    if not free:
        return None
    return max(free, key=lambda i: (min(abs(i - a) for a in after), i))


def renumbering(old: BlockRegistry, new: BlockRegistry) -> tuple[dict[int, int], int]:
    """Each old block's id in ``new`` (``new`` holds ``old``'s blocks and one more), and the added
    block's id. A block is matched by its source layer and its order among the blocks copied from it."""
    new_ids = [b.block_id for b in new.blocks]
    keep = {}
    taken: set[int] = set()
    for block in old.blocks:
        match = next(n for n in new_ids if n not in taken and new.block(n).source_layer == block.source_layer)
        taken.add(match)
        keep[block.block_id] = match
    added = next(n for n in new_ids if n not in taken)
    return keep, added
