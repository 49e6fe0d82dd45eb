"""A client's local data: loading, checking, encoding, label statistics and shards for simulation.

**Files.** ``.jsonl`` / ``.json`` (one JSON object per line; blank lines are skipped) or ``.csv``
(a header row, then one row per example; UTF-8, a byte-order mark is fine). Two kinds of rows:

* ``text`` + ``label`` — classification, posed as generation like BBC News
  (:class:`fedbe.datasets.Example`). ``label`` may be a string or an integer (read as text).
* ``prompt`` + ``response`` — instruction tuning (:class:`InstructionExample`); only the response
  tokens carry loss (:func:`encode_instruction`).

The kind is decided by each row's fields; a file that mixes kinds is an error. Other columns (ids,
sources, timestamps) are ignored — exports usually carry them — and named once in an INFO log.
A row is bad when it is not valid JSON / not an object, has neither pair of fields (or both), has
an empty or non-text field, or (CSV) has more or fewer cells than the header. Bad rows are
reported with their line numbers (the first :data:`MAX_REPORTED` and how many more).
``strict=True`` rejects a file with any bad row; ``strict=False`` (default) loads the good rows
and logs the bad ones as a WARNING. A file with no usable row is always a :class:`DataError`.

**Label histogram and privacy.** :func:`label_histogram` counts labels; :func:`noisy_histogram`
adds Laplace(1/epsilon) noise to every count (adding or removing one example changes one count
by one: sensitivity 1), clamped at zero — epsilon-differential privacy for the counts. The noise is
drawn from operating-system entropy on every call and takes no seed: noise that a known seed (such
as ``fedbe-edge run --seed``, default 0) regenerates would let anyone subtract it and read the true
counts. The set of labels itself is not protected unless the histogram is built over a public label
set (``label_histogram(examples, labels=...)``), which gives absent labels a (noised) zero.

**Shards.** :func:`dirichlet_split` is the usual non-IID split: for each label, client shares
drawn from Dirichlet(alpha); small alpha gives each client few labels, large alpha near-equal
mixes. :func:`write_bbc_client_shards` writes the BBC News train split as one JSONL per client.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import random
import secrets
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from fedbe.datasets import IGNORE_INDEX, Batch, Example, encode_example, make_batches
from fedbe.errors import ConfigError, DataError

log = logging.getLogger(__name__)

MAX_REPORTED = 20
CLASSIFICATION, INSTRUCTION = "classification", "instruction"
_FIELDS = {CLASSIFICATION: ("text", "label"), INSTRUCTION: ("prompt", "response")}
INSTRUCTION_TEMPLATE = "User: {prompt}\nAssistant:"
RESPONSE_TEMPLATE = " {response}"


@dataclass(frozen=True)
class InstructionExample:
    prompt: str
    response: str


LocalExample = Example | InstructionExample
T = TypeVar("T")


@dataclass(frozen=True)
class RowProblem:
    line: int
    reason: str


@dataclass(frozen=True)
class LocalData:
    path: Path
    kind: str  # classification | instruction
    examples: tuple[LocalExample, ...]
    problems: tuple[RowProblem, ...] = ()


def describe_problems(problems: Sequence[RowProblem], limit: int = MAX_REPORTED) -> str:
    shown = "; ".join(f"line {p.line}: {p.reason}" for p in problems[:limit])
    more = f"; and {len(problems) - limit} more" if len(problems) > limit else ""
    return shown + more


def load_local_data(path: str | Path, *, strict: bool = False) -> LocalData:
    """Read a client's examples from JSONL or CSV (see the module docstring for the rules)."""
    file = Path(path)
    suffix = file.suffix.lower()
    if suffix not in (".jsonl", ".json", ".csv"):
        raise DataError(
            f"{file}: unknown data format {suffix or '(no extension)'!r}; use .jsonl, .json or .csv"
        )
    try:
        text = file.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise DataError(f"{file}: data file not found") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{file}: not UTF-8 text ({exc}); re-save it as UTF-8") from None
    except OSError as exc:
        raise DataError(f"{file}: can not read: {exc}") from exc
    rows = _csv_rows(file, text) if suffix == ".csv" else _json_rows(file, text)
    kinds: dict[str, int] = {}
    extra: set[str] = set()
    good: list[tuple[str, LocalExample]] = []
    problems: list[RowProblem] = []
    for line, row in rows:
        if isinstance(row, str):
            problems.append(RowProblem(line, row))
            continue
        try:
            kind, example = _parse_row(row)
        except DataError as exc:
            problems.append(RowProblem(line, str(exc)))
            continue
        kinds.setdefault(kind, line)
        extra.update(set(row) - set(_FIELDS[kind]))
        good.append((kind, example))
    if len(kinds) > 1:
        where = ", ".join(f"{k} (first at line {n})" for k, n in kinds.items())
        raise DataError(f"{file}: mixes kinds of rows: {where}; put each kind in its own file")
    if extra:
        log.info("%s: ignoring columns %s", file, ", ".join(sorted(map(str, extra))))
    if not good:
        detail = f": {describe_problems(problems)}" if problems else " (the file is empty)"
        raise DataError(f"{file}: no usable examples{detail}")
    if problems:
        message = f"{file}: {len(problems)} bad row(s): {describe_problems(problems)}"
        if strict:
            raise DataError(message + "; fix them or load with strict=False to skip them")
        log.warning("%s; skipped, %d examples loaded", message, len(good))
    return LocalData(file, next(iter(kinds)), tuple(e for _, e in good), tuple(problems))


