"""Label-likelihood scoring: the one-forward fast path equals scoring every label's full sequence."""

from __future__ import annotations

import logging

import pytest
import torch

from fedbe import progress_bar, sources
from fedbe.datasets import IGNORE_INDEX, Example, encode_example
from fedbe.evaluation import classification_accuracy, label_log_likelihoods


class _CharTokenizer:
    pad_token_id = 0
    eos_token_id = 0

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": [ord(c) % 512 for c in text]}


def _reference(
    model: torch.nn.Module, tok: _CharTokenizer, examples: list[Example], labels: list[str]
) -> torch.Tensor:
    out = torch.empty(len(examples), len(labels))
    with torch.no_grad():
        for i, e in enumerate(examples):
            for j, label in enumerate(labels):
                ids, labs = encode_example(tok, Example(e.text, label), 40)
                logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].float(), dim=-1)
                target = torch.tensor(labs[1:])
                keep = target != IGNORE_INDEX
                out[i, j] = logprobs[keep].gather(-1, target[keep].unsqueeze(-1)).sum()
    return out


EXAMPLES = [
    Example("the match ended in a draw", "a"),
    Example("shares fell sharply", "b"),
    Example("a new phone was launched today by the firm", "c"),
]


@pytest.mark.parametrize(
    "labels", [["a", "b", "c"], ["sport", "biz", "tech"]], ids=["single-token", "multi-token"]
)
def test_scores_match_full_sequence_reference(labels: list[str]) -> None:
    model = sources.build_tiny_model("llama", seed=3)
    tok = _CharTokenizer()
    examples = [Example(e.text, labels[k]) for k, e in enumerate(EXAMPLES)]
    fast = label_log_likelihoods(model, tok, examples, labels, max_tokens=40, batch_size=2)
    ref = _reference(model, tok, examples, labels)
    torch.testing.assert_close(fast, ref, atol=1e-4, rtol=1e-4)


def test_accuracy_counts_argmax_of_the_scores() -> None:
    model = sources.build_tiny_model("llama", seed=3)
    tok = _CharTokenizer()
    labels = ["a", "b", "c"]
    scores = label_log_likelihoods(model, tok, EXAMPLES, labels, max_tokens=40)
    predicted = scores.argmax(dim=1).tolist()
    # relabel the examples so that exactly the first one is predicted correctly
    relabelled = [
        Example(e.text, labels[predicted[i]] if i == 0 else labels[(predicted[i] + 1) % 3])
        for i, e in enumerate(EXAMPLES)
    ]
    assert classification_accuracy(model, tok, relabelled, labels, 40) == pytest.approx(1 / 3)


def test_scoring_logs_its_progress(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(progress_bar.ENV, "log")
    monkeypatch.setattr(progress_bar, "MIN_GAP_SECONDS", 0.0)  # the tiny model is done in milliseconds
    caplog.set_level(logging.INFO, logger=progress_bar.__name__)
    model = sources.build_tiny_model("llama", seed=3)
    label_log_likelihoods(model, _CharTokenizer(), EXAMPLES, ["a", "b", "c"], max_tokens=40, batch_size=2)
    lines = [r.getMessage() for r in caplog.records if r.name == progress_bar.__name__]
    assert lines[0].startswith("scoring examples: 2/3 examples (66%)")
    assert lines[-1].startswith("scoring examples: 3 examples in ")
