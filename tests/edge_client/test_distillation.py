"""Retention mechanisms of the local trainer: self-distillation (exact and cached) and the identity pull."""

from __future__ import annotations

import contextlib

import pytest
import torch

from edge_client.loss import (
    BaseCache,
    causal_lm_loss,
    distill_positions,
    forward_logits,
    kl_full,
    kl_top_k,
    sample_positions,
    sample_rows,
)
from edge_client.trainer import TrainResult, train_blocks
from fedbe import expansion, quantization, sources
from fedbe.datasets import Batch
from fedbe.errors import FedbeError
from tests.edge_client.steps import distilled_step, plain_recipe


def _batches(n: int = 2, seed: int = 0) -> list[Batch]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 256, (4, 16), generator=g)
        ids[:, 12:] = 7  # the target: always token 7
        labels = torch.full_like(ids, -100)
        labels[:, 12:] = 7
        mask = torch.ones_like(ids)
        mask[0, 14:] = 0  # one padded row
        ids[0, 14:] = 0
        labels[0, 14:] = -100
        out.append(Batch(ids, mask, labels))
    return out


def _model(precision: str = "fp32") -> tuple[torch.nn.Module, expansion.BlockRegistry]:
    torch.manual_seed(0)
    model = sources.build_tiny_model("llama")
    registry = expansion.expand_model(model, expansion.plan_expansion(4, 2, "interleave"))
    quantization.freeze_base(model, registry, precision)
    return model, registry


@torch.no_grad()
def _drift(model, registry, batches) -> float:
    """Mean KL(base || model) at the non-target positions: how far the model moved from the base."""

    total = 0.0
    for batch in batches:
        pos = distill_positions(batch)
        with expansion.bypassed(model, registry):
            base = forward_logits(model, batch)[:, :-1][pos]
        total += float(kl_full(base, forward_logits(model, batch)[:, :-1][pos]))
    return total / len(batches)


def test_top_k_kl_with_the_whole_vocabulary_is_the_exact_kl() -> None:
    g = torch.Generator().manual_seed(1)
    base, model = torch.randn(6, 50, generator=g), torch.randn(6, 50, generator=g)
    logp = torch.log_softmax(base, -1)
    top_logp, top_idx = logp.topk(50, -1)
    assert torch.allclose(kl_top_k(top_idx, top_logp, model), kl_full(base, model), atol=1e-5)
    # with fewer tokens it is a lower bound (coarsening never increases a KL)
    top_logp, top_idx = logp.topk(5, -1)
    assert float(kl_top_k(top_idx, top_logp, model)) <= float(kl_full(base, model)) + 1e-6
    assert float(kl_full(base, base)) == pytest.approx(0.0, abs=1e-6)


def test_distillation_starts_at_zero_because_the_expanded_model_is_the_base() -> None:
    model, registry = _model()
    result = train_blocks(
        model, registry, [0, 1], _batches(), plain_recipe(steps=1, lr=1e-3, distill_lambda=1.0)
    )
    assert result.distill_losses[0] == pytest.approx(0.0, abs=1e-6)
    assert result.base_forwards == 1


@pytest.mark.parametrize(("top_k", "sample"), [(0, 0), (64, 0), (64, 8)])
def test_distillation_keeps_the_model_closer_to_the_base(top_k: int, sample: int) -> None:
    batches = _batches()
    drift = {}
    for lam in (0.0, 50.0):
        model, registry = _model()
        cfg = plain_recipe(steps=30, lr=1e-2, distill_lambda=lam, distill_top_k=top_k, distill_sample=sample)
        result = train_blocks(model, registry, [0, 1], batches, cfg)
        assert result.ce_losses[-1] < result.ce_losses[0]  # it still learns the target
        drift[lam] = _drift(model, registry, batches)
    assert drift[50.0] < 0.5 * drift[0.0], drift


