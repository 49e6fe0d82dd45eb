"""Client-level differential privacy of the model updates (DP-FedAvg), and its accounting.

The mechanism (McMahan et al. 2018, "Learning Differentially Private Recurrent Language Models"),
as :func:`coordinator.round.close_round` runs it when the round's policy carries a
:class:`PrivacyPolicy`:

1. :func:`clip_update`: each accepted client's whole update -- every block it trained, as one
   vector -- is scaled down to L2 norm at most ``clip_norm`` (C); a smaller update is left as it is.
2. :func:`noisy_average`: every client weighs the same (weighting by the samples a client claims
   would let one client's share, and so the sensitivity, exceed C). For each block, the clipped
   deltas of its trainers are summed, Gaussian noise N(0, (noise_multiplier * C)^2) is added to
   every coordinate, and the sum is divided by the block's trainer count (``block_average:
   trainers``) or by the round's accepted clients (``round``). A block nobody trained gets no
   update and no noise.

Why that is one Gaussian mechanism of sensitivity C: put every block's sum in one vector. A client
adds its clipped update to the blocks it trained, and that contribution has norm <= C over all of
them together, so adding or removing one client moves the vector by at most C; independent noise of
standard deviation ``noise_multiplier * C`` on each coordinate is then the Gaussian mechanism with
that noise multiplier. Dividing by the realised trainer count (which itself depends on who took
part), as Flower's server-side fixed clipping does, is a common simplification the analysis ignores.
So is the choice of the noised blocks: the analysis takes which blocks were trained this round (the
plan, and who answered) as given; a block trained by one client alone tells that it took part.

Accounting (:func:`epsilon`): each round is a Poisson-subsampled Gaussian mechanism with sampling
rate q = clients selected / clients eligible that round and the noise multiplier; the rounds so far
compose under Renyi DP (``dp_accounting.rdp.RdpAccountant``), and epsilon is reported at ``delta``.
fedbe samples a fixed-size subset of the eligible clients, not each client independently with
probability q; the Poisson analysis approximates that (as TensorFlow Federated and Opacus do).

What epsilon covers: the sequence of global models. The coordinator itself sees every raw update
(central DP: it is trusted), and what it writes to metrics.jsonl about single clients (their update
norms, losses, sample counts, federated evaluation scores) is outside the guarantee.

Noise: the daemon draws it from :class:`SystemNoise`, normal deviates made from the operating
system's cryptographic random bytes (``os.urandom``), so nobody can predict or replay it -- a
generator seeded once, even from entropy, could be recovered from enough of its output. The bench
passes :class:`SeededNoise`, seeded from its seed, to be reproducible (a simulation only). Like
every floating-point Gaussian sampler, neither defends against attacks on the low-order bits of
the noised values (Mironov 2012); what they protect is a model update, not a counting query.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from coordinator.aggregation import update_norm
from fedbe.blocks import BlockState
from fedbe.errors import FedbeError


class PrivacyError(FedbeError, ValueError):
    """Privacy settings or an accounting history are invalid."""


@dataclass(frozen=True)
class PrivacyPolicy:
    """DP-FedAvg's settings. ``epsilon_budget`` None: epsilon is reported, no round is refused."""

    noise_multiplier: float
    clip_norm: float
    delta: float = 1e-5
    epsilon_budget: float | None = None

    def __post_init__(self) -> None:
        if not _real(self.noise_multiplier) or self.noise_multiplier < 0:
            raise PrivacyError(f"noise_multiplier {self.noise_multiplier!r} must be a finite number >= 0")
        if not _real(self.clip_norm) or self.clip_norm <= 0:
            raise PrivacyError(f"clip_norm {self.clip_norm!r} must be a finite number > 0")
        if not _real(self.delta) or not 0 < self.delta < 1:
            raise PrivacyError(f"delta {self.delta!r} must be a number in (0, 1)")
        if self.epsilon_budget is not None and (not _real(self.epsilon_budget) or self.epsilon_budget <= 0):
            raise PrivacyError(f"epsilon_budget {self.epsilon_budget!r} must be a finite number > 0 or None")

    @property
    def noise_std(self) -> float:
        """The standard deviation of the noise on each coordinate of a block's sum."""
        return self.noise_multiplier * self.clip_norm


