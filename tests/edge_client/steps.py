"""Helpers the loss and distillation tests share: a plain recipe and one distilled step as the trainer takes it."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from edge_client.loss import Distillation, LabelPrior, step_loss
from edge_client.trainer import TrainResult
from fedbe.datasets import Batch
from fedbe.recipe import PLAIN, Recipe


def plain_recipe(**changes: Any) -> Recipe:
    """The plain cross-entropy recipe with ``changes``."""
    return replace(PLAIN, **changes)


def distilled_step(model: Any, base: Any, batch: Batch, cfg: Recipe, cache: Any, result: TrainResult,
                   prior: LabelPrior | None = None) -> torch.Tensor:  # fmt: skip
    """One distilled step of ``cfg`` as the trainer takes it, its parts recorded in ``result``."""
    top = cache if cfg.distill_top_k else None
    loss = step_loss(model, batch, cfg.distill_lambda_in_round(1), prior,
                     Distillation(base, cfg.distill_rows, cfg.distill_sample, top))  # fmt: skip
    result.ce_losses.append(loss.ce)
    if loss.kl is not None:
        result.distill_losses.append(loss.kl)
    result.base_forwards += loss.base_forwards
    return loss.total
