"""Block allocation: which new blocks each client trains in a round.

Every round the coordinator gives each selected client a subset of the new blocks. A client trains
its subset for ``steps`` steps and sends back a delta; each block is then averaged over the
clients that trained it. :func:`allocate` decides the subsets from what the clients reported.

**What a block costs a client.** Backprop stops at the lowest trainable block, so a step costs a
forward through all ``num_layers`` layers plus a backward from the output down to that block::

    step_seconds = base_forward_seconds + layer_backward_seconds * (num_layers - lowest_layer_index)

A set of blocks is *feasible* for a client when it holds at most ``max_blocks`` blocks (memory)
and ``steps * step_seconds <= deadline_seconds``. Only the lowest block of the set enters the
time, so a client can afford every block at or above some depth: a slow client can only afford
the top of the stack, and a client that can not afford even the top block gets nothing.

**What a block risks.** New blocks at the very top of the stack (after the last base layer) forget
far more general ability when trained than blocks interleaved between base layers. Each
:class:`BlockSlot` carries a ``forgetting_risk`` (:func:`forgetting_risk_by_position` gives
defaults). A client whose trainer does not run self-distillation (``distills=False``) is never
given a block whose risk exceeds ``max_unprotected_risk``.

**Strategies** (:attr:`AllocationPolicy.strategy`):

* ``fedbe`` (default). First *coverage*: blocks are taken in order of staleness (never trained
  first, then smallest ``last_trained``, then block id) and each gets one trainer, the free client
  with the lowest score; if every client that could train it is full, trainers already placed are
  moved along an augmenting path to make room (as in bipartite matching). Then *fill*: the spare
  capacity of every client is filled greedily, each time adding the (client, block) pair with the
  largest gain, until no client can take another block. Scores and gains weigh four things:
  label balance, the Jensen-Shannon divergence (base 2, 0 to 1) between the combined label
  histogram of a block's trainers and the global one (all clients' histograms summed); cost, the
  fraction of the client's deadline the block adds, times ``cost_weight``; and forgetting risk,
  times ``risk_weight``. Ties go to a client order shuffled by ``seed``.
* ``random`` (ablation): each client gets as many blocks as it can hold, drawn at random from those
  it can afford.
* ``all`` (ablation): each client gets as many blocks as it can hold, nearest the output first.

**Label skew** (``max_block_divergence``, ``fedbe`` only). A block trained by one client whose data
is mostly one label learns that label, and averaging can not undo it when nobody else trains the
block (the benchmark's seed 2: the one fast client held 44 politics articles of 48, was the only one
that could reach the lower blocks, and the global model collapsed toward "politics"). With a bound
below 1 the allocation above is kept when every block it trains is within the bound; otherwise it
is made again with a fill that never adds a client leaving a block past the bound (unless that
lowers the block's divergence), and a block still past the bound is withdrawn for the round: it
stays as it is (a fresh block is the identity) and the allocation is made again without it, so its
trainers' capacity goes to other blocks. Every trained block then has divergence <= the bound.

The ablations respect memory and deadline only: they ignore forgetting risk and labels.

**Guarantees of ``fedbe``** (the coverage ones with ``max_block_divergence`` 1, its default, since a
bound withdraws blocks on purpose). No client gets more than ``max_blocks`` blocks or a set it can not
finish by its deadline. Coverage is the best possible: the covered blocks are as many as any
feasible allocation could cover, and a block is left without a trainer only if covering it would
uncover a block that is more stale. In particular every block gets a trainer exactly when Hall's
condition holds: for every set X of blocks, the clients able to train at least one block of X have
``max_blocks`` summing to at least ``|X|``. With every client distilling this reads: for every block
b, the blocks at or below b are no more than the summed ``max_blocks`` of the clients that can
afford b. (Enough total capacity with every block affordable to someone is not sufficient: a fast
client with room for one block and a slow one with room for many can not cover two deep blocks.)
The result depends only on the inputs and the seed, not on the order of the clients.
"""

from __future__ import annotations

import heapq
import math
import random
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from fedbe.errors import FedbeError

Strategy = Literal["fedbe", "random", "all"]
STRATEGIES: tuple[str, ...] = ("fedbe", "random", "all")


class AllocationError(FedbeError, ValueError):
    """The inputs of an allocation are invalid or inconsistent."""