@dataclass(frozen=True)
class RoundPrivacy:
    """What one round cost: its sampling rate and noise multiplier (what the accountant composes)."""

    sample_rate: float
    noise_multiplier: float

    def __post_init__(self) -> None:
        if not _real(self.sample_rate) or not 0 < self.sample_rate <= 1:
            raise PrivacyError(f"sample_rate {self.sample_rate!r} must be a number in (0, 1]")
        if not _real(self.noise_multiplier) or self.noise_multiplier < 0:
            raise PrivacyError(f"noise_multiplier {self.noise_multiplier!r} must be a finite number >= 0")


def sample_rate(selected: int, eligible: int) -> float:
    """q of a round that selects ``selected`` of ``eligible`` clients."""
    if eligible < 1 or not 0 < selected <= eligible:
        raise PrivacyError(
            f"a round selecting {selected} of {eligible} eligible clients has no sampling rate"
        )
    return selected / eligible


def clip_update(delta: BlockState, clip_norm: float) -> tuple[BlockState, float]:
    """``delta`` scaled to L2 norm at most ``clip_norm`` over all its blocks together, and its norm
    before. An update already within the bound is returned as it is (the same tensors)."""
    norm = update_norm(delta)
    if norm <= clip_norm:
        return delta, norm
    scale = clip_norm / norm
    return {b: {n: t * scale for n, t in params.items()} for b, params in delta.items()}, norm


def noisy_average(
    global_state: BlockState,
    clipped: Mapping[str, BlockState],
    policy: PrivacyPolicy,
    block_average: str,
    noise: NoiseSource,
) -> tuple[BlockState, dict[int, tuple[str, ...]]]:
    """Per block trained by some client in ``clipped`` (client id -> clipped delta): the sum of its
    trainers' deltas plus N(0, noise_std^2) per coordinate, divided by its trainer count
    (``block_average="trainers"``) or by the number of clients (``"round"``); and each block's trainers.

    The block's parameters are the global state's (a client that sent a subset of them adds zero to
    the rest, which are noised all the same). Blocks and parameters are visited in sorted order, so
    the noise a seeded ``noise`` source draws does not depend on the order the updates came in.
    """
    trainers: dict[int, tuple[str, ...]] = {}
    for cid in sorted(clipped):
        for block_id in clipped[cid]:
            trainers[block_id] = (*trainers.get(block_id, ()), cid)
    average: BlockState = {}
    for block_id in sorted(trainers):
        count = len(trainers[block_id]) if block_average == "trainers" else len(clipped)
        params = {}
        for name, reference in sorted(global_state[block_id].items()):
            total = torch.zeros_like(reference)
            for cid in trainers[block_id]:
                part = clipped[cid][block_id].get(name)
                if part is not None:
                    total = total + part.to(total.dtype)
            drawn = noise.normal(total.shape).to(dtype=total.dtype, device=total.device)
            params[name] = (total + policy.noise_std * drawn) / count
        average[block_id] = params
    return average, trainers


class NoiseSource(Protocol):
    """Where the DP noise comes from: standard normal deviates of a shape, float32."""

    def normal(self, shape: torch.Size | tuple[int, ...]) -> torch.Tensor: ...


class SeededNoise:
    """Reproducible noise from a seeded torch generator: simulations and tests only."""

    def __init__(self, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    def normal(self, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
        return torch.randn(shape, generator=self.generator)


class SystemNoise:
    """Normal deviates from the operating system's cryptographic random bytes (Box-Muller over
    53-bit uniforms), drawn in chunks so a block of 200M parameters needs no 200M-element temporary
    beyond the result. Nothing to seed, so nothing to replay."""

    CHUNK = 1 << 20  # pairs of deviates per os.urandom call

    def normal(self, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
        count = math.prod(shape)
        out = torch.empty(count, dtype=torch.float32)
        for start in range(0, count, 2 * self.CHUNK):
            pairs = min(self.CHUNK, (count - start + 1) // 2)
            words = torch.frombuffer(bytearray(os.urandom(16 * pairs)), dtype=torch.int64)
            # the top 53 bits of each word, as a uniform in (0, 1]: log() below never sees 0
            uniform = ((words >> 11) & ((1 << 53) - 1)).to(torch.float64).add_(1.0).mul_(2.0**-53)
            radius = torch.sqrt(-2.0 * torch.log(uniform[:pairs]))
            angle = (2.0 * math.pi) * uniform[pairs:]
            both = torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)])
            take = min(2 * pairs, count - start)
            out[start : start + take] = both[:take].to(torch.float32)
        return out.reshape(shape)


def epsilon(history: Sequence[RoundPrivacy], delta: float) -> float:
    """Epsilon at ``delta`` after the rounds of ``history`` (0 for none; inf with a noise multiplier 0).

    Each round is ``PoissonSampledDpEvent(q, GaussianDpEvent(sigma))``; runs of equal rounds compose
    as one ``SelfComposedDpEvent``, the runs as a ``ComposedDpEvent``, under the RDP accountant.
    """
    if not history:
        return 0.0
    if any(r.noise_multiplier == 0 for r in history):
        return math.inf
    import dp_accounting  # noqa: PLC0415 - scipy and friends: only a run with privacy on pays for them
    from dp_accounting import rdp  # noqa: PLC0415

    runs: list[tuple[RoundPrivacy, int]] = []
    for r in history:
        if runs and runs[-1][0] == r:
            runs[-1] = (r, runs[-1][1] + 1)
        else:
            runs.append((r, 1))
    event = dp_accounting.ComposedDpEvent([
        dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(r.sample_rate, dp_accounting.GaussianDpEvent(r.noise_multiplier)),
            count,
        )
        for r, count in runs
    ])  # fmt: skip
    accountant = rdp.RdpAccountant()
    absl = logging.getLogger("absl")
    absl.addFilter(_drop_order_warnings)
    try:
        accountant.compose(event)
        return float(accountant.get_epsilon(delta))
    finally:
        absl.removeFilter(_drop_order_warnings)


