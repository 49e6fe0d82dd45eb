"""The methods the bench compares: FedBE's (new blocks through the coordinator's round), federated
LoRA and full fine-tuning. Each reads its :class:`~fedbe_sim.bench.method_table.MethodSpec` from
:data:`METHODS`, never its name."""

from __future__ import annotations

import logging
import random
import statistics
import sys
import time
from dataclasses import dataclass, replace
from typing import Any

import torch

from fedbe.errors import ConfigError, FedbeError
from fedbe.recipe import Recipe
from fedbe_sim.bench.method_table import METHODS
from fedbe_sim.bench.method_table import MethodSpec as MethodSpec  # re-exported: the table's rows
from fedbe_sim.bench.settings import method_placement
from fedbe_sim.bench.world import Federation, step_memory_bytes

log = logging.getLogger(__name__)


@dataclass
class ClientResult:
    client_id: str
    blocks: tuple[int, ...]
    train_seconds: float
    emulated_seconds: float
    transfer_seconds: float
    bytes_up: int
    bytes_down: int
    loss: float
    base_forwards: int
    samples: int


class Method:
    """One federated method: a model, its global trainable state, a client round and the aggregation."""

    name: str
    global_state: dict[int, dict[str, torch.Tensor]]
    model: Any

    def __init__(self, name: str, federation: Federation) -> None:
        self.name, self.federation, self.settings = name, federation, federation.settings
        self.spec = METHODS[name]  # what the method does: its row of the table, never its name
        self.residuals: dict[str, Any] = {}
        self.caches: dict[str, Any] = {}
        self.peak_memory = 0
        self.withdrawn: tuple[int, ...] = ()  # blocks the last allocation left out for label skew
        self.priors: dict[str, Any] = {}  # client id -> LabelPrior, for the label-balanced loss
        # what the last round adds to its record: the clients' update norms (what a DP clip norm is
        # chosen from) and, with DP on, the privacy spent so far
        self.round_info: dict[str, Any] = {}

    def label_priors(self) -> bool:
        """Each client's label counts on the label words' first tokens (as the evaluation scores them);
        False, with a warning, where two labels share a first token (a byte tokenizer starts every
        " label" with the space): the clients then train plain cross-entropy, as an edge agent does."""
        from edge_client.trainer import LabelPrior  # noqa: PLC0415

        federation = self.federation
        try:
            self.priors = {
                c.client_id: LabelPrior.for_labels(federation.tokenizer, federation.labels, c.histogram)
                for c in federation.clients
            }
        except FedbeError as exc:
            log.warning("%s: label-balanced loss not used (%s)", self.name, exc)
            self.priors = {}
            return False
        return True

    def recipe(self, lr: float, lr_decay: float, distill_lambda: float | tuple[float, ...],
               label_balance: bool = False) -> Recipe:  # fmt: skip
        """This run's training recipe with a method's own lr schedule and distillation weight."""
        settings = self.settings
        schedule = distill_lambda if isinstance(distill_lambda, tuple) else (distill_lambda,)
        return Recipe(
            steps=settings.steps, lr=lr, lr_decay=lr_decay, batch_size=settings.batch_size,
            max_tokens=settings.max_tokens, distill_lambda=schedule, distill_top_k=settings.distill_top_k,
            distill_sample=settings.distill_sample, distill_rows=settings.distill_rows, label_balance=label_balance,
        )  # fmt: skip

    def download(self, state: Any, level: str | None = None) -> tuple[Any, dict[int, int]]:
        """``state`` as a client receives it at ``level`` (default ``download_level``), and its bytes per block."""
        from fedbe.compression import Level, compress_state, decompress_state  # noqa: PLC0415

        compressed, _ = compress_state(state, Level(level or self.settings.download_level))
        nbytes = {b: sum(c.nbytes for c in params.values()) for b, params in compressed.items()}
        return decompress_state(compressed), nbytes

    def compress(self, client_id: str, delta: Any) -> tuple[Any, int]:
        from fedbe.compression import Level, compress_state, decompress_state  # noqa: PLC0415

        held = self.residuals.get(client_id, {})
        # a block this client did not train before starts with a zero residual
        residual = {b: held.get(b) or {n: torch.zeros_like(t) for n, t in delta[b].items()} for b in delta}
        compressed, new_residual = compress_state(delta, Level.INT8, residual)
        self.residuals.setdefault(client_id, {}).update(new_residual)
        nbytes = sum(c.nbytes for params in compressed.values() for c in params.values())
        return decompress_state(compressed), nbytes

    def round(self, round_: int) -> list[ClientResult]:
        raise NotImplementedError

    def eval_model(self) -> Any:
        raise NotImplementedError


def train_time(result: Any) -> float:
    """Training seconds, robust to other load on this machine: median step time x steps run."""
    return statistics.median(result.step_seconds) * len(result.step_seconds) if result.step_seconds else 0.0


