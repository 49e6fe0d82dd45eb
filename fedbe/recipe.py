"""The training recipe: how a client trains its assigned blocks, declared once.

One frozen dataclass carries every training knob. The coordinator reads it from its config's
``training:`` section, every task carries it as one nested, versioned field, the edge client's
trainer runs it, and the benchmark builds one per method. Adding a knob means adding a field here
(with its bounds) and the code that uses it: the config loader, the wire codec and the validation
are all derived from :func:`dataclasses.fields` of :class:`Recipe`.

The loss a client minimises (:mod:`edge_client.loss`) is the paper's::

    loss = CE(target tokens, label-balanced)  +  distill_lambda * KL(p_base || p_model)

with the KL taken on positions that are not targets, against the frozen base (the same model with
every new block bypassed), from a cached top-``distill_top_k`` of the base's predictions.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, TypeGuard

from fedbe.errors import ConfigError

RECIPE_VERSION = 1  # the nested ``recipe`` field of a task; bumped when a field changes meaning


class RecipeError(ConfigError):
    """A recipe field is missing, of the wrong type or out of its range; ``name`` says which."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(message)
        self.name = name


def _int(low: int, doc: str) -> dict[str, Any]:
    return {"kind": "int", "low": low, "doc": doc}


def _real(interval: str, doc: str) -> dict[str, Any]:
    return {"kind": "real", "interval": interval, "doc": doc}