def test_the_cache_removes_the_base_forward_after_the_first_pass() -> None:
    model, registry = _model("nf4")
    batches = _batches(3)
    cache = BaseCache(8)
    cfg = plain_recipe(steps=6, lr=1e-3, distill_lambda=1.0, distill_top_k=8)
    first = train_blocks(model, registry, [1], batches, cfg, base_cache=cache)
    assert first.base_forwards == 3 and len(cache) == 12 and cache.nbytes > 0
    again = train_blocks(model, registry, [0, 1], batches, cfg, base_cache=cache)
    assert again.base_forwards == 0
    other = train_blocks(model, registry, [1], _batches(1, seed=9), cfg, base_cache=cache)
    assert other.base_forwards == 1  # new examples: computed once


def test_bad_retention_settings_are_refused() -> None:
    with pytest.raises(FedbeError, match="distill_lambda"):
        plain_recipe(distill_lambda=-1)
    with pytest.raises(FedbeError, match="distill_top_k"):
        plain_recipe(distill_top_k=-2)
    with pytest.raises(FedbeError, match="distill_sample"):
        plain_recipe(distill_sample=-1)


def _reference_losses(model, batch: Batch, base_logits: torch.Tensor) -> tuple[float, float]:
    """CE and exact KL from the full ``[rows, width, V]`` logits, the plain way."""

    logits = forward_logits(model, batch)
    ce = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), batch.labels[:, 1:].reshape(-1), ignore_index=-100
    )
    pos = distill_positions(batch)
    return float(ce), float(kl_full(base_logits[:, :-1][pos], logits[:, :-1][pos]))


@pytest.mark.parametrize("top_k", [0, 512])
def test_projecting_only_the_needed_positions_gives_the_full_logit_losses(top_k: int) -> None:
    """The trainer projects onto the vocabulary only where CE or KL look; the terms must not change."""

    model, registry = _model()
    train_blocks(
        model, registry, [0, 1], _batches(seed=3), plain_recipe(steps=3, lr=1e-2)
    )  # move off the base
    batch = _batches(1, seed=4)[0]
    with torch.no_grad(), expansion.bypassed(model, registry):
        base_logits = forward_logits(model, batch)
    want_ce, want_kl = _reference_losses(model, batch, base_logits)
    assert want_kl > 1e-4  # the model really differs from the base, so the check can fail
    cache = BaseCache(top_k) if top_k else None  # 512 = the whole vocabulary: the cached KL is exact
    result = TrainResult(block_ids=(0, 1))
    cfg = plain_recipe(steps=1, distill_lambda=0.5, distill_top_k=top_k)
    loss = distilled_step(model, lambda: expansion.bypassed(model, registry), batch, cfg, cache, result)
    assert result.ce_losses[0] == pytest.approx(want_ce, rel=1e-5)
    assert result.distill_losses[0] == pytest.approx(want_kl, rel=1e-4, abs=1e-6)
    assert float(loss) == pytest.approx(want_ce + 0.5 * want_kl, rel=1e-5)


def _trained_and_one_batch() -> tuple[
    torch.nn.Module, expansion.BlockRegistry, Batch, torch.Tensor, torch.Tensor
]:
    """A tiny expanded model whose blocks trained a little, a fresh batch, and the base's and the
    model's logits on it (``[rows, width, V]``)."""

    model, registry = _model()
    train_blocks(model, registry, [0, 1], _batches(seed=3), plain_recipe(steps=3, lr=1e-2))
    batch = _batches(1, seed=4)[0]
    with torch.no_grad():
        with expansion.bypassed(model, registry):
            base_full = forward_logits(model, batch)
        logits_full = forward_logits(model, batch)
    return model, registry, batch, base_full, logits_full