def _drop_order_warnings(record: logging.LogRecord) -> bool:
    """dp_accounting warns, every round, of each fractional Renyi order whose series did not converge
    at a small sampling rate; it leaves that order out, which only loosens the bound a little."""
    return "failed to converge" not in record.getMessage()


def budget_check(
    policy: PrivacyPolicy, history: Sequence[RoundPrivacy], next_round: RoundPrivacy
) -> tuple[bool, float, float]:
    """Whether ``next_round`` fits ``policy.epsilon_budget``: (fits, epsilon so far, epsilon after it).
    Without a budget every round fits."""
    spent = epsilon(history, policy.delta)
    after = epsilon([*history, next_round], policy.delta)
    fits = policy.epsilon_budget is None or after <= policy.epsilon_budget
    return fits, spent, after


@dataclass
class PrivacyLedger:
    """What a private run has spent (``history``, the checkpoint's) and whether the next round fits.

    The daemon and the bench both keep one; it holds no I/O, only the composition of the rounds.
    """

    policy: PrivacyPolicy
    history: list[RoundPrivacy]

    def refusal(self, selected: int, eligible: int) -> str | None:
        """Why a round sampling ``selected`` of ``eligible`` clients may not start (None: it may)."""
        rate = sample_rate(selected, eligible)
        fits, spent, after = budget_check(
            self.policy, self.history, RoundPrivacy(rate, self.policy.noise_multiplier)
        )
        if fits:
            return None
        return (
            f"privacy budget spent: epsilon {spent:.4g} of {self.policy.epsilon_budget:g} after {len(self.history)} "
            f"rounds (delta {self.policy.delta:g}); one more round would bring it to {after:.4g}"
        )

    def record(self, selected: int, eligible: int, clipped_fraction: float | None) -> dict[str, float | None]:
        """Add a closed round that sampled ``selected`` of ``eligible`` clients; return its metrics
        record (``epsilon``: spent so far, this round included)."""
        rate = sample_rate(selected, eligible)
        self.history.append(RoundPrivacy(rate, self.policy.noise_multiplier))
        return {
            "epsilon": epsilon(self.history, self.policy.delta), "delta": self.policy.delta,
            "noise_multiplier": self.policy.noise_multiplier, "clip_norm": self.policy.clip_norm,
            "sample_rate": rate, "clipped_fraction": clipped_fraction,
        }  # fmt: skip


def history_to_json(history: Sequence[RoundPrivacy]) -> list[list[float]]:
    """``[[sample_rate, noise_multiplier], ...]``: what the checkpoint stores."""
    return [[r.sample_rate, r.noise_multiplier] for r in history]


def history_from_json(data: object) -> tuple[RoundPrivacy, ...]:
    """The inverse of :func:`history_to_json`; a malformed record raises :class:`PrivacyError`."""
    if not isinstance(data, list) or not all(
        isinstance(x, list) and len(x) == 2 and all(_real(v) for v in x) for x in data
    ):
        raise PrivacyError(
            f"privacy history must be a list of [sample_rate, noise_multiplier] pairs, got {data!r}"
        )
    return tuple(RoundPrivacy(float(q), float(s)) for q, s in data)


def _real(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
