"""Aggregation: screen each client's update, average each block over its trainers, step the server.

Three pure pieces, in the order a round uses them:

* :func:`screen_update` decides whether one update may enter the average: it must only touch
  blocks the client was assigned, match the model's block layout, hold finite values, and its norm
  must not be far outside the round's other updates (or above an absolute cap). A rejection says
  why with a short code (for counting) and a sentence (for people).
* :func:`aggregate` averages, per block, the deltas of the clients that trained that block,
  weighted by ``num_samples * staleness_decay ** staleness``; a block nobody trained keeps its
  tensors exactly. The average is applied as is (FedAvg) or through a server optimizer.
  ``block_average`` says what a block's average is over: ``"trainers"`` (the clients that trained
  it) or ``"round"`` (every client of the round, one that did not train the block counting as a
  zero delta). With ``"round"`` the global model moves by the sample-weighted mean of the clients'
  own changes, each made through the blocks it trained -- FedAvg of the function, not of each
  block -- so a client that trains more blocks than the others does not outweigh them; with
  ``"trainers"`` a client that trains a block alone moves it by its whole delta.
* :class:`FedAvgM` and :class:`FedAdam` are the server optimizers of Reddi et al. (2021),
  "Adaptive Federated Optimization": a frozen config with a ``step`` that takes and returns its
  state explicitly (:class:`FedAvgMState`, :class:`FedAdamState`), so the coordinator can
  checkpoint the state. They act per block, and only on blocks updated this round: the buffers of
  other blocks are left as they are (not decayed).

The averaged client delta plays the part of the (negative) pseudo-gradient: FedAvg adds it,
FedAvgM adds ``lr`` times its momentum, FedAdam adds ``lr * m / (sqrt(v) + tau)``.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import torch

from fedbe.blocks import BlockState, apply_delta, weighted_average
from fedbe.compression import layout_of, layout_problems
from fedbe.errors import BlockStateError, FedbeError

BLOCK_AVERAGES = ("trainers", "round")
SCREEN_CODES = ("ok", "empty", "unassigned_block", "shape_mismatch", "non_finite", "norm_cap", "norm_outlier")


class AggregationError(FedbeError, ValueError):
    """Updates or settings handed to aggregation are invalid."""


@dataclass(frozen=True)
class ScreenResult:
    """Whether an update may be aggregated; ``code`` is one of :data:`SCREEN_CODES`."""

    accepted: bool
    reason: str
    code: str = "ok"


@dataclass(frozen=True)
class ClientUpdate:
    """One client's delta for the blocks it trained, with how much data made it and how late it is."""

    client_id: str
    delta: BlockState
    num_samples: int
    staleness: int = 0  # rounds between the weights it trained from and the current ones


@dataclass(frozen=True)
class BlockReport:
    """What happened to one block: who trained it, their total weight, the norm of their average delta."""

    trainers: tuple[str, ...]
    weight_total: float
    update_norm: float


@dataclass(frozen=True)
class FedAvgMState:
    momentum: BlockState = field(default_factory=dict)


@dataclass(frozen=True)
class FedAdamState:
    m: BlockState = field(default_factory=dict)
    v: BlockState = field(default_factory=dict)


OptimizerState = FedAvgMState | FedAdamState
_S = TypeVar("_S", FedAvgMState, FedAdamState)


@dataclass(frozen=True)
class AggregationResult:
    new_state: BlockState
    per_block: dict[int, BlockReport]  # every block of the global state
    optimizer_state: OptimizerState | None = None


def update_norm(delta: BlockState) -> float:
    """L2 norm of an update over all its blocks and parameters (float64 accumulation)."""
    total = math.fsum(float(t.double().pow(2).sum()) for params in delta.values() for t in params.values())
    return math.sqrt(total)


