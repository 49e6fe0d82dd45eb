"""General-ability probes: does the model still know what it knew before fine-tuning?

Two probes on text that installs offline and is never used for training:

* **Definition choice** (WordNet nouns, Debian ``wordnet-base``): for a noun, pick its dictionary
  definition among four (the other three are definitions of other nouns). Each option is scored by
  the mean log-probability of its tokens after ``The word "<noun>" means``; chance is 25%.
* **General perplexity** (Debian ``fortunes``: quotations and sayings in prose categories): the
  exponential of the mean next-token loss over every token of a fixed set of quotations.

Both have a fixed, hash-based split into ``validation`` and ``test`` halves: choose settings on
validation, report on test. Retention = accuracy after / before, and perplexity before / after.
"""

from __future__ import annotations

import hashlib
import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from fedbe.datasets import pad_id
from fedbe.errors import DataError
from fedbe.progress_bar import progress

WORDNET_NOUNS = Path("/usr/share/wordnet/data.noun")
FORTUNES_DIR = Path("/usr/share/games/fortunes")
# Prose categories (no ASCII art, no offensive sub-folder, no computer jargon).
FORTUNE_CATEGORIES = ("wisdom", "literature", "people", "science", "education", "work", "love", "law")
SPLITS = ("validation", "test")
PROMPT = 'The word "{word}" means'
_WORD = re.compile(r"^[a-z]{4,12}$")


@dataclass(frozen=True)
class DefinitionQuestion:
    word: str
    options: tuple[str, ...]
    answer: int


def _in_split(key: str, split: str) -> bool:
    if split not in SPLITS:
        raise DataError(f"probe split must be one of {SPLITS}, got {split!r}")
    first = hashlib.sha256(key.encode("utf-8")).digest()[0]
    return (first < 128) == (split == "validation")


@lru_cache(maxsize=1)
def _wordnet_definitions() -> tuple[tuple[str, str], ...]:
    if not WORDNET_NOUNS.is_file():
        raise DataError(
            f"{WORDNET_NOUNS} is missing: install Debian's wordnet-base (scripts/setup.sh does this)"
        )
    seen: set[str] = set()
    pairs: list[tuple[str, str]] = []
    for line in WORDNET_NOUNS.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.startswith(" ") or "|" not in line:
            continue  # licence header
        fields, gloss = line.split("|", 1)
        parts = fields.split()
        if len(parts) < 5:
            continue
        word = parts[4]
        definition = gloss.split(";")[0].strip()
        if not _WORD.match(word) or word in seen or not 15 <= len(definition) <= 80 or '"' in definition:
            continue
        seen.add(word)
        pairs.append((word, definition))
    return tuple(pairs)


def definition_questions(
    n: int, split: str = "test", seed: int = 0, exclude: Sequence[DefinitionQuestion] = ()
) -> list[DefinitionQuestion]:
    """``n`` four-way definition questions from ``split``, the same for the same arguments.

    With ``exclude``, none of the ``n`` asks for the word of a question there (a second, disjoint set
    of the same split and seed: the bench's final probe); their distractors come from the whole split.
    """
    pool = [p for p in _wordnet_definitions() if _in_split(p[0], split)]
    taken = {q.word for q in exclude}
    candidates = [p for p in pool if p[0] not in taken]
    if len(candidates) < n or len(pool) < n + 3:
        raise DataError(
            f"only {len(candidates)} WordNet nouns in the {split} split"
            + (f" beyond the {len(taken)} already asked" if taken else "")
            + "; ask for fewer questions"
        )
    rng = random.Random(f"definitions-{split}-{seed}" + (f"-beyond-{len(taken)}" if taken else ""))
    chosen = rng.sample(candidates, n)
    questions = []
    for word, definition in chosen:
        distractors: list[str] = []
        while len(distractors) < 3:
            other_word, other = pool[rng.randrange(len(pool))]
            if other_word != word and other != definition and other not in distractors:
                distractors.append(other)
        answer = rng.randrange(4)
        options = distractors[:answer] + [definition] + distractors[answer:]
        questions.append(DefinitionQuestion(word, tuple(options), answer))
    return questions


