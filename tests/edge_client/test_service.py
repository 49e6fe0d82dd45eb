"""``fedbe-edge run``'s settings: the label histogram a client announces."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

from edge_client.data import load_local_data
from edge_client.service import add_run_arguments, announced_histogram
from fedbe.errors import ConfigError

COUNTS = {"business": 120, "sport": 90, "tech": 60}


def _run_args(tmp_path: Path, *extra: str) -> argparse.Namespace:
    data = tmp_path / "local.jsonl"
    rows = [{"text": f"{label} story {i}", "label": label} for label, n in COUNTS.items() for i in range(n)]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    parser = argparse.ArgumentParser()
    add_run_arguments(parser)
    return parser.parse_args(
        ["--broker", "mqtt://127.0.0.1:1883", "--client-id", "c1", "--data", str(data), *extra]
    )


def test_the_noised_histogram_is_not_reproducible_from_the_seed(tmp_path: Path) -> None:
    """Two starts with identical settings (the default --seed 0, or an explicit one) announce
    different noise, and replaying numpy's generator for that seed does not give the announced
    counts: a known seed must not let anyone subtract the noise."""
    for seed_args in ((), ("--seed", "7")):
        args = _run_args(tmp_path, "--label-dp-epsilon", "1.0", *seed_args)
        first = announced_histogram(load_local_data(args.data), args.label_dp_epsilon)
        second = announced_histogram(load_local_data(args.data), args.label_dp_epsilon)
        assert list(first) == list(COUNTS) and first != second
        true = np.array(list(COUNTS.values()), dtype=float)
        replay = np.maximum(0.0, true + np.random.default_rng(args.seed).laplace(0.0, 1.0, size=len(true)))
        assert not np.allclose(np.array(list(first.values())), replay)
        assert not np.allclose(np.array(list(first.values())), true)


def test_without_epsilon_the_true_counts_are_announced(tmp_path: Path) -> None:
    args = _run_args(tmp_path)
    assert announced_histogram(load_local_data(args.data), args.label_dp_epsilon) == {
        k: float(v) for k, v in COUNTS.items()
    }


def test_label_dp_on_unlabelled_data_is_a_config_error(tmp_path: Path) -> None:
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"prompt": "hi", "response": "hello"}))
    assert announced_histogram(load_local_data(data), None) == {}
    with pytest.raises(ConfigError, match="labelled data only"):
        announced_histogram(load_local_data(data), 1.0)


def test_seed_help_no_longer_claims_the_noise() -> None:
    parser = argparse.ArgumentParser()
    add_run_arguments(parser)
    (seed,) = [a for a in parser._actions if a.dest == "seed"]
    assert seed.help is not None and "noise" not in seed.help
