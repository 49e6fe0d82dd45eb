"""The label-balanced loss (balanced softmax over the label words with the client's own label mix)."""

from __future__ import annotations

import math

import pytest
import torch

from edge_client.loss import (
    LabelPrior,
    balanced_logits,
    causal_lm_loss,
    forward_logits,
)
from edge_client.trainer import TrainResult, train_blocks
from fedbe import expansion, quantization, sources
from fedbe.datasets import Batch
from fedbe.errors import FedbeError
from tests.edge_client.steps import distilled_step, plain_recipe

LABELS = (7, 9, 11)  # the label words' first tokens; the target is label token + end token 3


def _batch(labels: list[int], seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(20, 256, (len(labels), 14), generator=g)
    ids[:, 12] = torch.tensor(labels)
    ids[:, 13] = 3
    targets = torch.full_like(ids, -100)
    targets[:, 12:] = ids[:, 12:]
    return Batch(ids, torch.ones_like(ids), targets)


def _model() -> tuple[torch.nn.Module, expansion.BlockRegistry]:
    torch.manual_seed(0)
    model = sources.build_tiny_model("llama")
    registry = expansion.expand_model(model, expansion.plan_expansion(4, 2, "interleave"))
    quantization.freeze_base(model, registry, "fp32")
    return model, registry


def test_offsets_are_log_frequencies_on_label_rows_only() -> None:
    prior = LabelPrior(LABELS, (6.0, 2.0, 0.0))  # the third label absent: counts half an example
    logits = torch.randn(3, 32)
    targets = torch.tensor([7, 3, 11])  # a label row, an end-token row, a label row
    out = balanced_logits(logits, targets, prior)
    share = torch.log(torch.tensor([6.0, 2.0, 0.5]) / 8.5 * 3)  # relative to the uniform mix of 3
    for row in (0, 2):
        assert torch.allclose(out[row, list(LABELS)], logits[row, list(LABELS)] + share)
        others = [t for t in range(32) if t not in LABELS]
        assert torch.equal(out[row, others], logits[row, others])
    assert torch.equal(out[1], logits[1])
    assert balanced_logits(logits, targets, None) is logits


def test_balanced_cross_entropy_is_the_reference_on_full_logits() -> None:
    model, registry = _model()
    batch = _batch([7, 7, 9, 7])
    prior = LabelPrior(LABELS, (3.0, 1.0, 0.0))
    full = forward_logits(model, batch)[:, :-1].float()
    logits, vocab = full.reshape(-1, full.shape[-1]), full.shape[-1]
    targets = batch.labels[:, 1:].reshape(-1)
    keep = targets != -100
    bias = torch.zeros(vocab)
    bias[list(LABELS)] = torch.log(torch.tensor([3.0, 1.0, 0.5]) / 4.5 * 3)
    adjusted = logits[keep] + torch.isin(targets[keep], torch.tensor(LABELS)).unsqueeze(-1) * bias
    want = torch.nn.functional.cross_entropy(adjusted, targets[keep])
    plain = torch.nn.functional.cross_entropy(logits[keep], targets[keep])
    assert abs(float(want) - float(plain)) > 1e-3  # the prior changes the loss, so the check can fail
    assert float(causal_lm_loss(model, batch, prior)) == pytest.approx(float(want), rel=1e-5)
    # the distilled step: the same balanced CE, and a KL that does not see the prior
    result, balanced = TrainResult(block_ids=(0, 1)), TrainResult(block_ids=(0, 1))
    base = lambda: expansion.bypassed(model, registry)  # noqa: E731
    cfg = plain_recipe(steps=1, distill_lambda=1.0)
    distilled_step(model, base, batch, cfg, None, result)
    distilled_step(model, base, batch, cfg, None, balanced, prior)
    assert balanced.ce_losses[0] == pytest.approx(float(want), rel=1e-5)
    assert result.ce_losses[0] == pytest.approx(float(plain), rel=1e-5)
    assert balanced.distill_losses == result.distill_losses


def test_a_client_with_every_label_equally_often_trains_plain_ce() -> None:
    # Offsets relative to the uniform mix: none for a balanced client, so its balanced loss is its
    # plain loss and it does not learn to raise the label words over the rest of the vocabulary.
    logits = torch.randn(4, 32)
    targets = torch.tensor([7, 9, 11, 3])
    assert torch.allclose(balanced_logits(logits, targets, LabelPrior(LABELS, (4.0, 4.0, 4.0))), logits)
    # A skewed client's offsets keep the label words' total mass where every label scores the same.
    flat = torch.zeros(1, 32)
    flat[0, list(LABELS)] = 2.0
    out = balanced_logits(flat, torch.tensor([7]), LabelPrior(LABELS, (10.0, 1.0, 0.0)))
    assert float(out[0, list(LABELS)].logsumexp(0)) == pytest.approx(
        float(flat[0, list(LABELS)].logsumexp(0))
    )
    assert float(out[0, 7]) > 2.0 > float(out[0, 9])


def test_on_a_label_uniform_model_only_plain_ce_pushes_towards_the_majority_label() -> None:
    # A model that already puts its mass on the three label words, equally: the client's articles
    # are 15 of label 7 and 5 of label 9. Plain CE's gradient raises z7 - z9 (learning the client's
    # label mix); the balanced loss sees the mix in its offsets, and its gradient on z7 - z9 is zero.
    logits = torch.zeros(20, 64)
    logits[:, list(LABELS)] = 10.0
    targets = torch.tensor([7] * 15 + [9] * 5)
    prior = LabelPrior(LABELS, (15.0, 5.0, 0.0))
    pushes = {}
    for name, p in (("plain", None), ("balanced", prior)):
        z = logits.clone().requires_grad_(True)
        torch.nn.functional.cross_entropy(balanced_logits(z, targets, p), targets, reduction="sum").backward()
        assert z.grad is not None
        pushes[name] = float(-(z.grad[:, 7] - z.grad[:, 9]).sum())  # descent direction on z7 - z9
    assert pushes["plain"] > 5.0
    assert abs(pushes["balanced"]) < 0.05 * pushes["plain"]


def test_the_trainer_uses_the_prior_only_when_asked() -> None:
    batch = _batch([7, 7, 9, 7])
    prior = LabelPrior(LABELS, (3.0, 1.0, 0.0))
    model, _ = _model()
    want = {False: float(causal_lm_loss(model, batch)), True: float(causal_lm_loss(model, batch, prior))}
    assert abs(want[True] - want[False]) > 1e-3
    for balance in (False, True):
        model, registry = _model()
        cfg = plain_recipe(steps=1, lr=1e-3, label_balance=balance)
        result = train_blocks(model, registry, [0, 1], [batch], cfg, label_prior=prior)
        assert result.ce_losses[0] == pytest.approx(want[balance], rel=1e-5)


def test_bad_priors_are_refused() -> None:
    with pytest.raises(FedbeError, match="2 label tokens but 3 counts"):
        LabelPrior((1, 2), (1.0, 1.0, 1.0))
    with pytest.raises(FedbeError, match="share a first token"):
        LabelPrior((1, 1), (1.0, 1.0))
    for counts in ((0.0, 0.0), (1.0, -1.0), (1.0, math.nan)):
        with pytest.raises(FedbeError, match="counts"):
            LabelPrior((1, 2), counts)
    with pytest.raises(FedbeError, match="outside the vocabulary"):
        LabelPrior((1, 999), (1.0, 1.0)).offsets(256, torch.device("cpu"))
    # a client without a usable prior (no labelled data, or two labels sharing a token) trains plain CE
    model, registry = _model()
    batch = _batch([7, 7, 9, 7])
    want = float(causal_lm_loss(model, batch))
    result = train_blocks(model, registry, [0], [batch], plain_recipe(steps=1, label_balance=True))
    assert result.ce_losses[0] == pytest.approx(want, rel=1e-5)


def _factored_reference(
    logits: torch.Tensor, targets: torch.Tensor, counts: tuple[float, ...]
) -> torch.Tensor:
    """-log P(label words) - log softmax(label logits + log(K f))[target] at a label row; plain CE elsewhere."""
    share = torch.log(
        torch.tensor([max(c, 0.5) for c in counts]) / sum(max(c, 0.5) for c in counts) * len(counts)
    )
    losses = []
    for z, t in zip(logits, targets.tolist(), strict=True):
        logp = torch.log_softmax(z, dim=-1)
        if t in LABELS:
            within = torch.log_softmax(z[list(LABELS)] + share, dim=-1)[LABELS.index(t)]
            losses.append(-(logp[list(LABELS)].logsumexp(0) + within))
        else:
            losses.append(-logp[t])
    return torch.stack(losses).mean()