def screen_update(
    delta: BlockState,
    assigned: Collection[int],
    expected_layout: Mapping[int, Mapping[str, tuple[int, ...]]],
    round_norms: Sequence[float] | None = None,
    norm_bound_factor: float = 10.0,
    *,
    max_norm: float | None = None,
) -> ScreenResult:
    """Accept or reject one update, checking in this order (the first failure is the reason).

    1. ``empty``: it holds no block.
    2. ``unassigned_block``: it holds a block not in ``assigned``.
    3. ``shape_mismatch``: a block's parameter names or shapes differ from ``expected_layout``
       (assigned blocks may be absent: a client may send a subset).
    4. ``non_finite``: a value is NaN or infinite.
    5. ``norm_cap``: its L2 norm (:func:`update_norm`) exceeds ``max_norm``, when one is set.
    6. ``norm_outlier``: its norm exceeds ``norm_bound_factor`` times the median of
       ``round_norms`` (the norms of the round's *other* updates); checked only with at least two
       others and a median above 0.
    """
    if not delta:
        return _reject("empty", "the update holds no block")
    extra = sorted(set(delta) - set(assigned))
    if extra:
        return _reject("unassigned_block", f"update for block(s) {extra}, assigned only {sorted(assigned)}")
    problems = layout_problems(layout_of(delta), expected_layout, require_all_blocks=False)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        return _reject("shape_mismatch", problems[0] + more)
    for block_id in sorted(delta):
        for name, tensor in sorted(delta[block_id].items()):
            if not bool(torch.isfinite(tensor).all()):
                kind = "NaN" if bool(torch.isnan(tensor).any()) else "an infinite value"
                return _reject("non_finite", f"block {block_id} parameter {name!r} holds {kind}")
    norm = update_norm(delta)
    if max_norm is not None and norm > max_norm:
        return _reject("norm_cap", f"update norm {norm:.3g} is above the cap {max_norm:.3g}")
    if round_norms is not None and len(round_norms) >= 2:
        median = statistics.median(round_norms)
        if median > 0 and norm > norm_bound_factor * median:
            return _reject(
                "norm_outlier",
                f"update norm {norm:.3g} is {norm / median:.3g} x the round median {median:.3g}; "
                f"bound is {norm_bound_factor:g}x",
            )
    return ScreenResult(True, f"accepted, update norm {norm:.3g}", "ok")


def _reject(code: str, text: str) -> ScreenResult:
    return ScreenResult(False, text, code)


@dataclass(frozen=True)
class FedAvgM:
    """Server momentum: ``u = momentum * u + delta; x = x + lr * u`` (lr 1, momentum 0 is FedAvg)."""

    lr: float = 1.0
    momentum: float = 0.9

    def __post_init__(self) -> None:
        _check_real("FedAvgM lr", self.lr, low=0.0, low_open=True)
        _check_real("FedAvgM momentum", self.momentum, low=0.0, high=1.0)

    def init_state(self) -> FedAvgMState:
        return FedAvgMState()

    def step(
        self, state: OptimizerState | None, global_state: BlockState, avg_delta: BlockState
    ) -> tuple[BlockState, FedAvgMState]:
        """Apply ``avg_delta`` to the blocks it holds; others (weights and momentum) stay as they are."""
        state = _state_of(state, FedAvgMState)
        _check_layout(global_state, avg_delta)
        new_global, momentum = _copy(global_state), _copy(state.momentum)
        for block_id, params in avg_delta.items():
            old = state.momentum.get(block_id, {})
            u = {n: self.momentum * old[n] + d if n in old else d.clone() for n, d in params.items()}
            momentum[block_id] = u
            new_global[block_id] = {n: t + self.lr * u[n] for n, t in global_state[block_id].items()}
        return new_global, FedAvgMState(momentum)


@dataclass(frozen=True)
class FedAdam:
    """Adaptive server step (Reddi et al. 2021, Alg. 2, no bias correction).

    ``m = b1 m + (1 - b1) d``; ``v = b2 v + (1 - b2) d^2``; ``x = x + lr * m / (sqrt(v) + tau)``, with
    ``m`` starting at 0 and ``v`` at ``tau^2`` (the paper asks ``v_-1 >= tau^2``).
    """

    lr: float = 1e-2
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3

    def __post_init__(self) -> None:
        _check_real("FedAdam lr", self.lr, low=0.0, low_open=True)
        _check_real("FedAdam beta1", self.beta1, low=0.0, high=1.0, high_open=True)
        _check_real("FedAdam beta2", self.beta2, low=0.0, high=1.0, high_open=True)
        _check_real("FedAdam tau", self.tau, low=0.0, low_open=True)

    def init_state(self) -> FedAdamState:
        return FedAdamState()

    def step(
        self, state: OptimizerState | None, global_state: BlockState, avg_delta: BlockState
    ) -> tuple[BlockState, FedAdamState]:
        """Apply ``avg_delta`` to the blocks it holds; others (weights, m and v) stay as they are."""
        state = _state_of(state, FedAdamState)
        _check_layout(global_state, avg_delta)
        new_global, m, v = _copy(global_state), _copy(state.m), _copy(state.v)
        b1, b2 = self.beta1, self.beta2
        for block_id, params in avg_delta.items():
            m_old, v_old = state.m.get(block_id, {}), state.v.get(block_id, {})
            m[block_id] = {
                n: b1 * m_old.get(n, torch.zeros_like(d)) + (1 - b1) * d for n, d in params.items()
            }
            v[block_id] = {
                n: b2 * v_old.get(n, torch.full_like(d, self.tau**2)) + (1 - b2) * d * d
                for n, d in params.items()
            }
            new_global[block_id] = {
                n: t + self.lr * m[block_id][n] / (v[block_id][n].sqrt() + self.tau)
                for n, t in global_state[block_id].items()
            }
        return new_global, FedAdamState(m, v)


