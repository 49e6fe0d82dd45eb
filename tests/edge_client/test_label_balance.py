"""The label-balanced loss (balanced softmax over the label words with the client's own label mix)."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from edge_client.trainer import (
    LabelPrior,
    TrainConfig,
    TrainResult,
    _distill_step_loss,
    _forward_logits,
    balanced_logits,
    causal_lm_loss,
    label_cross_entropy,
    train_blocks,
)
from fedbe import expansion, quantization, sources
from fedbe.datasets import Batch
from fedbe.errors import FedbeError

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
    full = _forward_logits(model, batch)[:, :-1].float()
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
    cfg = TrainConfig(steps=1, distill_lambda=1.0)
    _distill_step_loss(model, base, batch, cfg, None, result)
    _distill_step_loss(model, base, batch, cfg, None, balanced, prior)
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
        cfg = TrainConfig(steps=1, lr=1e-3, label_balance=balance)
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
    model, registry = _model()
    with pytest.raises(FedbeError, match="label_balance needs"):
        train_blocks(model, registry, [0], [_batch([7])], TrainConfig(steps=1, label_balance=True))


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


def test_factored_form_is_the_reference_and_plain_ce_for_a_balanced_client() -> None:
    model, registry = _model()
    batch = _batch([7, 7, 9, 7])
    full = _forward_logits(model, batch)[:, :-1].float()
    targets = batch.labels[:, 1:].reshape(-1)
    keep = targets != -100
    logits, targets = full.reshape(-1, full.shape[-1])[keep], targets[keep]
    counts = (3.0, 1.0, 0.0)
    prior = LabelPrior(LABELS, counts)
    want = _factored_reference(logits, targets, counts)
    vocab = label_cross_entropy(logits, targets, prior, "vocab")
    assert abs(float(want) - float(vocab)) > 1e-3  # the two forms differ, so the check can fail
    assert float(label_cross_entropy(logits, targets, prior, "factored")) == pytest.approx(
        float(want), rel=1e-5
    )
    assert float(causal_lm_loss(model, batch, prior, "factored")) == pytest.approx(float(want), rel=1e-5)
    # a client with every label equally often: the exact split of plain cross-entropy
    even = LabelPrior(LABELS, (2.0, 2.0, 2.0))
    plain = torch.nn.functional.cross_entropy(logits, targets)
    assert float(label_cross_entropy(logits, targets, even, "factored")) == pytest.approx(
        float(plain), rel=1e-5
    )
    # the trainer's distilled step and its plain step take the form from the config
    cfg = TrainConfig(steps=1, distill_lambda=1.0, label_balance=True, balance_form="factored")
    result = TrainResult(block_ids=(0, 1))
    _distill_step_loss(model, lambda: expansion.bypassed(model, registry), batch, cfg, None, result, prior)
    assert result.ce_losses[0] == pytest.approx(float(want), rel=1e-5)
    model, registry = _model()
    trained = train_blocks(
        model, registry, [0, 1], [batch], replace(cfg, distill_lambda=0.0), label_prior=prior
    )
    assert trained.ce_losses[0] == pytest.approx(float(want), rel=1e-5)


def test_factored_form_corrects_the_label_mix_while_the_label_words_hold_little_mass() -> None:
    # A model early in training: the label words score like the rest of a 64-token vocabulary, so
    # they hold 3/64 of its softmax. The client's articles are 15 of label 7 and 5 of label 9. In
    # the vocabulary softmax an offset barely changes the gradient (every label's adjusted
    # probability is small), so the "vocab" form still pushes z7 - z9 up almost as plain CE does;
    # the factored form balances the softmax over the label words alone: no push on z7 - z9.
    logits = torch.zeros(20, 64)
    targets = torch.tensor([7] * 15 + [9] * 5)
    prior = LabelPrior(LABELS, (15.0, 5.0, 0.0))
    pushes = {}
    for name, p, form in (
        ("plain", None, "vocab"),
        ("vocab", prior, "vocab"),
        ("factored", prior, "factored"),
    ):
        z = logits.clone().requires_grad_(True)
        (label_cross_entropy(z, targets, p, form) * len(targets)).backward()
        assert z.grad is not None
        pushes[name] = float(-(z.grad[:, 7] - z.grad[:, 9]).sum())  # descent direction on z7 - z9
    assert pushes["plain"] > 5.0
    assert pushes["vocab"] > 0.8 * pushes["plain"]
    assert abs(pushes["factored"]) < 0.05 * pushes["plain"]


def test_labels_form_trains_the_balanced_label_softmax_alone() -> None:
    """ "labels": the factored form without -log P(label words): at a label word only the balanced
    softmax over the label words counts, so a shift of every label word's logit changes nothing
    (the label words' total probability is not trained), and the rest of the rows are plain CE."""
    torch.manual_seed(1)
    logits = torch.randn(5, 32)
    targets = torch.tensor([7, 7, 9, 3, 11])  # one end-token row
    counts = (3.0, 1.0, 0.0)
    prior = LabelPrior(LABELS, counts)
    share = torch.log(torch.tensor([3.0, 1.0, 0.5]) / 4.5 * 3)
    rows = []
    for z, t in zip(logits, targets.tolist(), strict=True):
        if t in LABELS:
            rows.append(-torch.log_softmax(z[list(LABELS)] + share, dim=-1)[LABELS.index(t)])
        else:
            rows.append(-torch.log_softmax(z, dim=-1)[t])
    want = torch.stack(rows).mean()
    got = label_cross_entropy(logits, targets, prior, "labels")
    assert float(got) == pytest.approx(float(want), rel=1e-5)
    assert abs(float(got) - float(label_cross_entropy(logits, targets, prior, "factored"))) > 1e-2
    z = logits.clone().requires_grad_(True)
    label_cross_entropy(z, targets, prior, "labels").backward()
    assert z.grad is not None
    label_rows = torch.tensor([True, True, True, False, True])
    # no gradient along "every label word up together" on a label row (the total mass is untrained)
    assert torch.allclose(z.grad[label_rows][:, list(LABELS)].sum(dim=1), torch.zeros(4), atol=1e-6)
    others = [t for t in range(32) if t not in LABELS]
    assert torch.equal(z.grad[label_rows][:, others], torch.zeros(4, len(others)))


def test_unknown_balance_forms_are_refused() -> None:
    with pytest.raises(FedbeError, match="balance_form 'softmax'"):
        TrainConfig(balance_form="softmax")
    with pytest.raises(FedbeError, match="balance_form 'softmax'"):
        label_cross_entropy(
            torch.zeros(1, 32), torch.tensor([7]), LabelPrior(LABELS, (1.0, 1.0, 1.0)), "softmax"
        )


def test_present_form_balances_over_the_labels_the_client_holds() -> None:
    """ "present": the label softmax over the labels with a count (and the row's target); a client
    holding one label gets no gradient from its label words, so it can not teach that label."""
    torch.manual_seed(2)
    logits = torch.randn(4, 32)
    targets = torch.tensor([7, 9, 3, 7])
    prior = LabelPrior(LABELS, (6.0, 2.0, 0.0))  # label 11 absent: out of the softmax
    share = torch.log(torch.tensor([6.0, 2.0]) / 8.5 * 3)  # the offsets as every form computes them
    rows = []
    for z, t in zip(logits, targets.tolist(), strict=True):
        if t in LABELS:
            rows.append(-torch.log_softmax(z[[7, 9]] + share, dim=-1)[[7, 9].index(t)])
        else:
            rows.append(-torch.log_softmax(z, dim=-1)[t])
    got = label_cross_entropy(logits, targets, prior, "present")
    assert float(got) == pytest.approx(float(torch.stack(rows).mean()), rel=1e-5)
    assert abs(float(got) - float(label_cross_entropy(logits, targets, prior, "labels"))) > 1e-3
    z = logits.clone().requires_grad_(True)
    one = LabelPrior(LABELS, (48.0, 0.0, 0.0))
    label_cross_entropy(z, torch.tensor([7, 7, 7, 3]), one, "present").backward()
    assert z.grad is not None
    assert torch.equal(z.grad[:3], torch.zeros(3, 32))  # the label rows: nothing to learn
    assert z.grad[3].abs().sum() > 0  # the end-token row still trains


def test_neutral_form_adds_a_total_label_probability_term_that_raises_every_label_alike() -> None:
    """ "neutral": "present" plus -log P'(L), the label words' total probability with each label logit
    at the label logits' mean; that term's gradient is the same on every label word (it can not raise
    the model's favourite label), negative (it raises them all), and it trains non-label words down."""
    torch.manual_seed(3)
    logits = torch.randn(4, 32)
    targets = torch.tensor([7, 9, 3, 11])
    prior = LabelPrior(LABELS, (6.0, 2.0, 1.0))
    rows = []
    for z, t in zip(logits, targets.tolist(), strict=True):
        if t in LABELS:
            mean = z[list(LABELS)].mean()
            others = torch.cat([z[: min(LABELS)], z[[i for i in range(32) if i not in LABELS and i >= 7]]])
            mass = mean + math.log(3) - torch.logsumexp(torch.cat([(mean + math.log(3)).view(1), others]), 0)
            rows.append(-mass)
        else:
            rows.append(torch.tensor(0.0))
    present = label_cross_entropy(logits, targets, prior, "present")
    got = label_cross_entropy(logits, targets, prior, "neutral")
    assert float(got) == pytest.approx(float(present) + float(torch.stack(rows).mean()), rel=1e-5)
    z = logits.clone().requires_grad_(True)
    w = logits.clone().requires_grad_(True)
    label_cross_entropy(z, targets, prior, "neutral").backward()
    label_cross_entropy(w, targets, prior, "present").backward()
    assert z.grad is not None and w.grad is not None
    term = z.grad - w.grad  # the total-probability term's own gradient
    for row in (0, 1, 3):  # the label rows
        on_labels = term[row, list(LABELS)]
        assert torch.allclose(on_labels, on_labels[0].expand(3), atol=1e-7) and float(on_labels[0]) < 0
        assert float(term[row].sum()) == pytest.approx(0.0, abs=1e-6)  # softmax: the rest goes down
    assert torch.equal(term[2], torch.zeros(32))  # a non-label row: plain cross-entropy in both