def emulated(client: Any, result: Any, up: int, down: int) -> tuple[float, float]:
    """The client's emulated round seconds (its time here x its profile's slowdown, plus its transfer
    over the profile's link) and the transfer part alone."""
    transfer = 8 * (up + down) / client.link_bps
    return train_time(result) * client.slowdown + transfer, transfer


class BlockMethod(Method):
    """New blocks on the frozen base, trained through the coordinator's round (``plan_round`` /
    ``close_round``): FedBE, its ablations and the position methods."""

    def __init__(self, name: str, federation: Federation) -> None:
        super().__init__(name, federation)
        from fedbe import expansion, quantization, sources  # noqa: PLC0415
        from fedbe.blocks import block_layout, get_block_state  # noqa: PLC0415

        model = sources.load_model(federation.source)
        layers = model.config.num_hidden_layers
        spec, settings = self.spec, self.settings
        if spec.position is not None:
            index = {"bottom": 0, "middle": layers // 2, "top": layers - 1}[spec.position]
            plan = expansion.plan_expansion(layers, None, (index,))
        else:
            plan = expansion.plan_expansion(
                layers, federation.blocks, method_placement(settings, name) or "interleave"
            )
        self.registry = expansion.expand_model(model, plan)
        quantization.freeze_base(model, self.registry, settings.precision)
        self.model = model
        self.global_state = get_block_state(model, self.registry)
        self.distill = spec.distill
        balance = settings.label_balance and spec.label_balance and self.label_priors()
        distill_lambda = settings.distill_lambda if self.distill else 0.0
        recipe = self.recipe(settings.lr, settings.lr_decay, distill_lambda, balance)
        if spec.exact_kl:
            recipe = replace(recipe, distill_top_k=0)
        from coordinator.aggregation import FedAvgM  # noqa: PLC0415
        from coordinator.allocation import AllocationPolicy  # noqa: PLC0415
        from coordinator.round import Candidate, RoundPolicy  # noqa: PLC0415

        # without a deadline (a position method's one block) every client trains every block it can hold
        self.policy = RoundPolicy(
            recipe=recipe, clients_per_round=len(federation.clients), deadline_seconds=sys.float_info.max,
            deadline_factor=settings.deadline_factor if spec.deadline else None,
            allocation=AllocationPolicy(
                strategy=spec.strategy, max_block_divergence=settings.max_block_divergence
            ),
            block_average=settings.block_average,
            server_optimizer=None if settings.server_lr == 1.0 else FedAvgM(lr=settings.server_lr, momentum=0.0),
            privacy=settings.privacy(),
        )  # fmt: skip
        from coordinator.privacy import PrivacyLedger, SeededNoise  # noqa: PLC0415

        dp = self.policy.privacy
        self.ledger = None if dp is None else PrivacyLedger(dp, [])
        # seeded from the seed: a simulation repeats its noise (the daemon's is unpredictable)
        self.noise = SeededNoise(federation.seed) if dp is not None else None
        self.candidates = [Candidate(c.client_id, c.max_blocks, c.forward_seconds, c.backward_seconds,
                                     dict(c.histogram)) for c in federation.clients]  # fmt: skip
        self.layout = block_layout(model, self.registry)
        self.last_trained: dict[int, int] = {}

    def round(self, round_: int) -> list[ClientResult]:
        from coordinator.round import Reply, close_round, plan_round, trained_blocks  # noqa: PLC0415
        from edge_client.loss import BaseCache  # noqa: PLC0415
        from edge_client.trainer import train_blocks  # noqa: PLC0415
        from fedbe.blocks import block_delta, get_block_state, set_block_state, set_trainable  # noqa: PLC0415

        # the coordinator's plan: every client, the allocation under the round's deadline
        seed = self.federation.seed
        plan = plan_round(self.policy, round_, self.candidates, self.registry, self.last_trained, seed,
                          random.Random(seed))  # fmt: skip
        self.withdrawn = plan.allocation.withdrawn_blocks
        assignments, recipe = plan.assignments, plan.recipe
        # a client trains from the weights as they arrive (download_level); the blocks it does not
        # train arrive frozen (at most bf16) and run as they are
        received, received_bytes = self.download(self.global_state, self.settings.download_level)
        level = "bf16" if self.settings.download_level == "fp32" else self.settings.download_level
        as_context, context_bytes = self.download(self.global_state, level)
        results, replies = [], []
        self.round_info = {}
        for c in self.federation.clients:
            blocks = assignments.get(c.client_id)
            if not blocks:
                continue
            sent = {b: received[b] for b in blocks}
            frozen = {b: p for b, p in as_context.items() if b not in blocks}
            set_block_state(self.model, self.registry, {**self.global_state, **frozen, **sent})
            down = sum(received_bytes[b] for b in sent) + sum(context_bytes[b] for b in frozen)
            if recipe.distill_top_k and recipe.distill_lambda_in_round(round_):
                self.caches.setdefault(c.client_id, BaseCache(recipe.distill_top_k))
            torch.manual_seed(self.federation.seed * 7919 + round_)
            if self.peak_memory == 0 or len(blocks) == max(len(b) for b in assignments.values()):
                params = set_trainable(self.model, self.registry, blocks)
                self.peak_memory = max(self.peak_memory, step_memory_bytes(self.model, params, c.batches[0]))
                self.model.requires_grad_(False)
            result = train_blocks(self.model, self.registry, blocks, c.batches_for(round_), recipe, round_,
                                  base_cache=self.caches.get(c.client_id),
                                  label_prior=self.priors.get(c.client_id))  # fmt: skip
            trained = get_block_state(self.model, self.registry, blocks)
            delta, up = self.compress(c.client_id, block_delta(trained, sent))
            replies.append(Reply(c.client_id, delta, result.samples, round_))
            results.append(ClientResult(
                c.client_id, tuple(blocks), train_time(result),
                *emulated(c, result, up, down), up, down,
                result.mean_loss, result.base_forwards, result.samples,
            ))  # fmt: skip
        if replies:
            state, layout = self.global_state, self.layout
            outcome = close_round(self.policy, plan, state, layout, replies, noise=self.noise)
            for cid, code, reason in outcome.rejected:
                log.warning("%s round %d: %s's update rejected (%s): %s", self.name, round_, cid, code, reason)
            self.global_state = outcome.new_state
            self.round_info = {"update_norms": dict(outcome.norms)}
            if self.ledger is not None:
                selected, eligible = len(plan.selected), len(self.candidates)
                self.round_info["privacy"] = self.ledger.record(selected, eligible, outcome.clipped_fraction)
            for block_id in trained_blocks(outcome):
                self.last_trained[block_id] = round_
        return results

    def eval_model(self) -> Any:
        from fedbe.blocks import set_block_state  # noqa: PLC0415

        set_block_state(self.model, self.registry, self.global_state)
        return self.model


def cast_plain_base(model: Any, precision: str) -> None:
    """``--lora-base plain``: the model as loaded, in ``precision`` if 16-bit (multiplying in float32
    where this CPU has no fast 16-bit matmul), with no float32 residual stream between its layers."""
    from fedbe import quantization  # noqa: PLC0415

    if precision in ("bf16", "fp16"):
        model.to(torch.bfloat16 if precision == "bf16" else torch.float16)
        quantization.fp32_matmuls(model)


class LoraMethod(Method):
    """FedAvg of LoRA adapters on the frozen base: FedIT, FedIT + distillation, FFA-LoRA."""

    def __init__(self, name: str, federation: Federation) -> None:
        super().__init__(name, federation)
        from peft import LoraConfig, get_peft_model  # noqa: PLC0415

        from fedbe import quantization, sources  # noqa: PLC0415

        base = sources.load_model(federation.source)
        base.requires_grad_(False)
        # "frozen": FedBE's frozen base, without new blocks: the same computation
        if self.settings.lora_base == "frozen":
            from fedbe.expansion import BlockRegistry  # noqa: PLC0415

            registry = BlockRegistry(base_num_layers=base.config.num_hidden_layers, blocks=())
            quantization.freeze_base(base, registry, self.settings.precision)
        else:
            cast_plain_base(base, self.settings.precision)
        torch.manual_seed(federation.seed)  # the same random A for every client (FedIT and FFA-LoRA alike)
        cfg = LoraConfig(r=self.settings.lora_rank, lora_alpha=2 * self.settings.lora_rank, lora_dropout=0.0,
                         target_modules="all-linear", bias="none")  # fmt: skip
        self.model = get_peft_model(base, cfg)
        self.model.eval()
        self.names = [n for n, p in self.model.named_parameters() if "lora_" in n]
        if self.spec.lora_b_only:
            self.names = [n for n in self.names if "lora_B" in n]
        self.global_state = {
            0: {n: p.detach().clone() for n, p in self.model.named_parameters() if n in self.names}
        }
        distill = self.settings.lora_distill_lambda if self.spec.distill else 0.0
        self.config = self.recipe(self.settings.lora_lr, self.settings.lora_lr_decay, distill)

    def _params(self) -> list[torch.nn.Parameter]:
        named = dict(self.model.named_parameters())
        return [named[n] for n in self.names]

    def _load(self, state: dict[str, torch.Tensor]) -> None:
        named = dict(self.model.named_parameters())
        with torch.no_grad():
            for n, t in state.items():
                named[n].copy_(t)

    def round(self, round_: int) -> list[ClientResult]:
        from coordinator.aggregation import ClientUpdate, aggregate  # noqa: PLC0415
        from edge_client.loss import BaseCache  # noqa: PLC0415
        from edge_client.trainer import train_parameters  # noqa: PLC0415
        from fedbe.blocks import block_delta  # noqa: PLC0415

        results, updates = [], []
        received, received_bytes = self.download(self.global_state)
        config = self.config
        for c in self.federation.clients:
            self._load(received[0])
            params = self._params()
            for p in params:
                p.requires_grad_(True)
            if self.peak_memory == 0:
                self.peak_memory = step_memory_bytes(self.model, params, c.batches[0])
            if config.distill_top_k and config.distill_lambda_in_round(round_):
                self.caches.setdefault(c.client_id, BaseCache(config.distill_top_k))
            torch.manual_seed(self.federation.seed * 7919 + round_)
            result = train_parameters(
                self.model, params, c.batches_for(round_), config, round_, base=self.model.disable_adapter,
                base_cache=self.caches.get(c.client_id), label_prior=self.priors.get(c.client_id),
            )  # fmt: skip
            trained = {
                0: {n: p.detach().clone() for n, p in self.model.named_parameters() if n in self.names}
            }
            delta, up = self.compress(c.client_id, block_delta(trained, received))
            updates.append(ClientUpdate(c.client_id, delta, result.samples, 0))
            down = received_bytes[0]
            results.append(ClientResult(
                c.client_id, (), train_time(result),
                *emulated(c, result, up, down), up, down,
                result.mean_loss, result.base_forwards, result.samples,
            ))  # fmt: skip
        self.global_state = aggregate(self.global_state, updates).new_state
        return results

    def eval_model(self) -> Any:
        self._load(self.global_state[0])
        return self.model


class FullMethod(Method):
    """FedAvg of every weight: full fine-tuning."""

    def __init__(self, name: str, federation: Federation) -> None:
        super().__init__(name, federation)
        from fedbe import sources  # noqa: PLC0415

        self.model = sources.load_model(federation.source)
        self.model.eval()
        self.model.requires_grad_(False)
        self.names = [n for n, _ in self.model.named_parameters()]
        self.global_state = {0: {n: p.detach().clone() for n, p in self.model.named_parameters()}}
        self.config = self.recipe(self.settings.full_ft_lr, 1.0, 0.0)

    def estimate_seconds(self) -> float:
        """Emulated training seconds for the whole run, from one timed step."""
        params = list(self.model.parameters())
        for p in params:
            p.requires_grad_(True)
        c = self.federation.clients[0]
        started = time.perf_counter()
        self.peak_memory = step_memory_bytes(self.model, params, c.batches[0])
        step = time.perf_counter() - started
        self.model.requires_grad_(False)
        slowest = max(cl.slowdown for cl in self.federation.clients)
        return step * self.settings.steps * self.settings.rounds * (len(self.federation.clients) + slowest)

    def round(self, round_: int) -> list[ClientResult]:
        from coordinator.aggregation import ClientUpdate, aggregate  # noqa: PLC0415
        from edge_client.trainer import train_parameters  # noqa: PLC0415
        from fedbe.blocks import block_delta  # noqa: PLC0415

        results, updates = [], []
        named = dict(self.model.named_parameters())
        received, received_bytes = self.download(self.global_state)
        for c in self.federation.clients:
            with torch.no_grad():
                for n, t in received[0].items():
                    named[n].copy_(t)
            params = list(named.values())
            for p in params:
                p.requires_grad_(True)
            torch.manual_seed(self.federation.seed * 7919 + round_)
            result = train_parameters(self.model, params, c.batches_for(round_), self.config, round_)
            trained = {0: {n: p.detach().clone() for n, p in self.model.named_parameters()}}
            delta, up = self.compress(c.client_id, block_delta(trained, received))
            updates.append(ClientUpdate(c.client_id, delta, result.samples, 0))
            down = received_bytes[0]
            results.append(ClientResult(
                c.client_id, (), train_time(result),
                *emulated(c, result, up, down), up, down,
                result.mean_loss, 0, result.samples,
            ))  # fmt: skip
        self.global_state = aggregate(self.global_state, updates).new_state
        return results

    def eval_model(self) -> Any:
        named = dict(self.model.named_parameters())
        with torch.no_grad():
            for n, t in self.global_state[0].items():
                named[n].copy_(t)
        return self.model


CLASSES: dict[str, type[Method]] = {"block": BlockMethod, "lora": LoraMethod, "full": FullMethod}  # by family


def make_method(name: str, federation: Federation) -> Method:
    """The method ``name`` of :data:`METHODS` on ``federation``, of the class its family names."""
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    return CLASSES[METHODS[name].family](name, federation)
