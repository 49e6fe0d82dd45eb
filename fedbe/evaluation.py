"""Downstream accuracy of classification posed as generation.

The prediction is the label word whose tokens have the highest total log-likelihood after the
prompt; accuracy is the fraction of examples where that is the true label.

Cost: one forward of the prompt per example gives every label's first token; only labels that
tokenize to more than one token need a forward of prompt + label. (BBC News' five label words are
single tokens for SmolLM2, so scoring costs one forward per example, not five.)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import PreTrainedModel

from fedbe.datasets import IGNORE_INDEX, Example, collate, encode_example, pad_id
from fedbe.progress_bar import Progress


def _target_logprobs(
    model: PreTrainedModel, rows: Sequence[tuple[list[int], list[int]]], pad_id: int
) -> torch.Tensor:
    """Per row and position, log-probabilities of the next token: ``[rows, width, vocab]``."""
    batch = collate(rows, pad_id)
    device = next(model.parameters()).device
    logits = model(
        input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device), use_cache=False
    ).logits.float()
    return torch.log_softmax(logits, dim=-1).cpu()


def label_token_ids(tokenizer: Any, labels: Sequence[str]) -> list[list[int]]:
    """Each label word's tokens as it follows the prompt (with its leading space)."""
    return [tokenizer(" " + label, add_special_tokens=False)["input_ids"] for label in labels]


@torch.no_grad()
def label_log_likelihoods(
    model: PreTrainedModel,
    tokenizer: Any,
    examples: Sequence[Example],
    labels: Sequence[str],
    max_tokens: int,
    batch_size: int = 8,
) -> torch.Tensor:
    """``[len(examples), len(labels)]`` summed log-probabilities of each label's target tokens."""
    model.eval()
    pad = pad_id(tokenizer)
    label_ids = label_token_ids(tokenizer, labels)
    first = torch.tensor([ids[0] for ids in label_ids])
    multi = [j for j, ids in enumerate(label_ids) if len(ids) > 1]
    scores = torch.empty(len(examples), len(labels))
    with Progress(len(examples), "scoring examples", "examples") as shown:
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            # The prompt of each example, encoded exactly as in training (the article cut to fit the
            # longest label); the label's first token is predicted at the last prompt position.
            rows = [encode_example(tokenizer, Example(e.text, labels[0]), max_tokens) for e in chunk]
            prompts: list[tuple[list[int], list[int]]] = [
                (ids[: len(ids) - len(label_ids[0])], []) for ids, _ in rows
            ]
            logprobs = _target_logprobs(model, prompts, pad)
            last = torch.tensor([len(ids) - 1 for ids, _ in prompts])
            scores[start : start + len(chunk)] = logprobs[torch.arange(len(chunk)), last][:, first]
            for j in multi:
                full = [encode_example(tokenizer, Example(e.text, labels[j]), max_tokens) for e in chunk]
                lp = _target_logprobs(model, full, pad)[:, :-1]
                targets = collate(full, pad).labels[:, 1:]
                mask = targets != IGNORE_INDEX
                picked = lp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
                scores[start : start + len(chunk), j] = (picked * mask).sum(-1)
            shown.update(len(chunk))
    return scores


def classification_accuracy(
    model: PreTrainedModel,
    tokenizer: Any,
    examples: Sequence[Example],
    labels: Sequence[str],
    max_tokens: int,
) -> float:
    if not examples:
        return float("nan")
    scores = label_log_likelihoods(model, tokenizer, examples, labels, max_tokens)
    predicted = scores.argmax(dim=1)
    truth = torch.tensor([list(labels).index(e.label) for e in examples])
    return float((predicted == truth).float().mean())
