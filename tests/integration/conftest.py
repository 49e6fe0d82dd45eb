"""Fixtures for tests that run real processes against a real mosquitto on a loopback port."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedbe.broker import MosquittoBroker, find_mosquitto

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def broker() -> Iterator[MosquittoBroker]:
    if find_mosquitto() is None:
        pytest.skip("mosquitto is not installed (scripts/setup.sh installs it)")
    with MosquittoBroker() as b:
        yield b


def tiny_client_data(path: Path, labels: list[str], n: int, seed: int) -> Path:
    """A small labelled JSONL file: each label's texts share a word, so they are learnable."""
    import random  # noqa: PLC0415

    rng = random.Random(seed)
    words = {label: f"{label}word" for label in labels}
    with path.open("w") as f:
        for i in range(n):
            label = labels[i % len(labels)] if len(labels) > 1 else labels[0]
            filler = " ".join(rng.choice(["alpha", "beta", "gamma", "delta"]) for _ in range(6))
            f.write(json.dumps({"text": f"{filler} {words[label]} {filler}", "label": label}) + "\n")
    return path


def spawn(args: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    log_file = log_path.open("wb")
    return subprocess.Popen([sys.executable, "-m", *args], cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT,
                            env=env)  # fmt: skip