@lru_cache(maxsize=1)
def _fortunes() -> tuple[str, ...]:
    quotes: list[str] = []
    for category in FORTUNE_CATEGORIES:
        path = FORTUNES_DIR / category
        if not path.is_file():
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        for raw in text.split("\n%\n"):
            quote = " ".join(raw.replace("%", " ").split())
            if 40 <= len(quote) <= 600:
                quotes.append(quote)
    if not quotes:
        raise DataError(
            f"no quotations under {FORTUNES_DIR}: install Debian's fortunes (scripts/setup.sh does this)"
        )
    return tuple(sorted(set(quotes), key=lambda q: hashlib.sha256(q.encode("utf-8")).digest()))


def general_texts(n: int, split: str = "test") -> list[str]:
    """The first ``n`` quotations of ``split`` in a fixed (hash) order."""
    pool = [q for q in _fortunes() if _in_split(q, split)]
    if len(pool) < n:
        raise DataError(f"only {len(pool)} quotations in the {split} split; ask for fewer")
    return pool[:n]


def _encode(tokenizer: Any, text: str) -> list[int]:
    ids: list[int] = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids


def _token_logprobs(
    model: PreTrainedModel, rows: Sequence[list[int]], pad: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each next token ``[rows, width-1]`` and its validity mask."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    device = next(model.parameters()).device
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
    logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1).cpu()
    picked = logprobs.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return picked, mask[:, 1:].bool()


@torch.no_grad()
def definition_answers(
    model: PreTrainedModel, tokenizer: Any, questions: Sequence[DefinitionQuestion], batch_size: int = 16
) -> list[bool]:
    """For each of ``questions``: does its right definition have the highest mean token log-probability?"""
    if not questions:
        return []
    model.eval()
    pad = pad_id(tokenizer)
    rows: list[list[int]] = []
    starts: list[int] = []
    for q in questions:
        prompt = _encode(tokenizer, PROMPT.format(word=q.word))
        for option in q.options:
            rows.append(prompt + _encode(tokenizer, " " + option + "."))
            starts.append(len(prompt))
    scores = torch.empty(len(rows))
    for begin in progress(range(0, len(rows), batch_size), "probing definitions", "batches"):
        chunk = rows[begin : begin + batch_size]
        picked, mask = _token_logprobs(model, chunk, pad)
        for i in range(len(chunk)):
            # positions >= start-1 predict the option's tokens
            option_mask = mask[i].clone()
            option_mask[: starts[begin + i] - 1] = False
            scores[begin + i] = (picked[i] * option_mask).sum() / option_mask.sum().clamp(min=1)
    chosen = scores.view(len(questions), -1).argmax(dim=1)
    truth = torch.tensor([q.answer for q in questions])
    return [bool(x) for x in (chosen == truth).tolist()]


def definition_accuracy(
    model: PreTrainedModel, tokenizer: Any, questions: Sequence[DefinitionQuestion], batch_size: int = 16
) -> float:
    """Fraction of ``questions`` whose right definition has the highest mean token log-probability."""
    return _fraction_right(definition_answers(model, tokenizer, questions, batch_size))


def _fraction_right(answers: Sequence[bool]) -> float:
    return sum(answers) / len(answers) if answers else float("nan")


def answer_string(answers: Sequence[bool]) -> str:
    """Per-question answers as a compact record: ``"1"`` right, ``"0"`` wrong, in question order."""
    return "".join("1" if a else "0" for a in answers)


def answer_changes(before: str, after: str) -> tuple[int, int]:
    """``(lost, gained)``: questions right in ``before`` and wrong in ``after``, and the reverse
    (both :func:`answer_string` records of the same questions)."""
    if len(before) != len(after) or set(before + after) - {"0", "1"}:
        raise ValueError(
            f"answer records must be strings of 0/1 over the same questions, got lengths {len(before)} "
            f"and {len(after)}"
        )
    lost = sum(1 for b, a in zip(before, after, strict=True) if b == "1" and a == "0")
    gained = sum(1 for b, a in zip(before, after, strict=True) if b == "0" and a == "1")
    return lost, gained


