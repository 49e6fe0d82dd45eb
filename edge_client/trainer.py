"""Local training of the assigned new blocks over the frozen (quantized) base.

Only the assigned blocks train (AdamW over exactly their parameters); the base and the other new
blocks are frozen and in eval mode, so dropout and batch statistics of the base never change.

Retention mechanisms (each a :class:`TrainConfig` option, measured by ``fedbe bench``):

* **Self-distillation against the base** (``distill_lambda > 0``): loss = CE on the target tokens
  + lambda * KL(p_base || p_model) averaged over the *non-target* positions (article and template).
  The base's distribution comes from the same model with every new block bypassed (exactly the
  base, no second copy in memory). With ``distill_top_k = 0`` that costs one extra no-grad forward
  per step and the KL is exact over the vocabulary. With ``distill_top_k = K > 0`` the base's top-K
  probabilities per position (the rest of the mass lumped into one bucket) are computed once per
  example and kept in a :class:`BaseCache` that lives as long as the client's data and base; later
  steps and rounds reuse them, so the extra forward disappears after the first pass over the data.
  ``distill_sample = N > 0`` distils a fresh random N of the batch's non-target positions per step
  instead of all of them (an unbiased estimate of the same KL), so the output projection runs on
  N positions, not the whole article. ``distill_rows = R > 0`` takes those positions from a fresh
  random R of the batch's rows per step: the base then runs on (and the cache fills for) R rows,
  not the whole batch, which is what a distilled step costs until the cache holds the client's
  data (the first pass over it: in a short federation, every step).
* **Identity pull** (``identity_pull > 0``): adds ``identity_pull * sum ||W||^2`` over the trained
  blocks' output projections, pulling each block back towards the identity it started as.
* **Per-block gates** (``block_gate``): a scalar gate per trained block multiplies everything the
  block adds to the residual stream (the outputs of its output projections). Each gate starts at 1
  over the block as received (a new block's projections start at zero, so it starts as the
  identity) and trains with the block, with no weight decay and outside the gradient clipping: one
  parameter per block, which Adam moves by about ``lr`` a step, so a client can scale a whole block
  down (or up) much faster than through its weights. At the end of local training each gate is
  folded into its block's output projections (``W <- g W``, ``b <- g b``): the block computes what
  it computed gated, and what is sent, aggregated and saved has no gate in it (every round starts
  from gates of 1). The gates' final values are in :attr:`TrainResult.gates`.

And one against label skew, which is what breaks a federation whose clients each hold one or two
labels (not a retention mechanism, but it decides whether the blocks learn the task at all):

* **Label-balanced loss** (``label_balance``, with the client's :class:`LabelPrior`): at a position
  that predicts a label word, the cross-entropy is taken over logits to which the log of the
  client's own label frequency has been added, on the label words only (balanced softmax, Ren et
  al. 2020; the logit calibration FedLC/FedRS apply to federated label skew). The model then learns
  what tells the labels apart rather than the client's label mix: a client holding 44 politics
  articles of 48 no longer teaches "always politics". Labels the client lacks count half an
  example, so their logits are hardly pushed down. The KL term and evaluation see raw logits.
  Five forms (``balance_form``; ``"vocab"`` the default). ``"vocab"`` adds the offsets inside the softmax over the whole
  vocabulary; but early in training the label words hold a small share of that softmax, so an
  offset changes the gradient little (the gradient on a label's logit is its adjusted probability,
  which is small whatever the offset) and a skewed client still pushes its own labels up on every
  input. ``"factored"`` splits the cross-entropy exactly, ``-log p(y) = -log P(L) - log p(y | L)``
  with ``P(L)`` the label words' total probability, and balances only the second factor: a
  softmax over the label words alone, with the offsets, which corrects the label prior from the
  first step. The first factor, which teaches "answer with a label word", is left unbalanced.
  For a client with every label equally often these two forms are plain cross-entropy. Measured on
  validation (session 27) the factored form is slower: its unbalanced first factor raises whichever
  label word the model already prefers, on every input, so local models collapse onto the base's
  favourite label (a client with no politics article predicting "politics" for 98 of 100).
  ``"labels"`` drops that factor: at a label word the loss is the balanced softmax over the label
  words alone, which leaves the label words' total probability untrained (the evaluation ranks the
  labels by likelihood, so it does not need it; free generation would). Measured: round 1 far
  better, but a client holding one label still teaches it: its balanced loss is small but always
  points the same way, and Adam's steps do not shrink with the gradient (a client with 48 politics
  articles of 48 predicts politics for 92 of 100 articles). ``"present"`` restricts that softmax to
  the labels the client holds (counts > 0; the restricted softmax of FedRS): a client learns only
  to tell its own labels apart, and a one-label client gets no label gradient at all (it trains
  the distillation and the tokens after the label word).
  ``"neutral"`` is ``"present"`` plus a label-neutral term for the label words' total probability:
  ``-log P'(L)``, with ``P'(L)`` that total computed as if every label word's logit were the mean of
  the label words' logits, so the term raises all of them alike against the rest of the vocabulary
  (each gets the same gradient) and can not raise the model's favourite label the way the factored
  form's ``-log P(L)`` does (session 28).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedModel

from fedbe.blocks import set_trainable
from fedbe.datasets import IGNORE_INDEX, Batch
from fedbe.errors import FedbeError
from fedbe.evaluation import label_token_ids
from fedbe.expansion import BlockRegistry, architecture_of, bypassed, new_block_module
from fedbe.protocol import BALANCE_FORMS

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 10
    lr: float = 2e-4
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    deadline_seconds: float | None = None
    distill_lambda: float = 0.0
    distill_top_k: int = 0  # 0: exact KL with a base forward every step; K: cached top-K of the base
    identity_pull: float = 0.0
    # rows of text sampled once from the base itself (each from one token of the client's own data),
    # appended to every batch and distilled only: the KL then also holds the model to the base on
    # text like the base's own, not only on the client's task. 0 = off. Needs distill_lambda > 0.
    rehearsal_rows: int = 0
    # distillation positions per step, drawn at random (without replacement) from the batch's
    # non-target positions each step; 0 = all of them. The KL over a uniform sample is an unbiased
    # estimate of the KL over all positions, and the vocabulary projection (the costly part of a
    # distilled step on a small model with a large vocabulary) then runs on the sample only.
    distill_sample: int = 0
    # rows of the batch whose positions are distilled, drawn at random each step; 0 = every row. The
    # base forward that fills the cache (or gives the exact KL) then runs on these rows only.
    distill_rows: int = 0
    # balanced softmax over the label words at label positions (needs the client's LabelPrior)
    label_balance: bool = False
    # the form of the label-balanced loss: "vocab" (the offsets added to the label words' logits in
    # the softmax over the whole vocabulary), "factored" (-log P(any label word), unbalanced, plus
    # the balanced softmax over the label words alone), "labels" (that softmax alone), "present"
    # (that softmax over the labels the client holds) or "neutral" ("present" plus a term raising
    # every label word alike); module doc
    balance_form: str = "vocab"
    # a trainable scalar gate per trained block on what it adds to the residual stream, starting at
    # 1 and folded into the block's output projections when local training ends (see the module doc)
    block_gate: bool = False

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise FedbeError(f"steps must be >= 1, got {self.steps}")
        if self.balance_form not in BALANCE_FORMS:
            raise FedbeError(f"balance_form {self.balance_form!r}: choose one of {', '.join(BALANCE_FORMS)}")
        if not (math.isfinite(self.distill_lambda) and self.distill_lambda >= 0):
            raise FedbeError(f"distill_lambda must be a number >= 0, got {self.distill_lambda}")
        if self.distill_top_k < 0:
            raise FedbeError(f"distill_top_k must be >= 0 (0 = exact, no cache), got {self.distill_top_k}")
        if not (math.isfinite(self.identity_pull) and self.identity_pull >= 0):
            raise FedbeError(f"identity_pull must be a number >= 0, got {self.identity_pull}")
        if self.rehearsal_rows < 0:
            raise FedbeError(f"rehearsal_rows must be >= 0, got {self.rehearsal_rows}")
        if self.distill_sample < 0:
            raise FedbeError(f"distill_sample must be >= 0 (0 = every position), got {self.distill_sample}")
        if self.distill_rows < 0:
            raise FedbeError(f"distill_rows must be >= 0 (0 = every row), got {self.distill_rows}")
        if self.rehearsal_rows and not self.distill_lambda:
            raise FedbeError(
                "rehearsal_rows needs self-distillation (distill_lambda > 0): the rows carry no labels"
            )
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
    ce_losses: list[float] = field(default_factory=list)  # the target-token part of each step's loss
    distill_losses: list[float] = field(default_factory=list)  # the KL part (before lambda), if any
    base_forwards: int = 0  # no-grad forwards of the base spent on distillation
    step_seconds: list[float] = field(default_factory=list)
    rehearsal_seconds: float = 0.0  # sampling the rehearsal pool from the base (first call only)
    gates: dict[int, float] = field(default_factory=dict)  # block id -> its gate when folded (block_gate)

    @property
    def steps(self) -> int:
        return len(self.losses)

    @property
    def mean_loss(self) -> float:
        return sum(self.losses) / len(self.losses) if self.losses else float("nan")


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


def label_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, prior: LabelPrior | None, form: str = "vocab"
) -> torch.Tensor:
    """Mean cross-entropy of ``targets`` under ``logits`` ``[n, vocab]`` (float), label-balanced with
    ``prior`` in ``form`` (``"vocab"``: :func:`balanced_logits`; ``"factored"``: at a label word,
    ``-log P(label words) - log softmax(label logits + offsets)[target]``; ``"labels"``: the second
    term alone; ``"present"``: that over the labels with a count > 0 and the target's; ``"neutral"``:
    "present" plus ``-log P(label words)`` with every label logit at their mean); plain without a
    prior."""
    if prior is None or form == "vocab":
        return torch.nn.functional.cross_entropy(balanced_logits(logits, targets, prior), targets)
    if form not in BALANCE_FORMS:
        raise FedbeError(f"balance_form {form!r}: choose one of {', '.join(BALANCE_FORMS)}")
    ids, bias = prior.offsets(logits.shape[-1], logits.device)
    logp = torch.log_softmax(logits, dim=-1)
    nll = -logp.gather(1, targets.unsqueeze(1)).squeeze(1)
    at_label = targets.unsqueeze(1) == ids.unsqueeze(0)  # [n, labels]
    rows = at_label.any(dim=1)
    if rows.any():
        row_logits = logits[rows]
        label_logits = row_logits[:, ids] + bias[ids]
        if form in ("present", "neutral"):
            held = torch.tensor([c > 0 for c in prior.counts], device=logits.device)
            label_logits = label_logits.masked_fill(~(held.unsqueeze(0) | at_label[rows]), -math.inf)
        within = torch.log_softmax(label_logits, dim=-1)
        which = at_label[rows].float().argmax(dim=1, keepdim=True)
        loss = -within.gather(1, which).squeeze(1)
        if form == "factored":
            loss = loss - torch.logsumexp(logp[rows][:, ids], dim=-1)
        if form == "neutral":  # -log P'(L): every label logit replaced by their mean
            mean = row_logits[:, ids].mean(dim=-1, keepdim=True) + math.log(len(ids))
            others = row_logits.index_fill(1, ids, -math.inf)
            loss = loss - (mean.squeeze(1) - torch.logsumexp(torch.cat([mean, others], dim=1), dim=-1))
        nll = nll.masked_scatter(rows, loss)
    return nll.mean()


def causal_lm_loss(model: PreTrainedModel, batch: Batch, prior: LabelPrior | None = None,
                   form: str = "vocab") -> torch.Tensor:  # fmt: skip
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
    return label_cross_entropy(flat, targets, prior, form)


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
        self.rehearsal: torch.Tensor | None = None  # [pool, width] token ids sampled from the base

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


def _forward_logits(model: PreTrainedModel, batch: Batch, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Logits ``[rows, width, V]``, or ``[N, V]`` at the ``True`` positions of a ``[rows, width]`` ``keep``."""
    device = next(p for p in model.parameters()).device
    extra = {} if keep is None else {"logits_to_keep": keep.to(device)}
    return model(
        input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device), use_cache=False,
        **extra,
    ).logits  # fmt: skip


