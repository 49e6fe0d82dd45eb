"""The command-line entry points: help, errors with exit codes, and real runs on small inputs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from fedbe import sources
from fedbe.expansion import registry_of
from fedbe_sim import cli


@pytest.mark.parametrize("module", ["fedbe_sim.cli", "edge_client.cli", "coordinator.cli"])
def test_help_explains_itself(module: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0
    assert "fedbe" in out.stdout and len(out.stdout) > 200


def test_expand_writes_a_plain_transformers_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "expanded"
    assert (
        cli.main(
            ["expand", "--model", "tiny:qwen2", "--blocks", "2", "--placement", "top", "--out", str(out)]
        )
        == 0
    )
    summary = json.loads(capsys.readouterr().out)
    assert summary["layers"] == 6 and summary["new_layer_indices"] == [4, 5]
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert model.config.num_hidden_layers == 6
    assert registry_of(model).new_layer_indices == (4, 5)
    base = sources.build_tiny_model("qwen2")
    ids = torch.randint(0, 512, (1, 24))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base(ids).logits)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--blocks", "5"], "choose 1..4"),
        (["--placement", "1,1"], "repeats layer"),
        (["--placement", "0,9"], "out of range"),
        (["--placement", "top,1"], "invalid placement"),
        (["--blocks", "3", "--placement", "0,1"], "disagrees"),
    ],
)
def test_expand_rejects_bad_requests_with_a_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    out = tmp_path / "x"
    assert cli.main(["expand", "--model", "tiny:llama", "--out", str(out), *argv]) == 1
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_expand_refuses_to_overwrite_a_non_empty_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "keep.txt").write_text("mine")
    assert cli.main(["expand", "--model", "tiny:llama", "--blocks", "1", "--out", str(tmp_path)]) == 1
    assert "not empty" in capsys.readouterr().err
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_bad_numbers_are_rejected_by_the_parser(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["expand", "--model", "tiny:llama", "--blocks", "0", "--out", "x"])
    assert exc.value.code == 2
    assert "must be at least 1" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_runs_end_to_end_on_smollm2(tmp_path: Path) -> None:
    result = tmp_path / "demo.json"
    code = cli.main(
        [
            "demo",
            "--steps",
            "3",
            "--batch-size",
            "2",
            "--max-tokens",
            "64",
            "--eval-examples",
            "4",
            "--json",
            str(result),
        ]
    )
    assert code == 0
    summary = json.loads(result.read_text())
    assert summary["precision"] == "nf4"
    assert len(summary["losses"]) == 3 and all(loss > 0 for loss in summary["losses"])
    assert 0.0 <= summary["accuracy_before"] <= 1.0 and 0.0 <= summary["accuracy_after"] <= 1.0
