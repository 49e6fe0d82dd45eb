"""BBC News loading, the fixed split, and encoding classification as generation."""

from __future__ import annotations

from collections import Counter

import pytest

from fedbe import datasets
from fedbe.datasets import IGNORE_INDEX, Example
from fedbe.errors import DataError


@pytest.fixture(scope="module")
def bbc() -> list[Example]:
    return datasets.load_bbc_news()


def test_bbc_is_deduplicated_with_five_balanced_classes(bbc: list[Example]) -> None:
    texts = [e.text for e in bbc]
    assert len(texts) == len(set(texts))
    # 2,225 articles minus at least the 98 exact duplicates the corpus holds (load_bbc_news drops them)
    assert 2000 < len(bbc) <= 2225 - 98
    counts = Counter(e.label for e in bbc)
    assert sorted(counts) == ["business", "entertainment", "politics", "sports", "tech"]
    assert min(counts.values()) > 300


def test_split_is_disjoint_fixed_and_about_twenty_percent(bbc: list[Example]) -> None:
    train, test = datasets.split_train_test(bbc)
    assert not {e.text for e in train} & {e.text for e in test}
    assert len(train) + len(test) == len(bbc)
    assert 0.17 < len(test) / len(bbc) < 0.23
    # independent of order: shuffling the input changes nothing
    train2, test2 = datasets.split_train_test(list(reversed(bbc)))
    assert sorted(e.text for e in test2) == sorted(e.text for e in test)
    assert {e.label for e in test} == {e.label for e in train}


class _CharTokenizer:
    """One token per character (ids = code points), enough to check the encoding arithmetic."""

    pad_token_id = 0
    eos_token_id = 0

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": [ord(c) for c in text]}


def test_encode_example_masks_everything_but_the_target_and_truncates_the_article() -> None:
    tok = _CharTokenizer()
    ids, labels = datasets.encode_example(tok, Example("abcdefghij" * 10, "tech"), max_tokens=30)
    assert len(ids) == 30
    target = [ord(c) for c in " tech"]
    assert ids[-len(target) :] == target
    assert labels[-len(target) :] == target
    assert all(x == IGNORE_INDEX for x in labels[: -len(target)])
    assert "".join(chr(i) for i in ids).endswith("\nTopic: tech")


def test_encode_example_rejects_a_budget_with_no_room_for_the_article() -> None:
    with pytest.raises(DataError, match="max_tokens"):
        datasets.encode_example(_CharTokenizer(), Example("text", "entertainment"), max_tokens=10)


def test_collate_right_pads() -> None:
    batch = datasets.collate([([1, 2, 3], [-100, 2, 3]), ([4], [4])], pad_id=0)
    assert batch.input_ids.tolist() == [[1, 2, 3], [4, 0, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch.labels.tolist() == [[-100, 2, 3], [4, -100, -100]]