@dataclass(frozen=True)
class BlockSlot:
    """A new block as the allocation sees it: where it sits and how much it risks forgetting."""

    block_id: int
    layer_index: int  # position in the expanded stack
    forgetting_risk: float = 0.0

    def __post_init__(self) -> None:
        for name in ("block_id", "layer_index"):
            value = getattr(self, name)
            _check(_is_int(value) and value >= 0, f"slot {name} {value!r} must be an int >= 0")
        risk = self.forgetting_risk
        _check(_nonneg(risk), f"slot {self.block_id}: forgetting_risk {risk!r} must be finite and >= 0")


@dataclass(frozen=True)
class ClientCapacity:
    """What one client can do this round, from its measurements, and which labels its data holds."""

    client_id: str
    max_blocks: int  # trainable blocks that fit in memory
    base_forward_seconds: float  # one forward through all layers at the training shape
    layer_backward_seconds: float  # backward per layer from the lowest trainable block up
    steps: int
    deadline_seconds: float
    label_histogram: dict[str, float]  # examples per label
    distills: bool = True  # the trainer runs self-distillation (it is protected against forgetting)

    def __post_init__(self) -> None:
        who = f"client {self.client_id!r}"
        _check(isinstance(self.client_id, str) and bool(self.client_id), f"client_id {self.client_id!r}")
        _check(_is_int(self.max_blocks) and self.max_blocks >= 0, f"{who}: max_blocks must be an int >= 0")
        _check(_nonneg(self.base_forward_seconds), f"{who}: base_forward_seconds must be finite and >= 0")
        _check(_nonneg(self.layer_backward_seconds), f"{who}: layer_backward_seconds must be finite and >= 0")
        _check(_is_int(self.steps) and self.steps >= 1, f"{who}: steps must be an int >= 1")
        _check(_nonneg(self.deadline_seconds), f"{who}: deadline_seconds must be finite and >= 0")
        for label, count in self.label_histogram.items():
            _check(_nonneg(count), f"{who}: label {label!r} has count {count!r}; counts must be finite, >= 0")

    def step_seconds(self, lowest_layer: int, num_layers: int) -> float:
        """Seconds for one training step when the lowest trained block is at ``lowest_layer``."""
        return self.base_forward_seconds + self.layer_backward_seconds * (num_layers - lowest_layer)

    def round_seconds(self, lowest_layer: int, num_layers: int) -> float:
        """Seconds for ``steps`` training steps when the lowest trained block is at ``lowest_layer``."""
        return self.steps * self.step_seconds(lowest_layer, num_layers)

    def can_reach(self, layer_index: int, num_layers: int) -> bool:
        """Whether a set whose lowest block is at ``layer_index`` finishes by the deadline."""
        return self.round_seconds(layer_index, num_layers) <= self.deadline_seconds


@dataclass(frozen=True)
class AllocationPolicy:
    """How to allocate: the strategy and the weights of the ``fedbe`` objective."""

    strategy: Strategy = "fedbe"
    max_unprotected_risk: float = 0.5  # hard cap on forgetting risk for clients without distillation
    cost_weight: float = 0.1  # per fraction of the client's deadline a block adds
    risk_weight: float = 0.2  # per unit of a block's forgetting risk
    # a block whose trainers' pooled labels are farther than this (JS, 0-1) from the global histogram
    # is left untrained this round (1.0 = never)
    max_block_divergence: float = 1.0

    def __post_init__(self) -> None:
        _check(
            self.strategy in STRATEGIES, f"strategy {self.strategy!r}: choose one of {', '.join(STRATEGIES)}"
        )
        for name in ("max_unprotected_risk", "cost_weight", "risk_weight"):
            _check(_nonneg(getattr(self, name)), f"{name} {getattr(self, name)!r} must be finite and >= 0")
        bound = self.max_block_divergence
        _check(
            _nonneg(bound) and bound <= 1,
            f"max_block_divergence {bound!r} must be in [0, 1] (Jensen-Shannon, base 2; 1 = no limit)",
        )