def _predicting(selected: torch.Tensor) -> torch.Tensor:
    """A ``[rows, width]`` keep mask from a ``[rows, width-1]`` mask of next-token positions."""
    keep = torch.zeros(selected.shape[0], selected.shape[1] + 1, dtype=torch.bool)
    keep[:, :-1] = selected
    return keep


REHEARSAL_POOL = 16  # sequences sampled once per client; each step takes the next rehearsal_rows of them


@torch.no_grad()
def sample_rehearsal(
    model: PreTrainedModel,
    base: Callable[[], AbstractContextManager[Any]],
    batches: Sequence[Batch],
    width: int,
) -> torch.Tensor:
    """``[REHEARSAL_POOL, width]`` token ids sampled from the base (nucleus 0.95, temperature 1).

    Each sequence starts from one token of the client's own inputs (spread over its batches), so
    nothing but the client's data and the frozen base is used. Seeded by those tokens: the same
    client gets the same pool every time.
    """
    starts = []
    rows = [(b, r) for b in batches for r in range(b.size)]
    for i in range(REHEARSAL_POOL):
        batch, row = rows[i % len(rows)]
        n = int(batch.attention_mask[row].sum())
        starts.append(int(batch.input_ids[row, (7 * i + 3) % max(1, n - 1)]))
    prompt = torch.tensor(starts).unsqueeze(1)
    device = next(p for p in model.parameters()).device
    was_training = model.training
    model.eval()
    with torch.random.fork_rng(), base():
        torch.manual_seed(sum(starts) % (2**31))
        out = model.generate(  # type: ignore[operator]
            input_ids=prompt.to(device), attention_mask=torch.ones_like(prompt).to(device), do_sample=True,
            top_p=0.95, top_k=0, temperature=1.0, max_new_tokens=width - 1, min_new_tokens=width - 1,
            pad_token_id=starts[0],
        )  # fmt: skip
    model.train(was_training)
    return out[:, :width].cpu()


