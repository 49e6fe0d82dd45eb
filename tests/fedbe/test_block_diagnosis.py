"""benchmarks/block_diagnosis.py on a tiny model: each block bypassed, and the blocks scaled back to the base."""

from __future__ import annotations

import json

import pytest

from tests.conftest import load_benchmark


def test_every_block_is_bypassed_and_scale_zero_is_the_base(
    tmp_path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "diag.json"
    scores = load_benchmark("block_diagnosis").main(
        ["--model", "tiny:llama", "--rounds", "1", "--scales", "1,0", "--out", str(out)]
    )
    printed = capsys.readouterr().out
    assert "round 1: client-00" in printed
    bypassed = [k for k in scores if k.startswith("without block")]
    assert len(bypassed) >= 2 and printed.count("without block") == len(bypassed)
    # s = 1 is the trained model, s = 0 exactly the untrained expansion (= the base)
    assert scores["blocks scaled to 1"] == pytest.approx(scores["as trained"], rel=1e-5)
    base = json.loads(out.read_text())["before"]
    assert scores["blocks scaled to 0"]["perplexity"] == pytest.approx(base["perplexity"], rel=1e-5)
    assert scores["blocks scaled to 0"]["perplexity_retention"] == pytest.approx(1.0, rel=1e-5)
    # ... which answers every definition question as before training
    back = scores["blocks scaled to 0"]
    assert (back["definitions_lost"], back["definitions_gained"]) == (0, 0)
    assert len(base["definition_answers"]) > 0 and "(-0 +0 questions)" in printed
    # training moved the model, so the trained model is not the base
    assert scores["as trained"]["perplexity"] != pytest.approx(base["perplexity"], rel=1e-5)


@pytest.mark.parametrize("scales", ["1.5", "a,b", ""])
def test_bad_scales_are_refused(scales: str) -> None:
    with pytest.raises(SystemExit):
        load_benchmark("block_diagnosis").main(["--model", "tiny:llama", "--scales", scales])
