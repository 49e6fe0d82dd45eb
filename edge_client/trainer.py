"""Local training of the assigned new blocks over the frozen (quantized) base.

Only the assigned blocks train (AdamW over exactly their parameters); the base and the other new
blocks are frozen and in eval mode, so dropout and batch statistics of the base never change.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel

from fedbe.blocks import set_trainable
from fedbe.datasets import Batch
from fedbe.errors import FedbeError
from fedbe.expansion import BlockRegistry, new_block_module

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 10
    lr: float = 2e-4
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    deadline_seconds: float | None = None

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise FedbeError(f"steps must be >= 1, got {self.steps}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise FedbeError(f"learning rate must be a positive number, got {self.lr}")


@dataclass
class TrainResult:
    block_ids: tuple[int, ...]
    losses: list[float] = field(default_factory=list)
    samples: int = 0
    wall_seconds: float = 0.0
    stopped_by_deadline: bool = False
    stopped_early: bool = False  # ``should_stop`` said so (e.g. SIGTERM)

    @property
    def steps(self) -> int:
        return len(self.losses)

    @property
    def mean_loss(self) -> float:
        return sum(self.losses) / len(self.losses) if self.losses else float("nan")


def causal_lm_loss(model: PreTrainedModel, batch: Batch) -> torch.Tensor:
    device = next(p for p in model.parameters()).device
    out = model(
        input_ids=batch.input_ids.to(device),
        attention_mask=batch.attention_mask.to(device),
        labels=batch.labels.to(device),
        use_cache=False,
    )
    return out.loss


def train_blocks(
    model: PreTrainedModel,
    registry: BlockRegistry,
    block_ids: Sequence[int],
    batches: Iterable[Batch],
    config: TrainConfig,
    on_step: Callable[[int, float], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> TrainResult:
    """Train exactly ``block_ids`` for ``config.steps`` steps (cycling over ``batches``)."""
    params = set_trainable(model, registry, block_ids)
    batch_list = list(batches)
    if not batch_list:
        raise FedbeError("no training batches")
    model.eval()
    for block_id in registry.check_ids(block_ids):
        new_block_module(model, registry, block_id).train()
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    result = TrainResult(block_ids=tuple(sorted(block_ids)))
    start = time.perf_counter()
    try:
        for step in range(config.steps):
            if config.deadline_seconds is not None and time.perf_counter() - start > config.deadline_seconds:
                result.stopped_by_deadline = True
                log.info("deadline reached after %d steps", step)
                break
            if should_stop is not None and should_stop():
                result.stopped_early = True
                log.info("stopped after %d steps", step)
                break
            batch = batch_list[step % len(batch_list)]
            loss = causal_lm_loss(model, batch)
            if not torch.isfinite(loss):
                raise FedbeError(
                    f"training loss became {loss.item()} at step {step}; lower the learning rate"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            result.losses.append(float(loss.item()))
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
        n = int((batch.labels[:, 1:] != -100).sum())
        total += float(causal_lm_loss(model, batch)) * n
        count += n
    return total / max(count, 1)