def with_rehearsal(batch: Batch, pool: torch.Tensor, step: int, rows: int) -> Batch:
    """``batch`` plus ``rows`` pool sequences (cut or padded to its width), labels all ignored."""
    width = batch.input_ids.shape[1]
    picked = pool[[(step * rows + i) % pool.shape[0] for i in range(rows)], :width]
    ids = torch.zeros(rows, width, dtype=batch.input_ids.dtype)
    ids[:, : picked.shape[1]] = picked
    mask = torch.zeros(rows, width, dtype=batch.attention_mask.dtype)
    mask[:, : picked.shape[1]] = 1
    labels = torch.full((rows, width), IGNORE_INDEX, dtype=batch.labels.dtype)
    return Batch(
        torch.cat([batch.input_ids, ids]),
        torch.cat([batch.attention_mask, mask]),
        torch.cat([batch.labels, labels]),
    )


def _output_projection_params(
    model: PreTrainedModel, registry: BlockRegistry, block_ids: Sequence[int]
) -> list:
    arch = architecture_of(model)
    params: list[torch.nn.Parameter] = []
    for block_id in block_ids:
        block = new_block_module(model, registry, block_id)
        for path in arch.output_projections:
            params.extend(p for p in block.get_submodule(path).parameters() if p.requires_grad)
    return params