ServerOptimizer = FedAvgM | FedAdam


def aggregate(
    global_state: BlockState,
    updates: Sequence[ClientUpdate],
    server_optimizer: ServerOptimizer | None = None,
    staleness_decay: float = 1.0,
    optimizer_state: OptimizerState | None = None,
    block_average: str = "trainers",
) -> AggregationResult:
    """Average each block over the clients that trained it (or, with ``block_average="round"``,
    over every update, a missing block counting as zero) and apply the result.

    Weights are ``num_samples * staleness_decay ** staleness``, renormalised per block
    (:func:`fedbe.blocks.weighted_average`). Blocks no update holds (or whose trainers all weigh 0)
    keep their tensors, the very same objects. With ``server_optimizer=None`` the average is added
    to the weights (FedAvg); otherwise ``server_optimizer.step`` applies it, starting from
    ``optimizer_state`` (None: fresh) and returning the new state in the result. Screen updates
    first: a layout mismatch here raises :class:`~fedbe.errors.BlockStateError`.
    """
    _check_real("staleness_decay", staleness_decay, low=0.0, high=1.0, low_open=True)
    if block_average not in BLOCK_AVERAGES:
        raise AggregationError(f"block_average {block_average!r}: choose one of {', '.join(BLOCK_AVERAGES)}")
    ids = [u.client_id for u in updates]
    if len(set(ids)) != len(ids):
        raise AggregationError(f"more than one update from a client: {sorted(ids)}")
    weights = [_weight(u, staleness_decay) for u in updates]
    unknown = sorted({b for u in updates for b in u.delta} - set(global_state))
    if unknown:
        raise AggregationError(f"updates hold block(s) {unknown} that the global state does not have")
    avg = weighted_average([u.delta for u in updates], weights, absent_as_zero=block_average == "round")
    members = {
        block_id: [
            (u.client_id, w) for u, w in zip(updates, weights, strict=True) if block_id in u.delta and w > 0
        ]
        for block_id in avg
    }
    return apply_average(global_state, avg, members, server_optimizer, optimizer_state)


def apply_average(
    global_state: BlockState,
    avg: BlockState,
    members: Mapping[int, Sequence[tuple[str, float]]],
    server_optimizer: ServerOptimizer | None = None,
    optimizer_state: OptimizerState | None = None,
) -> AggregationResult:
    """Apply an averaged delta (FedAvg: add it; else ``server_optimizer.step``) and report each block.

    ``members`` gives, per block of ``avg``, its trainers and their weights (the report's
    ``trainers`` and ``weight_total``). :func:`aggregate` and the private average of
    :mod:`coordinator.privacy` share it, so a DP round steps the server exactly as any other.
    """
    if server_optimizer is None:
        new_state = apply_delta(global_state, avg)
        new_opt_state: OptimizerState | None = optimizer_state
    else:
        new_state, new_opt_state = server_optimizer.step(optimizer_state, global_state, avg)
    per_block = {}
    for block_id in sorted(global_state):
        block_members = members.get(block_id, []) if block_id in avg else []
        per_block[block_id] = BlockReport(
            trainers=tuple(c for c, _ in block_members),
            weight_total=math.fsum(w for _, w in block_members),
            update_norm=update_norm({block_id: avg[block_id]}) if block_id in avg else 0.0,
        )
    return AggregationResult(new_state, per_block, new_opt_state)


def _weight(update: ClientUpdate, decay: float) -> float:
    n, s = update.num_samples, update.staleness
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise AggregationError(f"client {update.client_id!r}: num_samples {n!r} must be an int >= 0")
    if isinstance(s, bool) or not isinstance(s, int) or s < 0:
        raise AggregationError(f"client {update.client_id!r}: staleness {s!r} must be an int >= 0")
    return float(n) * decay**s


def _state_of(state: OptimizerState | None, kind: type[_S]) -> _S:
    if state is None:
        return kind()
    if not isinstance(state, kind):
        raise AggregationError(f"optimizer state is a {type(state).__name__}, expected a {kind.__name__}")
    return state


def _copy(state: BlockState) -> BlockState:
    """New dicts holding the same tensors (tensors are never modified in place here)."""
    return {block_id: dict(params) for block_id, params in state.items()}


def _check_layout(global_state: BlockState, avg_delta: BlockState) -> None:
    problems = layout_problems(layout_of(avg_delta), layout_of(global_state), require_all_blocks=False)
    if problems:
        raise BlockStateError("aggregated delta does not match the global state: " + "; ".join(problems))


def _check_real(
    name: str,
    value: float,
    *,
    low: float,
    high: float = math.inf,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        lo, hi = ("(" if low_open else "[") + f"{low:g}", f"{high:g}" + (")" if high_open else "]")
        raise AggregationError(f"{name} {value!r} must be a finite number in {lo}, {hi}")
