"""Local training of the assigned new blocks over the frozen (quantized) base.

Only the assigned blocks train (AdamW over exactly their parameters); the base and the other new
blocks are frozen and in eval mode, so dropout and batch statistics of the base never change. What a
step minimises is :func:`edge_client.loss.step_loss` (``CE + lambda * KL``); how many steps, at which
learning rate and with which distillation is the round's :class:`fedbe.recipe.Recipe`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedModel

from edge_client.loss import BaseCache, Distillation, LabelPrior, causal_lm_loss, step_loss
from fedbe.blocks import set_trainable
from fedbe.datasets import IGNORE_INDEX, Batch
from fedbe.errors import FedbeError
from fedbe.expansion import BlockRegistry, bypassed, new_block_module
from fedbe.recipe import Recipe

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    block_ids: tuple[int, ...]
    losses: list[float] = field(default_factory=list)
    samples: int = 0
    wall_seconds: float = 0.0
    stopped_by_deadline: bool = False
    stopped_early: bool = False  # ``should_stop`` said so (e.g. SIGTERM)
    ce_losses: list[float] = field(default_factory=list)  # the target-token part of each step's loss
    distill_losses: list[float] = field(default_factory=list)  # the KL part (before lambda), if any
    base_forwards: int = 0  # no-grad forwards of the base spent on distillation
    step_seconds: list[float] = field(default_factory=list)

    @property
    def steps(self) -> int:
        return len(self.losses)

    @property
    def mean_loss(self) -> float:
        return sum(self.losses) / len(self.losses) if self.losses else float("nan")


def train_blocks(
    model: PreTrainedModel,
    registry: BlockRegistry,
    block_ids: Sequence[int],
    batches: Iterable[Batch],
    recipe: Recipe,
    round_: int = 1,
    *,
    deadline_seconds: float | None = None,
    on_step: Callable[[int, float], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    base_cache: BaseCache | None = None,
    label_prior: LabelPrior | None = None,
) -> TrainResult:
    """Train exactly ``block_ids`` for ``recipe.steps`` steps of round ``round_`` (cycling over ``batches``).

    Pass the client's :class:`BaseCache` as ``base_cache`` to keep the base's predictions across
    rounds (a fresh one is used otherwise), and its :class:`LabelPrior` for the label-balanced loss
    (without one the client trains plain cross-entropy).
    """
    params = set_trainable(model, registry, block_ids)
    batch_list = list(batches)
    if not batch_list:
        raise FedbeError("no training batches")
    model.eval()
    for block_id in registry.check_ids(block_ids):
        new_block_module(model, registry, block_id).train()
    return train_parameters(
        model, params, batch_list, recipe, round_, base=lambda: bypassed(model, registry),
        deadline_seconds=deadline_seconds, on_step=on_step, should_stop=should_stop, base_cache=base_cache,
        block_ids=tuple(sorted(block_ids)), label_prior=label_prior,
    )  # fmt: skip


def train_parameters(
    model: PreTrainedModel,
    params: Sequence[torch.nn.Parameter],
    batches: Sequence[Batch],
    recipe: Recipe,
    round_: int = 1,
    *,
    base: Callable[[], AbstractContextManager[Any]] | None = None,
    deadline_seconds: float | None = None,
    on_step: Callable[[int, float], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    base_cache: BaseCache | None = None,
    block_ids: tuple[int, ...] = (),
    label_prior: LabelPrior | None = None,
) -> TrainResult:
    """The optimisation loop behind :func:`train_blocks`, for any set of trainable ``params`` (the
    benchmark's LoRA and full fine-tuning baselines run it too).

    ``base`` is a context in which ``model`` computes the frozen base (new blocks bypassed, or a PEFT
    model's adapters disabled): self-distillation needs it. The caller sets train/eval modes and
    ``requires_grad``.
    """
    lam = recipe.distill_lambda_in_round(round_)
    prior = label_prior if recipe.label_balance else None
    distill = None
    if lam > 0:
        if base is None:
            raise FedbeError("self-distillation needs a way to run the base model (base=...)")
        if recipe.distill_top_k and (base_cache is None or base_cache.top_k != recipe.distill_top_k):
            base_cache = BaseCache(recipe.distill_top_k)
        distill = Distillation(base, recipe.distill_rows, recipe.distill_sample,
                               base_cache if recipe.distill_top_k else None)  # fmt: skip
    optimizer = torch.optim.AdamW(list(params), lr=recipe.lr_in_round(round_), weight_decay=recipe.weight_decay)
    result = TrainResult(block_ids=block_ids)
    start = time.perf_counter()
    try:
        for step in range(recipe.steps):
            if deadline_seconds is not None and time.perf_counter() - start > deadline_seconds:
                result.stopped_by_deadline = True
                log.info("deadline reached after %d steps", step)
                break
            if should_stop is not None and should_stop():
                result.stopped_early = True
                log.info("stopped after %d steps", step)
                break
            batch = batches[step % len(batches)]
            step_start = time.perf_counter()
            loss = step_loss(model, batch, lam, prior, distill)
            if not torch.isfinite(loss.total):
                raise FedbeError(
                    f"training loss became {loss.total.item()} at step {step}; lower the learning rate"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.total.backward()
            if recipe.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, recipe.max_grad_norm)
            optimizer.step()
            result.step_seconds.append(time.perf_counter() - step_start)
            result.losses.append(float(loss.total.item()))
            result.ce_losses.append(loss.ce)
            if loss.kl is not None:
                result.distill_losses.append(loss.kl)
            result.base_forwards += loss.base_forwards
            result.samples += batch.size
            if on_step is not None:
                on_step(step, result.losses[-1])
    finally:
        model.eval()
        model.requires_grad_(False)
        result.wall_seconds = time.perf_counter() - start
    return result


@torch.no_grad()
def evaluate_loss(model: PreTrainedModel, batches: Iterable[Batch]) -> float:
    """Mean target-token loss over ``batches`` (eval mode, no grad)."""
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        n = int((batch.labels[:, 1:] != IGNORE_INDEX).sum())
        total += float(causal_lm_loss(model, batch)) * n
        count += n
    return total / max(count, 1)