def train_blocks(
    model: PreTrainedModel,
    registry: BlockRegistry,
    block_ids: Sequence[int],
    batches: Iterable[Batch],
    config: TrainConfig,
    on_step: Callable[[int, float], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    base_cache: BaseCache | None = None,
    label_prior: LabelPrior | None = None,
) -> TrainResult:
    """Train exactly ``block_ids`` for ``config.steps`` steps (cycling over ``batches``).

    With ``config.distill_top_k > 0`` pass the client's :class:`BaseCache` as ``base_cache`` to
    keep the base's predictions across calls (a fresh one is used otherwise); with
    ``config.label_balance`` pass the client's :class:`LabelPrior`.
    """
    params = set_trainable(model, registry, block_ids)
    batch_list = list(batches)
    if not batch_list:
        raise FedbeError("no training batches")
    pulled = _output_projection_params(model, registry, block_ids) if config.identity_pull > 0 else []
    model.eval()
    for block_id in registry.check_ids(block_ids):
        new_block_module(model, registry, block_id).train()
    gating: AbstractContextManager[dict[int, torch.nn.Parameter]] = (
        block_gates(model, registry, block_ids) if config.block_gate else nullcontext({})
    )
    with gating as gates:
        result = train_parameters(
            model,
            params,
            batch_list,
            config,
            base=lambda: bypassed(model, registry),
            pulled=pulled,
            gates=list(gates.values()),
            on_step=on_step,
            should_stop=should_stop,
            base_cache=base_cache,
            block_ids=tuple(sorted(block_ids)),
            label_prior=label_prior,
        )
        result.gates = {block_id: float(gate.detach()) for block_id, gate in gates.items()}
    return result


@contextmanager
def block_gates(
    model: PreTrainedModel, registry: BlockRegistry, block_ids: Sequence[int]
) -> Iterator[dict[int, torch.nn.Parameter]]:
    """A scalar gate (starting at 1) per new block of ``block_ids`` on the outputs of its output
    projections, i.e. on everything the block adds to the residual stream.

    Yields ``{block id: gate}`` (fp32 scalars that require grad; give them to the optimizer). On exit,
    however it is left, the hooks go and each gate is folded into its block's output projections
    (``W <- g W``, ``b <- g b``), so the block computes what it computed gated and carries no gate.
    """
    arch = architecture_of(model)
    gates: dict[int, torch.nn.Parameter] = {}
    gated: list[tuple[torch.nn.Parameter, torch.nn.Module]] = []  # (gate, projection it scales)
    handles = []
    try:
        for block_id in registry.check_ids(block_ids):
            block = new_block_module(model, registry, block_id)
            device = next(block.parameters()).device
            gate = torch.nn.Parameter(torch.ones((), dtype=torch.float32, device=device))
            gates[block_id] = gate
            for path in arch.output_projections:
                projection = block.get_submodule(path)
                gated.append((gate, projection))
                handles.append(projection.register_forward_hook(_gate_hook(gate)))
        yield gates
    finally:
        for handle in handles:
            handle.remove()
        with torch.no_grad():
            for gate, projection in gated:
                for name in ("weight", "bias"):
                    tensor = getattr(projection, name, None)
                    if tensor is not None:
                        tensor.mul_(gate.detach().to(tensor.dtype))


def _gate_hook(gate: torch.nn.Parameter) -> Callable[..., torch.Tensor]:
    def hook(module: torch.nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        return output * gate.to(output.dtype)

    return hook


def train_parameters(
    model: PreTrainedModel,
    params: Sequence[torch.nn.Parameter],
    batches: Sequence[Batch],
    config: TrainConfig,
    *,
    base: Callable[[], AbstractContextManager[Any]] | None = None,
    pulled: Sequence[torch.nn.Parameter] = (),
    gates: Sequence[torch.nn.Parameter] = (),
    on_step: Callable[[int, float], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    base_cache: BaseCache | None = None,
    block_ids: tuple[int, ...] = (),
    label_prior: LabelPrior | None = None,
) -> TrainResult:
    """The optimisation loop behind :func:`train_blocks`, for any set of trainable ``params``.

    ``base`` is a context in which ``model`` computes the frozen base (new blocks bypassed, or a
    PEFT model's adapters disabled): self-distillation needs it. ``pulled`` are the parameters the
    identity pull acts on; ``gates`` are trained too, without weight decay and outside the gradient
    clipping. The caller sets train/eval modes and ``requires_grad``.
    """
    distill = config.distill_lambda > 0
    if config.label_balance and label_prior is None:
        raise FedbeError("label_balance needs the client's label counts (label_prior=LabelPrior(...))")
    prior = label_prior if config.label_balance else None
    if distill and base is None:
        raise FedbeError("self-distillation needs a way to run the base model (base=...)")
    if distill and config.distill_top_k and (base_cache is None or base_cache.top_k != config.distill_top_k):
        base_cache = BaseCache(config.distill_top_k)
    if not distill or not config.distill_top_k:
        base_cache = None
    groups: list[dict[str, Any]] = [{"params": list(params)}]
    if gates:
        groups.append({"params": list(gates), "weight_decay": 0.0})
    optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
    result = TrainResult(block_ids=block_ids)
    start = time.perf_counter()
    pool = None
    if distill and config.rehearsal_rows:
        assert base is not None
        width = max(b.input_ids.shape[1] for b in batches)
        if (
            base_cache is not None
            and base_cache.rehearsal is not None
            and base_cache.rehearsal.shape[1] >= width
        ):
            pool = base_cache.rehearsal
        else:
            pool = sample_rehearsal(model, base, batches, width)
            result.rehearsal_seconds = time.perf_counter() - start
            if base_cache is not None:
                base_cache.rehearsal = pool
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
            batch = batches[step % len(batches)]
            step_start = time.perf_counter()
            if distill:
                assert base is not None
                seen = batch if pool is None else with_rehearsal(batch, pool, step, config.rehearsal_rows)
                loss = _distill_step_loss(model, base, seen, config, base_cache, result, prior)
            else:
                loss = causal_lm_loss(model, batch, prior, config.balance_form)
                result.ce_losses.append(float(loss.detach()))
            if pulled:
                loss = loss + config.identity_pull * sum((p.float() ** 2).sum() for p in pulled)
            if not torch.isfinite(loss):
                raise FedbeError(
                    f"training loss became {loss.item()} at step {step}; lower the learning rate"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            result.step_seconds.append(time.perf_counter() - step_start)
            result.losses.append(float(loss.item()))
            result.samples += batch.size
            if on_step is not None:
                on_step(step, result.losses[-1])
    finally:
        model.eval()
        model.requires_grad_(False)
        result.wall_seconds = time.perf_counter() - start
    return result


def _distill_step_loss(
    model: PreTrainedModel,
    base: Callable[[], AbstractContextManager[Any]],
    batch: Batch,
    config: TrainConfig,
    cache: BaseCache | None,
    result: TrainResult,
    prior: LabelPrior | None = None,
) -> torch.Tensor:
    positions = distill_positions(batch)  # [rows, width-1]
    targets = batch.labels[:, 1:] != IGNORE_INDEX
    if not targets.any():
        raise FedbeError("a training batch has no target tokens (every label is ignored)")
    rows = sample_rows(batch.size, config.distill_rows)  # the rows distilled this step, or None = all
    if rows is not None:
        chosen = torch.zeros(batch.size, dtype=torch.bool)
        chosen[rows] = True
        positions = positions & chosen[:, None]
    order = sample_positions(positions, config.distill_sample)  # indices into mask order, or None
    sampled = positions if order is None else _mask_of(positions, order)
    base_logits = None
    missing = cache.missing(batch, rows) if cache is not None and positions.any() else []
    if missing:
        # the cache keeps every position of a row (filled once per example); the step uses its sample
        assert cache is not None
        part = rows_of(batch, missing)
        with torch.no_grad(), base():
            cache.fill(part, _forward_logits(model, part, _predicting(distill_positions(part))))
        result.base_forwards += 1
    elif cache is None and sampled.any():
        # the base runs only on the rows with a sampled position (rows with none add no logits)
        used = [r for r in range(batch.size) if bool(sampled[r].any())]
        with torch.no_grad(), base():
            base_logits = _forward_logits(model, rows_of(batch, used), _predicting(sampled[used]))
        result.base_forwards += 1
    kept = sampled | targets
    # one vocabulary projection and one log-softmax, only where a loss term looks
    logits = _forward_logits(model, batch, _predicting(kept)).float()
    logp = torch.log_softmax(logits, dim=-1)
    target_rows, distill_rows = targets[kept].to(logp.device), sampled[kept].to(logp.device)
    target_ids = batch.labels[:, 1:][targets].to(logp.device)
    if prior is None:
        ce = torch.nn.functional.nll_loss(logp[target_rows], target_ids)
    else:  # the balanced CE needs its own softmax, over the (few) target rows only
        ce = label_cross_entropy(logits[target_rows], target_ids, prior, config.balance_form)
    if not sampled.any():
        kl = logp.sum() * 0.0
    elif cache is None:
        assert base_logits is not None
        kl = _kl_full_logp(base_logits, logp[distill_rows])
    else:
        top_idx, top_logp = cache.targets(batch, rows)
        if order is not None:
            drawn = order.to(top_idx.device)
            top_idx, top_logp = top_idx[drawn], top_logp[drawn]
        kl = _kl_top_k_logp(top_idx.to(logp.device), top_logp.to(logp.device), logp[distill_rows])
    result.ce_losses.append(float(ce.detach()))
    result.distill_losses.append(float(kl.detach()))
    return ce + config.distill_lambda * kl


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
