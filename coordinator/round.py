"""One federated round, as pure functions: plan it, then close it.

The coordinator daemon and ``fedbe bench`` both call these two functions, so the benchmark measures
the round that the daemon runs. Neither does any I/O: the daemon sends the plan's tasks over MQTT
and collects replies, the bench trains its emulated clients in process; both hand the replies to
:func:`close_round`.

* :func:`plan_round` selects the round's clients, gives each the allocation's blocks
  (:func:`coordinator.allocation.allocate`) under the round's deadline, and fixes the recipe the
  tasks carry.
* :func:`plan_to_json` / :func:`plan_from_json` write a plan down and read it back: the daemon
  keeps the plan of the open round in its state directory, so a round resumed after a crash keeps
  its clients and their blocks instead of being planned again among whoever is back online first
  (an assigned client's update sent while the coordinator was down would otherwise be refused).
* :func:`close_round` screens every update (:func:`coordinator.aggregation.screen_update`: only
  assigned blocks, the model's layout, finite values, a norm not far above the round's others), caps
  each client's weight at what its task allowed (a client can not buy a larger share of the average
  by inflating ``num_samples``), folds late updates when the policy says so, and aggregates each
  block through the server optimizer. With a :class:`~coordinator.privacy.PrivacyPolicy` in the
  round's policy it runs DP-FedAvg instead of the weighted average (:mod:`coordinator.privacy`):
  every accepted update clipped to ``clip_norm``, equal weights, Gaussian noise on each trained
  block's sum; the daemon and the bench get DP through this one function.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from coordinator import aggregation, privacy
from coordinator.aggregation import BlockReport, ClientUpdate, OptimizerState, ServerOptimizer
from coordinator.allocation import Allocation, AllocationPolicy, ClientCapacity, allocate, slots_from_registry
from coordinator.privacy import PrivacyError, PrivacyPolicy
from fedbe.blocks import BlockState
from fedbe.expansion import BlockRegistry
from fedbe.recipe import Recipe


@dataclass(frozen=True)
class RoundPolicy:
    """Everything that decides a round's plan and its aggregation (the daemon builds it from its
    config, the bench from its settings)."""

    recipe: Recipe
    clients_per_round: int
    deadline_seconds: float  # when the round closes; the tasks carry it
    # when set, the allocation plans with this x the median selected client's time to train every
    # new block (slow clients then get fewer, higher blocks) instead of deadline_seconds
    deadline_factor: float | None = None
    allocation: AllocationPolicy = field(default_factory=AllocationPolicy)
    top_risk: float = 1.0
    interleaved_risk: float = 0.25
    norm_bound_factor: float = 10.0
    block_average: str = "round"
    staleness_decay: float = 0.5
    late_updates: Literal["drop", "fold"] = "drop"
    server_optimizer: ServerOptimizer | None = None
    # DP-FedAvg (coordinator.privacy); None: off
    privacy: PrivacyPolicy | None = None

    def __post_init__(self) -> None:
        if self.privacy is not None and self.late_updates == "fold":
            # a late update enters a round its client was not sampled for, on top of the one it was
            # sampled for: its data would move two rounds' models while the accountant counts one
            raise PrivacyError(
                "late_updates 'fold' can not be combined with differential privacy: a folded update "
                "counts its client in a round it was not sampled for; use late_updates 'drop'"
            )


@dataclass(frozen=True)
class Candidate:
    """What the plan needs to know of one eligible client (measured speed, memory, labels)."""

    client_id: str
    max_blocks: int
    forward_seconds: float  # one forward through the whole model, per step
    backward_seconds: float  # backward through one layer above the lowest trained block, per step
    label_histogram: Mapping[str, float]


@dataclass(frozen=True)
class RoundPlan:
    round: int
    selected: tuple[str, ...]
    allocation: Allocation
    assignments: dict[str, tuple[int, ...]]  # the clients that train something, and what
    allocation_deadline: float  # the deadline the allocation planned with
    recipe: Recipe


def select_clients(eligible: Sequence[str], per_round: int, rng: random.Random) -> list[str]:
    """Every eligible client if they are few enough (no draw from ``rng``), else a sample; sorted."""
    chosen = list(eligible) if len(eligible) <= per_round else rng.sample(list(eligible), per_round)
    return sorted(chosen)


def plan_round(
    policy: RoundPolicy,
    round_: int,
    candidates: Sequence[Candidate],
    registry: BlockRegistry,
    last_trained: Mapping[int, int],
    seed: int,
    rng: random.Random,
) -> RoundPlan:
    """Select the round's clients among ``candidates`` and allocate the new blocks among them."""
    by_id = {c.client_id: c for c in candidates}
    selected = select_clients(sorted(by_id), policy.clients_per_round, rng)
    n = registry.num_layers
    distills = policy.recipe.distill_lambda_in_round(round_) > 0

    def capacity(c: Candidate, deadline: float) -> ClientCapacity:
        return ClientCapacity(
            client_id=c.client_id, max_blocks=c.max_blocks, base_forward_seconds=c.forward_seconds,
            layer_backward_seconds=c.backward_seconds, steps=policy.recipe.steps, deadline_seconds=deadline,
            label_histogram=dict(c.label_histogram), distills=distills,
        )  # fmt: skip

    deadline = policy.deadline_seconds
    if policy.deadline_factor is not None and selected and registry.new_layer_indices:
        lowest = min(registry.new_layer_indices)
        every_block = sorted(capacity(by_id[cid], 0.0).round_seconds(lowest, n) for cid in selected)
        deadline = policy.deadline_factor * every_block[len(every_block) // 2]
    slots = slots_from_registry(registry, top_risk=policy.top_risk, interleaved_risk=policy.interleaved_risk)
    result = allocate(
        slots, [capacity(by_id[cid], deadline) for cid in selected], num_layers=n, last_trained=last_trained,
        round=round_, seed=seed * 100003 + round_, policy=policy.allocation,
    )  # fmt: skip
    assignments = {cid: blocks for cid, blocks in result.assignments.items() if blocks}
    return RoundPlan(round_, tuple(selected), result, assignments, deadline, policy.recipe)


def plan_to_json(plan: RoundPlan) -> dict[str, Any]:
    """``plan`` as JSON values, without its recipe (the run's config holds that)."""
    alloc = plan.allocation
    return {
        "round": plan.round, "selected": list(plan.selected),
        "assignments": {cid: list(blocks) for cid, blocks in alloc.assignments.items()},
        "unassigned_blocks": list(alloc.unassigned_blocks), "reasons": dict(alloc.reasons),
        "block_divergence": {str(b): d for b, d in alloc.block_divergence.items()},
        "withdrawn_blocks": list(alloc.withdrawn_blocks), "allocation_deadline": plan.allocation_deadline,
    }  # fmt: skip


def plan_from_json(
    data: Mapping[str, Any], round_: int, recipe: Recipe, block_ids: Sequence[int]
) -> RoundPlan:
    """The inverse of :func:`plan_to_json`. Raises ValueError, naming the problem, when ``data`` is not
    a plan of round ``round_`` over the blocks ``block_ids`` (the expansion changed, or the file is
    damaged): such a plan can not be resumed."""
    try:
        if data["round"] != round_:
            raise ValueError(f"it is the plan of round {data['round']!r}")
        known = set(block_ids)
        assignments: dict[str, tuple[int, ...]] = {}
        for cid, blocks in dict(data["assignments"]).items():
            if not isinstance(cid, str) or any(isinstance(b, bool) or not isinstance(b, int) for b in blocks):
                raise ValueError(f"client {cid!r} has blocks {blocks!r}, not a list of block ids")
            if set(blocks) - known:
                raise ValueError(
                    f"client {cid} trains blocks {sorted(set(blocks) - known)}, not in {sorted(known)}"
                )
            assignments[cid] = tuple(blocks)
        selected = tuple(str(c) for c in data["selected"])
        if set(assignments) - set(selected):
            raise ValueError(
                f"clients {sorted(set(assignments) - set(selected))} are assigned but not selected"
            )
        allocation = Allocation(
            assignments=assignments, unassigned_blocks=tuple(int(b) for b in data["unassigned_blocks"]),
            reasons={str(c): str(r) for c, r in dict(data["reasons"]).items()},
            block_divergence={int(b): float(d) for b, d in dict(data["block_divergence"]).items()},
            withdrawn_blocks=tuple(int(b) for b in data["withdrawn_blocks"]),
        )  # fmt: skip
        deadline = float(data["allocation_deadline"])
    except (KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"not a round plan: {type(exc).__name__}: {exc}") from exc
    training = {cid: blocks for cid, blocks in assignments.items() if blocks}
    return RoundPlan(round_, selected, allocation, training, deadline, recipe)


@dataclass(frozen=True)
class Reply:
    """One client's update as the round sees it: its change per block and the samples it claims.
    ``round`` is the round it was made for (earlier than the closing round for a late update)."""

    client_id: str
    delta: BlockState
    num_samples: int
    round: int


@dataclass(frozen=True)
class RoundOutcome:
    new_state: BlockState
    optimizer_state: OptimizerState | None
    accepted: tuple[str, ...]  # clients whose update of this round entered the average
    late_accepted: tuple[str, ...]  # clients whose late update was folded in
    rejected: tuple[tuple[str, str, str], ...]  # (client, code, reason)
    norms: dict[str, float]  # each on-time update's norm
    per_block: dict[int, BlockReport]
    # with DP on: the share of accepted updates that clipping scaled down (else None)
    clipped_fraction: float | None = None


def close_round(
    policy: RoundPolicy,
    plan: RoundPlan,
    global_state: BlockState,
    layout: Any,
    replies: Sequence[Reply],
    optimizer_state: OptimizerState | None = None,
    late: Sequence[Reply] = (),
    noise: privacy.NoiseSource | None = None,
) -> RoundOutcome:
    """Screen, weigh and aggregate the round's ``replies`` (and, with ``late_updates: fold``, the
    ``late`` ones) into the new global block state.

    Replies are taken in client-id order, not arrival order: the float sums (and so the weights) do
    not depend on which update came first, so a resumed run aggregates exactly as an uninterrupted one.

    With ``policy.privacy`` set, ``noise`` is the generator the DP noise is drawn from (required: the
    caller decides whether it is unpredictable or seeded), and the norm outlier test is skipped: it
    compares an update with the round's others, so one client could decide whether another's update
    counts, an influence the sensitivity C does not bound; clipping bounds every update instead.
    """
    dp = policy.privacy
    if dp is not None and noise is None:
        raise PrivacyError("close_round with differential privacy on needs a noise generator")
    ordered = sorted(replies, key=lambda r: r.client_id)
    norms = {r.client_id: aggregation.update_norm(r.delta) for r in ordered}
    allowed = policy.recipe.steps * policy.recipe.batch_size  # the most samples a task asks for
    accepted: list[ClientUpdate] = []
    rejected: list[tuple[str, str, str]] = []
    for r in ordered:
        others = None if dp is not None else [n for other, n in norms.items() if other != r.client_id]
        verdict = aggregation.screen_update(
            r.delta, plan.assignments.get(r.client_id, ()), layout, others, policy.norm_bound_factor
        )
        if not verdict.accepted:
            rejected.append((r.client_id, verdict.code, verdict.reason))
            continue
        accepted.append(ClientUpdate(r.client_id, r.delta, min(r.num_samples, allowed), 0))
    on_time = {u.client_id for u in accepted}
    late_accepted: list[str] = []
    if policy.late_updates == "fold":
        for r in late:
            verdict = aggregation.screen_update(
                r.delta, tuple(global_state), layout, list(norms.values()), policy.norm_bound_factor
            )
            if not verdict.accepted:
                rejected.append((r.client_id, verdict.code, "late update: " + verdict.reason))
            elif r.client_id not in on_time and r.client_id not in late_accepted:
                accepted.append(ClientUpdate(r.client_id, r.delta, min(r.num_samples, allowed),
                                             plan.round - r.round))  # fmt: skip
                late_accepted.append(r.client_id)
    clipped_fraction = None
    if dp is not None:
        assert noise is not None
        result, clipped_fraction = _private_aggregate(
            policy, dp, global_state, accepted, optimizer_state, noise
        )
    else:
        result = aggregation.aggregate(
            global_state, accepted, policy.server_optimizer, policy.staleness_decay, optimizer_state,
            block_average=policy.block_average,
        )  # fmt: skip
    return RoundOutcome(
        new_state=result.new_state, optimizer_state=result.optimizer_state,
        accepted=tuple(u.client_id for u in accepted if u.client_id in on_time),
        late_accepted=tuple(late_accepted), rejected=tuple(rejected), norms=norms, per_block=result.per_block,
        clipped_fraction=clipped_fraction,
    )  # fmt: skip


def _private_aggregate(
    policy: RoundPolicy,
    dp: PrivacyPolicy,
    global_state: BlockState,
    accepted: Sequence[ClientUpdate],
    optimizer_state: OptimizerState | None,
    noise: privacy.NoiseSource,
) -> tuple[aggregation.AggregationResult, float | None]:
    """DP-FedAvg over the screened updates: clip, noisy equal-weight average, the server step."""
    clipped: dict[str, BlockState] = {}
    scaled = 0
    for u in accepted:
        clipped[u.client_id], norm = privacy.clip_update(u.delta, dp.clip_norm)
        scaled += norm > dp.clip_norm
    avg, trainers = privacy.noisy_average(global_state, clipped, dp, policy.block_average, noise)
    members = {b: [(cid, 1.0) for cid in cids] for b, cids in trainers.items()}
    result = aggregation.apply_average(global_state, avg, members, policy.server_optimizer, optimizer_state)
    return result, scaled / len(accepted) if accepted else None


def trained_blocks(outcome: RoundOutcome) -> list[int]:
    """The blocks some accepted update changed this round (what ``last_trained`` records)."""
    return [block_id for block_id, report in outcome.per_block.items() if report.trainers]
