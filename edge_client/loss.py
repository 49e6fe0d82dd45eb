"""The loss a client minimises, as in the paper: ``CE + lambda * KL``.

* **CE**, the cross-entropy of the target tokens (the label word and what follows it), label-balanced
  with the client's own label frequencies (:class:`LabelPrior`): at a position that predicts a label
  word, the log of the client's frequency of each label is added to that label word's logit inside
  the softmax over the vocabulary (balanced softmax, Ren et al. 2020; the logit calibration FedLC and
  FedRS apply to federated label skew). The model then learns what tells the labels apart rather than
  the client's label mix. Labels the client lacks count half an example, so their logits are hardly
  pushed down. The KL term and evaluation see raw logits.
* **KL**, self-distillation against the frozen base: KL(p_base || p_model) averaged over the
  positions that are *not* targets (article and template). The base's distribution comes from the
  same model with every new block bypassed (exactly the base, no second copy in memory). With
  ``distill_top_k = K > 0`` the base's top-K probabilities per position (the rest of the mass lumped
  into one bucket) are computed once per example and kept in a :class:`BaseCache`, so the extra base
  forward disappears after the first pass over the data; ``distill_top_k = 0`` is the exact KL with a
  base forward every step. ``distill_sample = N`` distils a fresh random N of the non-target positions
  per step (an unbiased estimate of the same KL) and ``distill_rows = R`` takes them from a random R
  rows, so the vocabulary projection and the base forward run on that sample only.

:func:`distilled_loss` is the whole of it for one step; the optimisation loop is
:mod:`edge_client.trainer`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedModel

from fedbe.datasets import IGNORE_INDEX, Batch
from fedbe.errors import FedbeError
from fedbe.evaluation import label_token_ids


@dataclass(frozen=True)
class LabelPrior:
    """A client's label frequencies, as logit offsets on the label words' tokens (balanced softmax).

    ``token_ids[i]`` is the first token of label i; ``counts[i]`` the client's examples of it.
    """

    token_ids: tuple[int, ...]
    counts: tuple[float, ...]

    @classmethod
    def for_labels(cls, tokenizer: Any, labels: Sequence[str], counts: Mapping[str, float]) -> LabelPrior:
        """The prior over ``labels`` with ``counts`` (a label absent counts 0), each label's token the
        first of the label word as it follows the prompt (as the evaluation scores it). Raises
        :class:`FedbeError` where two labels share that token (a byte tokenizer's leading space)."""
        ids = tuple(tokens[0] for tokens in label_token_ids(tokenizer, labels))
        return cls(ids, tuple(float(counts.get(k, 0.0)) for k in labels))

    def __post_init__(self) -> None:
        if len(self.token_ids) != len(self.counts) or not self.token_ids:
            raise FedbeError(f"label prior: {len(self.token_ids)} label tokens but {len(self.counts)} counts")
        if len(set(self.token_ids)) != len(self.token_ids):
            raise FedbeError(f"label prior: two labels share a first token ({list(self.token_ids)}); "
                             "balanced softmax needs one distinct token per label")  # fmt: skip
        if not all(math.isfinite(c) and c >= 0 for c in self.counts) or sum(self.counts) <= 0:
            raise FedbeError(f"label prior: counts {list(self.counts)} must be >= 0 with at least one > 0")

    def offsets(self, vocab: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ids, bias)``: the label tokens and a ``[vocab]`` bias, 0 elsewhere: on label i,
        ``log(K * f_i)`` with ``f_i`` the client's frequency of label i among its K labels.

        Relative to the uniform mix: a client with every label equally often gets no offsets (its
        loss is plain CE), and for a model that ranks the labels equally the offsets leave the label
        words' total probability against the rest of the vocabulary unchanged
        (``logsumexp(z + log(K f)) = z + log K``). Plain log frequencies (all negative) made the
        model raise every label word over the rest of the vocabulary, a push on general text that
        a balanced client paid too. A label the client lacks counts half an example (its logit is
        hardly pushed down, and no offset is infinite).
        """
        counts = torch.tensor([max(c, 0.5) for c in self.counts], dtype=torch.float32)
        ids = torch.tensor(self.token_ids, dtype=torch.long)
        if int(ids.max()) >= vocab:
            raise FedbeError(f"label prior: token id {int(ids.max())} outside the vocabulary of {vocab}")
        bias = torch.zeros(vocab)
        bias[ids] = torch.log(counts / counts.sum() * len(self.token_ids))
        return ids.to(device), bias.to(device)


def balanced_logits(logits: torch.Tensor, targets: torch.Tensor, prior: LabelPrior | None) -> torch.Tensor:
    """``logits`` ``[n, vocab]`` (float) with the prior's log frequencies added where the target is a
    label token; unchanged where it is not (the tokens after the label word) or without a prior."""
    if prior is None:
        return logits
    ids, bias = prior.offsets(logits.shape[-1], logits.device)
    at_label = torch.isin(targets, ids).unsqueeze(-1)
    return logits + at_label * bias


def balanced_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, prior: LabelPrior | None) -> torch.Tensor:
    """Mean cross-entropy of ``targets`` under ``logits`` ``[n, vocab]`` (float), label-balanced with
    ``prior`` (:func:`balanced_logits`); plain without a prior."""
    return torch.nn.functional.cross_entropy(balanced_logits(logits, targets, prior), targets)


def causal_lm_loss(model: PreTrainedModel, batch: Batch, prior: LabelPrior | None = None) -> torch.Tensor:
    """Mean cross-entropy of the target tokens (labels != IGNORE_INDEX), as the model's own loss;
    with ``prior``, balanced over the label words (:func:`balanced_logits`).

    Only the positions that predict a target are projected onto the vocabulary
    (``logits_to_keep``): the output layer and its softmax over ~50k tokens would otherwise run on
    every position of every article, for nothing.
    """
    device = next(p for p in model.parameters()).device
    keep = torch.zeros_like(batch.attention_mask, dtype=torch.bool)
    keep[:, :-1] = batch.labels[:, 1:] != IGNORE_INDEX
    if not keep.any():
        raise FedbeError("a training batch has no target tokens (every label is ignored)")
    logits = model(
        input_ids=batch.input_ids.to(device),
        attention_mask=batch.attention_mask.to(device),
        use_cache=False,
        logits_to_keep=keep.to(device),
    ).logits
    targets = batch.labels[:, 1:][keep[:, :-1]].to(device)
    flat = logits.reshape(-1, logits.shape[-1]).float()
    return balanced_cross_entropy(flat, targets, prior)


def distill_positions(batch: Batch) -> torch.Tensor:
    """``[rows, width-1]`` bool: next-token positions that predict a real, non-target token."""
    return (batch.attention_mask[:, 1:] == 1) & (batch.labels[:, 1:] == IGNORE_INDEX)


def _row_key(batch: Batch, row: int) -> bytes:
    n = int(batch.attention_mask[row].sum())
    return batch.input_ids[row, :n].numpy().tobytes()


class BaseCache:
    """The base model's top-K next-token probabilities at the distillation positions of each example.

    Keyed by the example's token ids, so it is valid for as long as the base model and the tokenized
    data are: keep one per client and drop it when the base or the expansion changes.
    """

    def __init__(self, top_k: int) -> None:
        if top_k < 1:
            raise FedbeError(f"a base cache needs top_k >= 1, got {top_k}")
        self.top_k = top_k
        self._rows: dict[bytes, tuple[torch.Tensor, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def nbytes(self) -> int:
        return sum(
            i.numel() * i.element_size() + p.numel() * p.element_size() for i, p in self._rows.values()
        )

    def missing(self, batch: Batch, rows: Sequence[int] | None = None) -> list[int]:
        """The rows of ``batch`` (of ``rows``, default all) whose base predictions are not held yet."""
        wanted = range(batch.size) if rows is None else rows
        return [r for r in wanted if _row_key(batch, r) not in self._rows]

    def fill(self, batch: Batch, base_logits: torch.Tensor) -> None:
        """Store the top-K of ``base_logits``: ``[P, V]`` at the batch's distillation positions (mask order)."""
        positions = distill_positions(batch)
        if base_logits.shape[0] != int(positions.sum()):
            raise FedbeError(
                f"expected base logits at {int(positions.sum())} positions, got {base_logits.shape[0]}"
            )
        top_logp, top_idx = torch.log_softmax(base_logits.float(), dim=-1).topk(self.top_k, dim=-1)
        counts = positions.sum(1).tolist()
        for row, (idx, logp) in enumerate(zip(top_idx.split(counts), top_logp.split(counts), strict=True)):
            self._rows[_row_key(batch, row)] = (idx.to(torch.int32).cpu(), logp.cpu())

    def targets(self, batch: Batch, rows: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Indices ``[P, K]`` and log-probabilities ``[P, K]`` for the positions of the batch's ``rows``
        (default all), in mask order."""
        held = [self._rows[_row_key(batch, r)] for r in (range(batch.size) if rows is None else rows)]
        return torch.cat([i for i, _ in held]).long(), torch.cat([p for _, p in held])


def kl_full(base_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(p_base || p_model), exact over the vocabulary (``[P, V]`` inputs)."""
    return _kl_full_logp(base_logits, torch.log_softmax(logits.float(), dim=-1))


def _kl_full_logp(base_logits: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    base_logp = torch.log_softmax(base_logits.float(), dim=-1)
    return (base_logp.exp() * (base_logp - logp)).sum(-1).mean()


def kl_top_k(top_idx: torch.Tensor, top_logp: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Mean KL(p_base || p_model) with the base known only on its top K tokens per position.

    The base's remaining mass r = 1 - sum(top) is compared with the model's mass outside the same
    tokens, as one extra bucket (an exact KL between the two coarsened distributions, a lower bound
    of the full KL that tightens as K grows).
    """
    return _kl_top_k_logp(top_idx, top_logp, torch.log_softmax(logits.float(), dim=-1))


def _kl_top_k_logp(top_idx: torch.Tensor, top_logp: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    model_top = logp.gather(-1, top_idx)
    p_top = top_logp.exp()
    rest_p = (1 - p_top.sum(-1)).clamp(min=1e-8)
    rest_q = (1 - model_top.exp().sum(-1)).clamp(min=1e-8)
    kl = (p_top * (top_logp - model_top)).sum(-1) + rest_p * (rest_p.log() - rest_q.log())
    return kl.mean()


def forward_logits(model: PreTrainedModel, batch: Batch, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Logits ``[rows, width, V]``, or ``[N, V]`` at the ``True`` positions of a ``[rows, width]`` ``keep``."""
    device = next(p for p in model.parameters()).device
    extra = {} if keep is None else {"logits_to_keep": keep.to(device)}
    return model(
        input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device), use_cache=False,
        **extra,
    ).logits  # fmt: skip


def predicting(selected: torch.Tensor) -> torch.Tensor:
    """A ``[rows, width]`` keep mask from a ``[rows, width-1]`` mask of next-token positions."""
    keep = torch.zeros(selected.shape[0], selected.shape[1] + 1, dtype=torch.bool)
    keep[:, :-1] = selected
    return keep


@dataclass
class StepLoss:
    """One step's loss and its two parts (for the logs): ``total = ce + distill_lambda * kl``."""

    total: torch.Tensor
    ce: float
    kl: float | None  # None: no distillation this step
    base_forwards: int  # no-grad forwards of the base this step cost


def step_loss(
    model: PreTrainedModel,
    batch: Batch,
    distill_lambda: float,
    prior: LabelPrior | None,
    distill: Distillation | None,
) -> StepLoss:
    """The paper's loss for one batch: ``CE + distill_lambda * KL`` (plain CE without distillation)."""
    if distill is None or distill_lambda <= 0:
        ce = causal_lm_loss(model, batch, prior)
        return StepLoss(ce, float(ce.detach()), None, 0)
    logits, targets, sampled, teacher, forwards = distill.forward(model, batch)
    logp = torch.log_softmax(logits, dim=-1)
    target_ids = distill.target_ids(batch, logp.device)
    if prior is None:
        ce = torch.nn.functional.nll_loss(logp[targets], target_ids)
    else:  # the balanced CE needs its own softmax, over the (few) target rows only
        ce = balanced_cross_entropy(logits[targets], target_ids, prior)
    kl = teacher(logp[sampled]) if bool(sampled.any()) else logp.sum() * 0.0
    return StepLoss(ce + distill_lambda * kl, float(ce.detach()), float(kl.detach()), forwards)


@dataclass
class Distillation:
    """Where a step distils and what the base predicts there: samples ``rows`` rows and ``sample``
    positions per step (torch's global generator), and reads the base from ``cache`` (top-K) or, with
    no cache, from an exact no-grad forward of ``base`` (a context in which the model is the base)."""

    base: Callable[[], AbstractContextManager[Any]]
    rows: int = 0
    sample: int = 0
    cache: BaseCache | None = None

    def target_ids(self, batch: Batch, device: torch.device) -> torch.Tensor:
        return batch.labels[:, 1:][batch.labels[:, 1:] != IGNORE_INDEX].to(device)

    def forward(
        self, model: PreTrainedModel, batch: Batch
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Callable[[torch.Tensor], torch.Tensor], int]:
        """One forward of the model where a loss term looks: ``(logits [P, V] float, target rows [P],
        distilled rows [P], teacher, base forwards)``; ``teacher(logp)`` is the KL at the distilled rows."""
        positions = distill_positions(batch)  # [rows, width-1]
        targets = batch.labels[:, 1:] != IGNORE_INDEX
        if not targets.any():
            raise FedbeError("a training batch has no target tokens (every label is ignored)")
        rows = sample_rows(batch.size, self.rows)  # the rows distilled this step, or None = all
        if rows is not None:
            chosen = torch.zeros(batch.size, dtype=torch.bool)
            chosen[rows] = True
            positions = positions & chosen[:, None]
        order = sample_positions(positions, self.sample)  # indices into mask order, or None
        sampled = positions if order is None else _mask_of(positions, order)
        cache, forwards, base_logits = self.cache, 0, None
        missing = cache.missing(batch, rows) if cache is not None and positions.any() else []
        if missing:
            # the cache keeps every position of a row (filled once per example); the step uses its sample
            assert cache is not None
            part = rows_of(batch, missing)
            with torch.no_grad(), self.base():
                cache.fill(part, forward_logits(model, part, predicting(distill_positions(part))))
            forwards += 1
        elif cache is None and sampled.any():
            # the base runs only on the rows with a sampled position (rows with none add no logits)
            used = [r for r in range(batch.size) if bool(sampled[r].any())]
            with torch.no_grad(), self.base():
                base_logits = forward_logits(model, rows_of(batch, used), predicting(sampled[used]))
            forwards += 1
        kept = sampled | targets
        # one vocabulary projection and one log-softmax, only where a loss term looks
        logits = forward_logits(model, batch, predicting(kept)).float()

        def teacher(logp: torch.Tensor) -> torch.Tensor:
            if cache is None:
                assert base_logits is not None
                return _kl_full_logp(base_logits, logp)
            top_idx, top_logp = cache.targets(batch, rows)
            if order is not None:
                drawn = order.to(top_idx.device)
                top_idx, top_logp = top_idx[drawn], top_logp[drawn]
            return _kl_top_k_logp(top_idx.to(logp.device), top_logp.to(logp.device), logp)

        device = logits.device
        return logits, targets[kept].to(device), sampled[kept].to(device), teacher, forwards


def sample_rows(size: int, n: int) -> list[int] | None:
    """Sorted indices of ``n`` of a batch's ``size`` rows drawn without replacement, from torch's
    global generator; ``None`` (and no draw) when ``n`` is 0 or covers them all."""
    if n <= 0 or n >= size:
        return None
    return sorted(int(i) for i in torch.randperm(size)[:n])


def rows_of(batch: Batch, rows: Sequence[int]) -> Batch:
    """The sub-batch of ``batch``'s ``rows`` (same width; each row's tokens and labels unchanged)."""
    index = torch.tensor(list(rows), dtype=torch.long)
    return Batch(batch.input_ids[index], batch.attention_mask[index], batch.labels[index])


def sample_positions(positions: torch.Tensor, n: int) -> torch.Tensor | None:
    """Sorted indices (in mask order) of ``n`` of the ``True`` positions drawn without replacement,
    from torch's global generator; ``None`` when ``n`` is 0 or covers them all."""
    total = int(positions.sum())
    if n <= 0 or n >= total:
        return None
    return torch.randperm(total)[:n].sort().values


def _mask_of(positions: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """The mask of the ``order``-th ``True`` positions of ``positions``."""
    flat = positions.flatten().nonzero().squeeze(1)[order.to(positions.device)]
    mask = torch.zeros(positions.numel(), dtype=torch.bool, device=positions.device)
    mask[flat] = True
    return mask.view_as(positions)