def _json_rows(file: Path, text: str) -> list[tuple[int, Mapping[str, Any] | str]]:
    if text.lstrip().startswith("["):
        raise DataError(f"{file}: is a JSON array; write one JSON object per line (JSON lines) instead")
    rows: list[tuple[int, Mapping[str, Any] | str]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            rows.append((number, f"invalid JSON ({exc.msg} at column {exc.colno})"))
            continue
        rows.append(
            (number, value if isinstance(value, dict) else f"expected a JSON object, got {_kind(value)}")
        )
    return rows


def _csv_rows(file: Path, text: str) -> list[tuple[int, Mapping[str, Any] | str]]:
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except StopIteration:
        return []
    except csv.Error as exc:
        raise DataError(f"{file}: line 1: unreadable CSV header: {exc}") from None
    header = [h.strip() for h in header]
    rows: list[tuple[int, Mapping[str, Any] | str]] = []
    start = reader.line_num + 1
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            rows.append((start, f"unreadable CSV: {exc}"))
            start = reader.line_num + 1
            continue
        if cells and any(c.strip() for c in cells):
            if len(cells) != len(header):
                rows.append((start, f"has {len(cells)} cells but the header has {len(header)}"))
            else:
                rows.append((start, dict(zip(header, cells, strict=True))))
        start = reader.line_num + 1
    return rows


def _parse_row(row: Mapping[str, Any]) -> tuple[str, LocalExample]:
    matches = [kind for kind, names in _FIELDS.items() if any(n in row for n in names)]
    if len(matches) != 1:
        found = ", ".join(sorted(map(str, row))) or "none"
        problem = "both" if matches else "neither"
        raise DataError(f"has {problem} of text+label and prompt+response (fields: {found})")
    kind = matches[0]
    values = [_field(row, name, allow_int=(name == "label")) for name in _FIELDS[kind]]
    if kind == CLASSIFICATION:
        return kind, Example(text=values[0], label=values[1])
    return kind, InstructionExample(prompt=values[0], response=values[1])


def _field(row: Mapping[str, Any], name: str, *, allow_int: bool = False) -> str:
    if name not in row:
        raise DataError(f"missing field {name!r}")
    value = row[name]
    if allow_int and isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise DataError(f"field {name!r} must be text, got {_kind(value)}")
    if not value.strip():
        raise DataError(f"field {name!r} is empty")
    return value.strip() if name == "label" else value


def _kind(value: object) -> str:
    return {dict: "an object", list: "a list", bool: "true/false", type(None): "null"}.get(
        type(value), f"{type(value).__name__} {value!r}"[:60]
    )


# --- encoding ----------------------------------------------------------------------------------------


def encode_instruction(
    tokenizer: Any, example: InstructionExample, max_tokens: int
) -> tuple[list[int], list[int]]:
    """Token ids and labels: the prompt (in :data:`INSTRUCTION_TEMPLATE`) masked, the response and
    an end-of-sequence token carrying loss. The response keeps at least half of ``max_tokens``; the
    prompt is cut from its start so its end (next to the response) survives."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    response = tokenizer(RESPONSE_TEMPLATE.format(response=example.response), add_special_tokens=False)
    prompt = tokenizer(INSTRUCTION_TEMPLATE.format(prompt=example.prompt), add_special_tokens=False)
    target = response["input_ids"][: max(1, max_tokens // 2) - len(eos)] + eos
    budget = max_tokens - len(target)
    if budget < 1:
        raise DataError(
            f"max_tokens={max_tokens} leaves no room for the prompt; use at least {len(target) + 8}"
        )
    body = prompt["input_ids"][-budget:]
    return body + target, [IGNORE_INDEX] * len(body) + target


def encode_local(tokenizer: Any, example: LocalExample, max_tokens: int) -> tuple[list[int], list[int]]:
    if isinstance(example, InstructionExample):
        return encode_instruction(tokenizer, example, max_tokens)
    return encode_example(tokenizer, example, max_tokens)


def make_local_batches(
    tokenizer: Any, examples: Sequence[LocalExample], batch_size: int, max_tokens: int
) -> list[Batch]:
    return make_batches(tokenizer, examples, batch_size, max_tokens, encode_local)


# --- statistics and splits ---------------------------------------------------------------------------


def label_histogram(examples: Sequence[Example], labels: Sequence[str] | None = None) -> dict[str, float]:
    """Examples per label (sorted by label); with ``labels``, exactly those keys (absent ones 0)."""
    if any(not isinstance(e, Example) for e in examples):
        raise DataError("a label histogram needs classification examples (text + label)")
    counts = Counter(e.label for e in examples)
    keys = sorted(counts) if labels is None else list(labels)
    unknown = set(counts) - set(keys)
    if unknown:
        raise DataError(f"labels {sorted(unknown)} are not in the given label set {list(keys)}")
    return {k: float(counts.get(k, 0)) for k in keys}


def noisy_histogram(hist: Mapping[str, float], epsilon: float) -> dict[str, float]:
    """Each count plus Laplace noise of scale 1/epsilon (sensitivity 1), clamped at 0.

    The noise comes from a generator seeded with 128 bits from :mod:`secrets` on each call, never
    from a caller's generator or seed: reproducible noise can be regenerated and subtracted."""
    if isinstance(epsilon, bool) or not isinstance(epsilon, int | float) or not (0 < epsilon < math.inf):
        raise ConfigError(f"privacy epsilon must be a finite number > 0, got {epsilon!r}")
    rng = np.random.Generator(np.random.PCG64(secrets.randbits(128)))
    noise = rng.laplace(0.0, 1.0 / epsilon, size=len(hist))
    return {k: max(0.0, float(v) + float(n)) for (k, v), n in zip(hist.items(), noise, strict=True)}


def split_local(examples: Sequence[T], eval_fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """(train, held-out) for federated evaluation; deterministic for a seed, both non-empty when
    ``eval_fraction > 0`` and there are at least two examples."""
    if not 0 <= eval_fraction < 1:
        raise ConfigError(f"eval_fraction must be in [0, 1), got {eval_fraction!r}")
    order = list(examples)
    random.Random(seed).shuffle(order)
    n_eval = round(len(order) * eval_fraction)
    if eval_fraction > 0 and len(order) >= 2:
        n_eval = min(max(n_eval, 1), len(order) - 1)
    return order[n_eval:], order[:n_eval]


def dirichlet_split(
    labels: Sequence[str], n_clients: int, alpha: float, rng: np.random.Generator
) -> list[list[int]]:
    """Indices of ``labels`` per client: each label's examples shared out by Dirichlet(alpha)
    proportions. Every index goes to exactly one client; every client gets at least one."""
    if isinstance(n_clients, bool) or not isinstance(n_clients, int) or n_clients < 1:
        raise ConfigError(f"number of clients must be a whole number >= 1, got {n_clients!r}")
    if not (isinstance(alpha, int | float) and 0 < alpha < math.inf):
        raise ConfigError(f"Dirichlet alpha must be a finite number > 0, got {alpha!r}")
    if len(labels) < n_clients:
        raise ConfigError(f"{len(labels)} examples can not give each of {n_clients} clients one")
    shards: list[list[int]] = [[] for _ in range(n_clients)]
    for label in sorted(set(labels)):
        members = [i for i, lab in enumerate(labels) if lab == label]
        rng.shuffle(members)
        shares = rng.dirichlet([alpha] * n_clients)
        cuts = np.floor(np.cumsum(shares) * len(members)).astype(int)[:-1]
        for client, part in enumerate(np.split(np.asarray(members), cuts)):
            shards[client].extend(int(i) for i in part)
    for client in range(n_clients):  # give every empty client one example from the largest shard
        if not shards[client]:
            donor = max(range(n_clients), key=lambda c: len(shards[c]))
            shards[client].append(shards[donor].pop(int(rng.integers(len(shards[donor])))))
    return [sorted(s) for s in shards]


def write_bbc_client_shards(
    out_dir: str | Path, n_clients: int, alpha: float, seed: int, examples: Sequence[Any] | None = None
) -> list[Path]:
    """Dirichlet(alpha) split of the BBC News train split into ``client-NN.jsonl`` files; ``examples``:
    the corpus as :func:`fedbe.datasets.load_bbc_news` returns it, if the caller has read it already."""
    from fedbe.datasets import load_bbc_news, split_train_test  # noqa: PLC0415 - reads the corpus

    train, _ = split_train_test(load_bbc_news() if examples is None else examples)
    shards = dirichlet_split([e.label for e in train], n_clients, alpha, np.random.default_rng(seed))
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for client, indices in enumerate(shards):
        path = folder / f"client-{client:02d}.jsonl"
        with path.open("w", encoding="utf-8") as handle:
            for i in indices:
                handle.write(json.dumps({"text": train[i].text, "label": train[i].label}) + "\n")
        paths.append(path)
    log.info("wrote %d BBC News shards (alpha %g) to %s", n_clients, alpha, folder)
    return paths