@dataclass(frozen=True)
class Allocation:
    """The blocks each client trains (every client listed, sorted ids) and how the result came about."""

    assignments: dict[str, tuple[int, ...]]
    unassigned_blocks: tuple[int, ...]  # blocks nobody trains this round
    reasons: dict[str, str]  # client id -> "code: explanation"
    block_divergence: dict[int, float]  # JS divergence of each block's trainer labels; 1.0 if untrained
    # blocks left untrained because no trainers within max_block_divergence could be found
    withdrawn_blocks: tuple[int, ...] = ()


class _RegistryLike(Protocol):
    @property
    def num_layers(self) -> int: ...
    @property
    def new_layer_indices(self) -> tuple[int, ...]: ...
    @property
    def block_ids(self) -> tuple[int, ...]: ...


def forgetting_risk_by_position(
    layer_indices: Sequence[int], num_layers: int, top_risk: float = 1.0, interleaved_risk: float = 0.25
) -> tuple[float, ...]:
    """Default risk per new block: ``top_risk`` for blocks at the very top of the stack, else interleaved.

    A block is at the top when no base layer lies above it (every layer from it to the output is a
    new block), as with ``--placement top`` or the last block of ``interleave``.
    """
    new = set(layer_indices)
    _check(
        all(0 <= i < num_layers for i in new),
        f"layer indices {list(layer_indices)} outside 0..{num_layers - 1}",
    )
    return tuple(
        top_risk if all(j in new for j in range(i, num_layers)) else interleaved_risk for i in layer_indices
    )


def slots_from_registry(
    registry: _RegistryLike, top_risk: float = 1.0, interleaved_risk: float = 0.25
) -> tuple[BlockSlot, ...]:
    """One slot per new block of an expansion registry, with :func:`forgetting_risk_by_position` risks."""
    risks = forgetting_risk_by_position(
        registry.new_layer_indices, registry.num_layers, top_risk, interleaved_risk
    )
    return tuple(
        BlockSlot(b, i, r)
        for b, i, r in zip(registry.block_ids, registry.new_layer_indices, risks, strict=True)
    )


def jensen_shannon(p: Mapping[str, float], q: Mapping[str, float]) -> float:
    """Jensen-Shannon divergence (base 2, in [0, 1]) between two label histograms.

    Histograms need not be normalised; a label missing on one side counts 0 there. Identical
    distributions give 0, disjoint ones 1; an all-zero histogram is 0 from another all-zero one and 1
    from anything else.
    """
    for label, count in (*p.items(), *q.items()):
        _check(_nonneg(count), f"label {label!r} has count {count!r}; counts must be finite and >= 0")
    labels = sorted(set(p) | set(q))
    return _js([p.get(k, 0.0) for k in labels], [q.get(k, 0.0) for k in labels])


def allocate(
    slots: Sequence[BlockSlot],
    clients: Sequence[ClientCapacity],
    *,
    num_layers: int,
    last_trained: Mapping[int, int] | None = None,
    round: int = 0,
    seed: int = 0,
    policy: AllocationPolicy | None = None,
) -> Allocation:
    """Assign blocks to clients for round ``round`` (see the module docstring for the algorithm).

    ``last_trained`` maps block id -> the last round it was trained (blocks absent: never);
    ``policy`` defaults to ``AllocationPolicy()`` (strategy ``fedbe``).
    """
    policy = policy or AllocationPolicy()
    problem = _Problem.build(slots, clients, num_layers, last_trained or {}, round, seed, policy)
    if policy.strategy == "fedbe":
        chosen = problem.fedbe()
    elif policy.strategy == "random":
        chosen = problem.random()
    else:
        chosen = problem.all()
    return problem.result(chosen)