@pytest.mark.parametrize("top_k", [0, 512])
def test_a_distillation_sample_is_the_kl_at_exactly_the_sampled_positions(top_k: int) -> None:
    """``distill_sample``: the KL term is the exact (or cached) KL at the drawn positions, the CE is
    unchanged, and a cached base still holds every position for later draws."""

    model, registry, batch, base_full, logits_full = _trained_and_one_batch()
    pos = distill_positions(batch)
    base, logits = base_full[:, :-1][pos], logits_full[:, :-1][pos]
    want_ce, want_all = _reference_losses(model, batch, base_full)
    torch.manual_seed(11)
    order = sample_positions(pos, 5)
    assert order is not None and len(order) == 5 and len(set(order.tolist())) == 5
    want = float(kl_full(base[order], logits[order]))
    assert abs(want - want_all) > 1e-4  # a real subset: the check can tell it from the full KL
    cache = BaseCache(top_k) if top_k else None
    result = TrainResult(block_ids=(0, 1))
    cfg = plain_recipe(steps=1, distill_lambda=0.5, distill_top_k=top_k, distill_sample=5)
    torch.manual_seed(11)
    distilled_step(model, lambda: expansion.bypassed(model, registry), batch, cfg, cache, result)
    assert result.distill_losses[0] == pytest.approx(want, rel=1e-4, abs=1e-6)
    assert result.ce_losses[0] == pytest.approx(want_ce, rel=1e-5)
    if cache is not None:
        assert cache.targets(batch)[0].shape[0] == int(pos.sum())
    assert sample_positions(pos, int(pos.sum())) is None and sample_positions(pos, 0) is None


@pytest.mark.parametrize("top_k", [0, 512])
def test_distill_rows_distils_only_the_drawn_rows_and_runs_the_base_on_them_alone(top_k: int) -> None:
    """``distill_rows``: the KL term is the KL over the drawn rows' positions only, the CE still covers
    every row, and the base runs on (the cache fills for) the drawn rows alone."""

    model, registry, batch, base_full, logits_full = _trained_and_one_batch()
    pos = distill_positions(batch)
    want_ce, want_all = _reference_losses(model, batch, base_full)
    torch.manual_seed(5)
    drawn = sample_rows(batch.size, 2)
    assert drawn is not None and len(drawn) == 2 and drawn == sorted(set(drawn))
    rows_pos = pos.clone()
    rows_pos[[r for r in range(batch.size) if r not in drawn]] = False
    want = float(kl_full(base_full[:, :-1][rows_pos], logits_full[:, :-1][rows_pos]))
    assert abs(want - want_all) > 1e-4  # a real subset: the check can tell it from every row's KL
    calls: list[int] = []

    @contextlib.contextmanager
    def base():  # the bypassed base, counting the rows it runs on
        hook = model.get_input_embeddings().register_forward_hook(
            lambda m, a, out: calls.append(a[0].shape[0])
        )
        try:
            with expansion.bypassed(model, registry):
                yield
        finally:
            hook.remove()

    cache = BaseCache(top_k) if top_k else None
    result = TrainResult(block_ids=(0, 1))
    cfg = plain_recipe(steps=1, distill_lambda=0.5, distill_top_k=top_k, distill_rows=2)
    torch.manual_seed(5)
    distilled_step(model, base, batch, cfg, cache, result)
    assert result.distill_losses[0] == pytest.approx(want, rel=1e-4, abs=1e-6)
    assert result.ce_losses[0] == pytest.approx(want_ce, rel=1e-5)
    assert calls == [2] and result.base_forwards == 1
    if cache is not None:
        assert len(cache) == 2 and cache.missing(batch) == [r for r in range(batch.size) if r not in drawn]
        # the next step's draw of cached rows needs no base forward
        torch.manual_seed(5)
        distilled_step(model, base, batch, cfg, cache, result)
        assert calls == [2] and result.distill_losses[1] == pytest.approx(want, rel=1e-4, abs=1e-6)
    assert sample_rows(4, 4) is None and sample_rows(4, 0) is None
    with pytest.raises(FedbeError, match="distill_rows"):
        plain_recipe(distill_rows=-1)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_target_only_cross_entropy_is_the_models_own_loss(arch: str) -> None:

    torch.manual_seed(0)
    model = sources.build_tiny_model(arch)
    batch = _batches(1, seed=5)[0]
    batch.labels[1, 12:] = -100  # rows with different numbers of targets
    batch.labels[2, 9] = batch.input_ids[2, 9]
    want = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels).loss
    assert float(causal_lm_loss(model, batch)) == pytest.approx(float(want), rel=1e-6)
    batch.labels[:] = -100
    with pytest.raises(FedbeError, match="no target tokens"):
        causal_lm_loss(model, batch)