@dataclass(frozen=True)
class Recipe:
    """Every knob of local training. A field's ``metadata`` gives its kind, its bounds and its meaning."""

    steps: int = field(default=10, metadata=_int(1, "local optimizer steps per round"))
    lr: float = field(default=3e-4, metadata=_real("(0, 1]", "AdamW learning rate in round 1"))
    lr_decay: float = field(
        default=1.0, metadata=_real("(0, 1]", "round r trains at lr x lr_decay^(r-1); 1 keeps it constant")
    )
    batch_size: int = field(default=4, metadata=_int(1, "examples per step"))
    max_tokens: int = field(default=128, metadata=_int(8, "tokens per example (longer ones are cut)"))
    weight_decay: float = field(default=0.0, metadata=_real("[0, 1]", "AdamW weight decay"))
    max_grad_norm: float = field(default=1.0, metadata=_real("[0, inf)", "gradient clipping norm (0 = off)"))
    distill_lambda: tuple[float, ...] = field(
        default=(3.0,),
        metadata={"kind": "schedule", "interval": "[0, inf)",
                  "doc": "weight of the self-distillation KL; a list is one value per round, the last "
                         "holding after it; 0 = plain cross-entropy"},
    )  # fmt: skip
    distill_top_k: int = field(
        default=32, metadata=_int(0, "base predictions kept per position (cached); 0 = exact KL, no cache")
    )
    distill_sample: int = field(default=128, metadata=_int(0, "positions distilled per step (0 = all)"))
    distill_rows: int = field(default=1, metadata=_int(0, "rows of a batch distilled per step (0 = all)"))
    label_balance: bool = field(
        default=True,
        metadata={"kind": "bool", "doc": "balanced softmax over the label words with the client's own "
                                         "label frequencies (the task names the labels)"},
    )  # fmt: skip

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.metadata["kind"] == "schedule":  # a bare number is a one-round schedule; ints become floats
                value = tuple(value) if isinstance(value, list | tuple) else (value,)
                _check(f.name, value, f.metadata)
                object.__setattr__(self, f.name, tuple(float(v) for v in value))
            else:
                _check(f.name, value, f.metadata)

    def lr_in_round(self, round_: int) -> float:
        """The learning rate of round ``round_`` (1-based): ``lr x lr_decay^(round_-1)``."""
        return self.lr * self.lr_decay ** max(0, round_ - 1)

    def distill_lambda_in_round(self, round_: int) -> float:
        """Round ``round_``'s (1-based) distillation weight: its schedule entry, the last after the end."""
        return self.distill_lambda[min(max(round_, 1), len(self.distill_lambda)) - 1]

    def to_payload(self) -> dict[str, object]:
        """The recipe as plain data (for msgpack, JSON and YAML), with its version."""
        data: dict[str, object] = {"version": RECIPE_VERSION}
        for f in fields(self):
            value = getattr(self, f.name)
            data[f.name] = list(value) if isinstance(value, tuple) else value
        return data

    @classmethod
    def from_mapping(cls, data: Mapping[str, object], *, versioned: bool = False,
                     defaults: Recipe | None = None) -> Recipe:  # fmt: skip
        """A recipe from plain data: every field present (``defaults`` fills the missing ones), no
        unknown key; a scalar ``distill_lambda`` is a one-round schedule. Raises :class:`RecipeError`."""
        if not isinstance(data, Mapping):
            raise RecipeError("recipe", f"a recipe must be a mapping of its fields, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        given = dict(data)
        if versioned:
            version = given.pop("version", None)
            if version != RECIPE_VERSION:
                raise RecipeError("version", f"recipe version {version!r}; this fedbe reads version "
                                             f"{RECIPE_VERSION}: run the same fedbe version everywhere")  # fmt: skip
        unknown = sorted(str(k) for k in given if k not in known)
        if unknown:
            raise RecipeError(unknown[0], f"unknown recipe field(s) {unknown}; known: {', '.join(sorted(known))}")
        values: dict[str, Any] = {}
        for f in fields(cls):
            if f.name in given:
                values[f.name] = _coerce(f.name, given[f.name], f.metadata)
            elif defaults is not None:
                values[f.name] = getattr(defaults, f.name)
            else:
                raise RecipeError(f.name, f"recipe field {f.name!r} is missing")
        return cls(**values)


def parse_schedule(text: str, flag: str) -> tuple[float, ...]:
    """A command line's per-round schedule: ``"3"`` -> (3.0,), ``"3,3,12"`` -> (3.0, 3.0, 12.0), each value
    a finite number >= 0; :class:`RecipeError` naming ``flag`` otherwise."""
    try:
        values = tuple(float(x) for x in str(text).split(","))
    except ValueError:
        values = ()
    if not values or not all(math.isfinite(v) and v >= 0 for v in values):
        raise RecipeError(flag, f"{flag} must be a number >= 0 or comma-separated ones (one per round, the "
                                f"last holding after it, e.g. 3,3,12), got {text!r}")  # fmt: skip
    return values


def _coerce(name: str, value: object, meta: Mapping[str, Any]) -> object:
    if meta["kind"] == "schedule":
        return tuple(value) if isinstance(value, list | tuple) else (value,)
    if meta["kind"] == "real" and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def in_interval(value: float, interval: str) -> bool:
    """``value`` inside ``interval``, written like ``"(0, 1]"`` or ``"[0, inf)"``."""
    low, high = (float(part) for part in interval[1:-1].split(","))
    above = low < value or (interval[0] == "[" and value == low)
    below = value < high or (interval[-1] == "]" and value == high)
    return above and below


def is_real(value: object) -> TypeGuard[float]:
    """A finite int or float (not a bool)."""
    return not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)


def _check(name: str, value: object, meta: Mapping[str, Any]) -> None:
    kind = meta["kind"]
    if kind == "int":
        if not isinstance(value, int) or isinstance(value, bool) or value < meta["low"]:
            raise RecipeError(name, f"{name} must be a whole number >= {meta['low']}, got {value!r}")
    elif kind == "bool":
        if not isinstance(value, bool):
            raise RecipeError(name, f"{name} must be true or false, got {value!r}")
    elif kind == "real":
        if not is_real(value) or not in_interval(float(value), meta["interval"]):  # type: ignore[arg-type]
            raise RecipeError(name, f"{name} must be a number in {meta['interval']}, got {value!r}")
    elif kind == "schedule" and (
        not isinstance(value, tuple)
        or not value
        or not all(is_real(v) and in_interval(float(v), meta["interval"]) for v in value)
    ):
        raise RecipeError(name, f"{name} must be a number in {meta['interval']} or a non-empty list of them "
                                f"(one per round, the last holding after it), got {value!r}")  # fmt: skip


# plain cross-entropy with the trainer's own defaults: the device profiler's timing runs and ``fedbe demo``
PLAIN = Recipe(lr=2e-4, distill_lambda=(0.0,), distill_top_k=0, distill_sample=0, distill_rows=0, label_balance=False)
