"""benchmarks/step_cost.py on a tiny model: every configuration timed, each against FedIT's step."""

from __future__ import annotations

import re

import pytest

from tests.conftest import load_benchmark


def test_every_configuration_is_timed_against_fedit(capsys: pytest.CaptureFixture[str]) -> None:
    load_benchmark("step_cost").main(
        ["--model", "tiny:llama", "--blocks", "0", "--blocks", "0,1", "--steps", "2"]
    )
    out = capsys.readouterr().out
    table = out.split("median s/step")[1]
    rows = re.findall(r"^  (.+?)\s+(\d+\.\d+) s\s+(\d+\.\d+)x fedit$", table, flags=re.M)
    # FedIT plain + FedIT-distill x 2 passes, then per block set: plain + 2 distilled configs x 2 passes
    assert len(rows) == 3 + 2 * 5
    assert rows[0][0] == "fedit, plain CE" and rows[0][2] == "1.00"
    assert any(label.startswith("fedbe blocks 0,1, distilled 1 row(s), second pass") for label, _, _ in rows)
    for _, seconds, ratio in rows:
        assert float(seconds) > 0
        assert float(ratio) == pytest.approx(float(seconds) / float(rows[0][1]), rel=0.03, abs=0.01)
    # a first pass with every row distilled runs the base on each batch; the second pass on none
    assert re.search(
        r"fedbe blocks 0, distilled every row, first pass \(cache fills\): .* base forwards 2", out
    )
    assert re.search(r"fedbe blocks 0, distilled every row, second pass: .* base forwards 0", out)


@pytest.mark.parametrize("bad", [["--blocks", "x"], ["--blocks", "-1"], ["--steps", "0"]])
def test_bad_flags_are_refused(bad: list[str]) -> None:
    with pytest.raises(SystemExit):
        load_benchmark("step_cost").main(["--model", "tiny:llama", *bad])


def test_unknown_blocks_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        load_benchmark("step_cost").main(["--model", "tiny:llama", "--blocks", "99", "--steps", "1"])
    assert "new blocks are" in capsys.readouterr().err