def mcnemar_p(lost: int, gained: int) -> float:
    """Exact two-sided McNemar p-value of ``lost`` against ``gained`` changed answers: how likely a
    split at least this uneven is when a changed answer is as likely lost as gained (1.0 for none)."""
    if lost < 0 or gained < 0:
        raise ValueError(f"counts must be >= 0, got {lost} and {gained}")
    n = lost + gained
    if n == 0:
        return 1.0
    k = min(lost, gained)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


@torch.no_grad()
def perplexity(
    model: PreTrainedModel, tokenizer: Any, texts: Sequence[str], max_tokens: int = 128, batch_size: int = 8
) -> float:
    """exp(mean next-token loss) over every token of ``texts`` (each cut to ``max_tokens``); NaN for none."""
    if not texts:
        return float("nan")
    return perplexities(model, tokenizer, texts, (len(texts),), max_tokens, batch_size)[0]


@torch.no_grad()
def perplexities(
    model: PreTrainedModel,
    tokenizer: Any,
    texts: Sequence[str],
    heads: Sequence[int],
    max_tokens: int = 128,
    batch_size: int = 8,
) -> list[float]:
    """:func:`perplexity` over the first ``n`` of ``texts`` for each ``n`` in ``heads``, from one pass."""
    if any(not 0 < n <= len(texts) for n in heads):
        raise ValueError(f"every head must be in 1..{len(texts)}, got {list(heads)}")
    model.eval()
    pad = pad_id(tokenizer)
    rows = [_encode(tokenizer, t)[:max_tokens] for t in texts[: max(heads, default=0)]]
    nll = [0.0] * len(rows)  # summed next-token loss of each text (0 for a text under 2 tokens)
    counts = [max(len(r) - 1, 0) for r in rows]
    scored = [i for i, r in enumerate(rows) if len(r) >= 2]
    for begin in progress(range(0, len(scored), batch_size), "probing perplexity", "batches"):
        chunk = scored[begin : begin + batch_size]
        picked, mask = _token_logprobs(model, [rows[i] for i in chunk], pad)
        for j, i in enumerate(chunk):
            nll[i] = -float((picked[j] * mask[j]).sum())
    out = []
    for n in heads:
        count = sum(counts[:n])
        out.append(math.exp(sum(nll[:n]) / count) if count else float("nan"))
    return out


@dataclass(frozen=True)
class GeneralProbe:
    """A fixed probe set: build once, score any model with :meth:`score`.

    ``head`` (0 = none): also report the perplexity of the first ``head`` texts as
    ``perplexity_head``, so a run on a larger probe can be compared with runs on the smaller one
    (the first ``n`` texts of a split are the same for every ``n``)."""

    questions: tuple[DefinitionQuestion, ...]
    texts: tuple[str, ...]
    split: str
    head: int = 0

    @classmethod
    def build(
        cls, questions: int = 100, texts: int = 48, split: str = "test", seed: int = 0, head: int = 0
    ) -> GeneralProbe:
        return cls(
            tuple(definition_questions(questions, split, seed)),
            tuple(general_texts(texts, split)),
            split,
            head if 0 < head < texts else 0,
        )

    def score(self, model: PreTrainedModel, tokenizer: Any) -> dict[str, float]:
        return self.score_with_answers(model, tokenizer)[0]

    def score_with_answers(self, model: PreTrainedModel, tokenizer: Any) -> tuple[dict[str, float], str]:
        """:meth:`score` and the per-question answers (:func:`answer_string`), from one pass."""
        heads = (len(self.texts), self.head) if self.head else (len(self.texts),)
        ppl = perplexities(model, tokenizer, self.texts, heads)
        answers = definition_answers(model, tokenizer, self.questions)
        scores = {
            "definition_accuracy": _fraction_right(answers),
            "perplexity": ppl[0],
        }
        if self.head:
            scores["perplexity_head"] = ppl[1]
        return scores, answer_string(answers)


def retention(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Definition accuracy after/before and perplexity before/after (1.0 = nothing forgotten)."""
    return {
        "definition_retention": after["definition_accuracy"] / before["definition_accuracy"]
        if before["definition_accuracy"]
        else float("nan"),
        "perplexity_retention": before["perplexity"] / after["perplexity"],
    } | (
        {"perplexity_head_retention": before["perplexity_head"] / after["perplexity_head"]}
        if "perplexity_head" in before and "perplexity_head" in after
        else {}
    )