@dataclass
class _Problem:
    slots: dict[int, BlockSlot]
    clients: dict[str, ClientCapacity]  # sorted by id
    num_layers: int
    last_trained: Mapping[int, int]
    seed: int
    policy: AllocationPolicy
    eligible: dict[str, tuple[int, ...]]  # blocks each client may take (under the strategy's rules)
    hist: dict[str, list[float]]  # label histograms over one sorted label list
    global_hist: list[float]
    rank: dict[str, int]  # seeded tie-break order of clients
    withdrawn: set[int] = field(default_factory=set)  # blocks left untrained as too label-skewed

    @classmethod
    def build(
        cls,
        slots: Sequence[BlockSlot],
        clients: Sequence[ClientCapacity],
        num_layers: int,
        last_trained: Mapping[int, int],
        round_: int,
        seed: int,
        policy: AllocationPolicy,
    ) -> _Problem:
        _check(_is_int(num_layers) and num_layers >= 1, f"num_layers {num_layers!r} must be an int >= 1")
        by_id = {s.block_id: s for s in slots}
        _check(len(by_id) == len(slots), f"duplicate block ids in {[s.block_id for s in slots]}")
        layers = [s.layer_index for s in slots]
        _check(len(set(layers)) == len(layers), f"two slots share a layer index: {sorted(layers)}")
        _check(
            all(i < num_layers for i in layers),
            f"slot layer indices {sorted(layers)} exceed {num_layers} layers",
        )
        ids = [c.client_id for c in clients]
        _check(len(set(ids)) == len(ids), f"duplicate client ids in {sorted(ids)}")
        for block_id, when in last_trained.items():
            _check(
                _is_int(when) and when <= round_,
                f"block {block_id} last trained in round {when!r}, after {round_}",
            )
        ordered = dict(sorted((c.client_id, c) for c in clients))
        labels = sorted({label for c in clients for label in c.label_histogram})
        hist = {cid: [float(c.label_histogram.get(k, 0.0)) for k in labels] for cid, c in ordered.items()}
        shuffled = list(ordered)
        random.Random(seed).shuffle(shuffled)
        problem = cls(
            slots=dict(sorted(by_id.items())),
            clients=ordered,
            num_layers=num_layers,
            last_trained=last_trained,
            seed=seed,
            policy=policy,
            eligible={},
            hist=hist,
            global_hist=[sum(h[i] for h in hist.values()) for i in range(len(labels))],
            rank={cid: i for i, cid in enumerate(shuffled)},
        )
        problem.eligible = {cid: problem._eligible(c) for cid, c in ordered.items()}
        return problem

    def _eligible(self, client: ClientCapacity) -> tuple[int, ...]:
        if client.max_blocks == 0:
            return ()
        return tuple(
            b
            for b, s in self.slots.items()
            if client.can_reach(s.layer_index, self.num_layers) and not self._too_risky(client, s)
        )

    def _too_risky(self, client: ClientCapacity, slot: BlockSlot) -> bool:
        """``fedbe`` only: a client without self-distillation is kept off blocks past the risk cap."""
        capped = self.policy.strategy == "fedbe" and not client.distills
        return capped and slot.forgetting_risk > self.policy.max_unprotected_risk

    # -- ablations -------------------------------------------------------------------------------

    def random(self) -> dict[str, set[int]]:
        rng = random.Random(self.seed)
        return {
            cid: set(rng.sample(self.eligible[cid], min(c.max_blocks, len(self.eligible[cid]))))
            for cid, c in self.clients.items()
        }

    def all(self) -> dict[str, set[int]]:
        top_first = {
            cid: sorted(e, key=lambda b: -self.slots[b].layer_index) for cid, e in self.eligible.items()
        }
        return {cid: set(top_first[cid][: c.max_blocks]) for cid, c in self.clients.items()}

    # -- fedbe -----------------------------------------------------------------------------------

    def fedbe(self) -> dict[str, set[int]]:
        """Coverage then fill; with ``max_block_divergence`` < 1 and a block past it, bounded.

        The unbounded allocation is kept when every block it trains is within the bound. Otherwise
        coverage and fill run again with fill bounded (it never takes a pair that leaves a block past
        the bound unless that lowers the block's divergence: coverage may have had to give a block a
        single skewed trainer, and fill may bring it back). A block still past the bound (the worst
        one) is withdrawn from every client for this round and the allocation is made again without
        it, so the capacity it held goes to other blocks. An untrained new block stays as it was (a
        fresh one is the identity), which is safer than a block that learns one client's labels alone.
        """
        chosen, bounded = self._cover_and_fill(1.0), False
        while (worst := self._most_skewed(chosen)) is not None:
            if bounded:
                self.withdrawn.add(worst)
            chosen, bounded = self._cover_and_fill(self.policy.max_block_divergence), True
        return chosen

    def _cover_and_fill(self, bound: float) -> dict[str, set[int]]:
        chosen: dict[str, set[int]] = {cid: set() for cid in self.clients}
        trainers: dict[int, list[str]] = {
            b: [c for c in self.clients if b in self.eligible[c]]
            for b in self.slots
            if b not in self.withdrawn
        }
        for block in sorted(trainers, key=self._staleness_key):
            self._cover(block, chosen, trainers)
        self._fill(chosen, bound)
        return chosen

    def _most_skewed(self, chosen: dict[str, set[int]]) -> int | None:
        """The trained block farthest past ``max_block_divergence`` (ties: the lowest id), if any."""
        covered = sorted({b for blocks in chosen.values() for b in blocks})
        divergence = {b: _js(self._mix(b, chosen), self.global_hist) for b in covered}
        over = [b for b in covered if divergence[b] > self.policy.max_block_divergence]
        return max(over, key=lambda b: (divergence[b], -b)) if over else None

    def _staleness_key(self, block: int) -> tuple[int, int, int]:
        when = self.last_trained.get(block)
        return (0, 0, block) if when is None else (1, when, block)

    def _cover(self, block: int, chosen: dict[str, set[int]], trainers: dict[int, list[str]]) -> bool:
        """Give ``block`` one trainer, moving earlier coverage along a shortest augmenting path if needed.

        During coverage each client's set holds only blocks it is the sole trainer of, so moving a
        block from one client to another keeps every covered block covered.
        """

        def by_score(b: int) -> list[str]:
            return sorted(trainers[b], key=lambda c: (self._cover_score(c, b, chosen[c]), self.rank[c]))

        parent: dict[str, tuple[int, str | None]] = {}  # client -> (block it takes, client giving it up)
        queue: deque[str] = deque()
        for client in by_score(block):
            parent[client] = (block, None)
            queue.append(client)
        while queue:
            client = queue.popleft()
            if len(chosen[client]) < self.clients[client].max_blocks:
                giver: str | None = client
                while giver is not None:
                    taken, previous = parent[giver]
                    chosen[giver].add(taken)
                    if previous is not None:
                        chosen[previous].discard(taken)
                    giver = previous
                return True
            for held in sorted(chosen[client]):
                for other in by_score(held):
                    if other not in parent:
                        parent[other] = (held, client)
                        queue.append(other)
        return False

    def _cover_score(self, client: str, block: int, held: set[int]) -> float:
        return _js(self.hist[client], self.global_hist) + self._penalty(client, block, held)

    def _penalty(self, client: str, block: int, held: set[int]) -> float:
        """Weighted cost (fraction of the deadline that ``block`` adds to ``held``) plus weighted risk."""
        capacity, slot = self.clients[client], self.slots[block]
        before = min((self.slots[b].layer_index for b in held), default=None)
        after = slot.layer_index if before is None else min(before, slot.layer_index)
        added = capacity.round_seconds(after, self.num_layers)
        if before is not None:
            added -= capacity.round_seconds(before, self.num_layers)
        fraction = added / capacity.deadline_seconds if capacity.deadline_seconds > 0 else 0.0
        return self.policy.cost_weight * fraction + self.policy.risk_weight * slot.forgetting_risk

    def _fill(self, chosen: dict[str, set[int]], bound: float) -> None:
        """Fill spare capacity greedily with the (client, block) pair of largest gain, until none fits.

        Gain = drop in the block's JS divergence from adding the client's labels, minus the penalty.
        A pair that would leave the block's divergence above ``bound`` is not taken unless it lowers
        that divergence, nor is a withdrawn block. Heap entries carry the versions of their block and client; a stale
        entry is skipped, and every pair touched by an addition is pushed again with its new gain.
        """
        mix = {b: self._mix(b, chosen) for b in self.slots}
        now = {b: self._divergence(mix[b], covered=any(b in s for s in chosen.values())) for b in self.slots}
        block_version = dict.fromkeys(self.slots, 0)
        client_version = dict.fromkeys(self.clients, 0)
        heap: list[tuple[float, int, int, str, int, int]] = []

        def push(client: str, block: int) -> None:
            full = len(chosen[client]) >= self.clients[client].max_blocks
            if full or block in chosen[client] or block in self.withdrawn:
                return
            joined = [m + h for m, h in zip(mix[block], self.hist[client], strict=True)]
            after = _js(joined, self.global_hist)
            if after > bound and after >= now[block]:
                return
            gain = now[block] - after - self._penalty(client, block, chosen[client])
            entry = (-gain, self.rank[client], block, client, block_version[block], client_version[client])
            heapq.heappush(heap, entry)

        for client in self.clients:
            for block in self.eligible[client]:
                push(client, block)
        while heap:
            _, _, block, client, bv, cv = heapq.heappop(heap)
            if bv != block_version[block] or cv != client_version[client]:
                continue
            chosen[client].add(block)
            mix[block] = [m + h for m, h in zip(mix[block], self.hist[client], strict=True)]
            now[block] = _js(mix[block], self.global_hist)
            block_version[block] += 1
            client_version[client] += 1
            for other in self.clients:
                if block in self.eligible[other]:
                    push(other, block)
            for other_block in self.eligible[client]:
                push(client, other_block)

    # -- result ----------------------------------------------------------------------------------

    def _mix(self, block: int, chosen: dict[str, set[int]]) -> list[float]:
        mix = [0.0] * len(self.global_hist)
        for client, blocks in chosen.items():
            if block in blocks:
                mix = [m + h for m, h in zip(mix, self.hist[client], strict=True)]
        return mix

    def _divergence(self, mix: list[float], covered: bool) -> float:
        return _js(mix, self.global_hist) if covered else 1.0

    def result(self, chosen: dict[str, set[int]]) -> Allocation:
        covered = {b for blocks in chosen.values() for b in blocks}
        return Allocation(
            assignments={cid: tuple(sorted(blocks)) for cid, blocks in chosen.items()},
            unassigned_blocks=tuple(b for b in self.slots if b not in covered),
            reasons={cid: self._reason(c, chosen[cid]) for cid, c in self.clients.items()},
            block_divergence={b: self._divergence(self._mix(b, chosen), b in covered) for b in self.slots},
            withdrawn_blocks=tuple(sorted(self.withdrawn)),
        )

    def _reason(self, client: ClientCapacity, blocks: set[int]) -> str:
        if not self.slots:
            return "no_blocks: there are no new blocks to train"
        if client.max_blocks == 0:
            return "no_memory: max_blocks is 0, no trainable block fits in memory"
        top = max(self.slots.values(), key=lambda s: s.layer_index)
        if not client.can_reach(top.layer_index, self.num_layers):
            need = client.round_seconds(top.layer_index, self.num_layers)
            return (
                f"over_deadline: even the top block {top.block_id} (layer {top.layer_index}) needs "
                f"{client.steps} steps x {need / client.steps:.3g} s = {need:.3g} s, over the "
                f"{client.deadline_seconds:.3g} s deadline"
            )
        if not self.eligible[client.client_id]:
            return (
                f"too_risky: no self-distillation, and every block it can afford has forgetting risk above "
                f"{self.policy.max_unprotected_risk:g}"
            )
        if not blocks:
            skewed = sorted(self.withdrawn.intersection(self.eligible[client.client_id]))
            why = f" (blocks {skewed} withdrawn: their trainers' labels were too skewed)" if skewed else ""
            return f"not_chosen: {len(self.eligible[client.client_id])} blocks allowed, none chosen{why}"
        lowest = min(self.slots[b].layer_index for b in blocks)
        spent = client.round_seconds(lowest, self.num_layers)
        return (
            f"assigned: {len(blocks)} of max {client.max_blocks} blocks {sorted(blocks)} "
            f"({len(self.eligible[client.client_id])} allowed); lowest layer {lowest}, "
            f"{spent:.3g} s of the {client.deadline_seconds:.3g} s deadline"
        )


def _js(p: Sequence[float], q: Sequence[float]) -> float:
    """Base-2 Jensen-Shannon divergence of two aligned, possibly unnormalised histograms."""
    sp, sq = math.fsum(p), math.fsum(q)
    if sp <= 0 or sq <= 0:
        return 0.0 if sp <= 0 and sq <= 0 else 1.0
    total = 0.0
    for a, b in zip(p, q, strict=True):
        a, b = a / sp, b / sq
        m = (a + b) / 2
        if a > 0:
            total += a * math.log2(a / m)
        if b > 0:
            total += b * math.log2(b / m)
    return min(1.0, max(0.0, total / 2))


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _nonneg(value: object) -> bool:
    return (
        isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value >= 0
    )


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise AllocationError(message)
