"""benchmarks/client_diagnosis.py on a tiny model: one line per client's local model, one for the average."""

from __future__ import annotations

import pytest

import edge_client.trainer as trainer
from tests.conftest import load_benchmark


def test_every_client_and_the_global_model_are_scored(capsys: pytest.CaptureFixture[str]) -> None:
    real = trainer.train_blocks
    load_benchmark("client_diagnosis").main(["--model", "tiny:llama", "--method", "fedbe", "--rounds", "1"])
    # the scoring wrapper is gone afterwards: left in place, it scored every later training call in
    # the process (the test suite's SmolLM2 demo took 272 s instead of 10)
    assert trainer.train_blocks is real
    out = capsys.readouterr().out
    # the bench's default federation has 4 clients; each trains in round 1 (FedBE: at least one block)
    assert out.count("a client's local model: accuracy") == 4
    assert out.count("global model: accuracy") == 1
    assert "round 1: client-00" in out


def test_bad_rounds_are_refused() -> None:
    with pytest.raises(SystemExit):
        load_benchmark("client_diagnosis").main(["--model", "tiny:llama", "--rounds", "0"])
