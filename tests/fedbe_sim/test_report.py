"""Report and progress lines from metrics records: summaries, table, plots, observer lines."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from fedbe import protocol
from fedbe.compression import Level, compress_state
from fedbe.protocol import ClientTopic, Topics
from fedbe_sim.progress import FederationView
from fedbe_sim.report import (
    allocation_grid,
    final_line,
    markdown,
    read_metrics,
    round_line,
    summarize,
    write_plots,
)


def _round(n: int, accuracy: float, **extra: Any) -> dict[str, Any]:
    return {
        "round": n,
        "assignments": {"a": [0, 1], "b": [1], "c": []},
        "updates": {
            "a": {"blocks": [0, 1], "loss": 2.0, "steps": 4},
            "b": {"blocks": [1], "loss": 4.0, "steps": 4},
        },
        "bytes_up": {"a": 1_000_000, "b": 500_000},
        "bytes_down": {"a": 4_000_000, "b": 2_000_000},
        "blocks": {"0": {}, "1": {}, "2": {}},
        "seconds": 40.0,
        "server_evaluation": {
            "accuracy": accuracy,
            "examples": 40,
            "probes": {"definition_accuracy": 0.45, "perplexity": 22.0},
            "retention": {"definition_retention": 0.9, "perplexity_retention": 0.95},
        },
        **extra,
    }


BASELINE = {
    "round": 0,
    "assignments": {},
    "updates": {},
    "bytes_up": {},
    "bytes_down": {},
    "seconds": 12.0,
    "server_evaluation": {
        "accuracy": 0.3,
        "examples": 40,
        "probes": {"definition_accuracy": 0.5, "perplexity": 20.9},
    },
}


def test_summaries_add_up_bytes_average_losses_and_keep_the_last_copy_of_a_round() -> None:
    rounds = summarize([BASELINE, _round(1, 0.5), _round(2, 0.6), _round(2, 0.7)])
    assert [r.round for r in rounds] == [0, 1, 2]
    base, first, last = rounds
    assert base.accuracy == 0.3 and base.definition_retention is None and base.bytes_up == 0
    assert first.bytes_up == 1_500_000 and first.bytes_down == 6_000_000
    assert first.mean_loss == 3.0 and first.updates == 2
    assert last.accuracy == 0.7  # the re-run of round 2 (after a crash) wins
    assert first.definition_retention == 0.9 and first.perplexity_retention == 0.95
    assert first.blocks == (0, 1, 2)
    assert allocation_grid(first, ["a", "b", "c"], [0, 1, 2]) == [[2, 2, 0], [0, 2, 0], [0, 0, 0]]


def test_an_assigned_block_without_an_accepted_update_is_marked_apart() -> None:
    record = _round(1, 0.5)
    del record["updates"]["b"]  # b was assigned block 1 but its update was rejected
    (r,) = summarize([record])
    assert allocation_grid(r, ["a", "b"], [0, 1]) == [[2, 2], [0, 1]]
    assert r.mean_loss == 2.0


def test_lines_and_markdown_report_name_the_figures() -> None:
    rounds = summarize([BASELINE, _round(1, 0.55), _round(2, 0.8)])
    assert "zero-shot accuracy 0.300" in round_line(rounds[0])
    line = round_line(rounds[2], 2)
    assert line.startswith("round 2/2 closed: 2 updates, mean loss 3.000, accuracy 0.800")
    assert "retention: definitions 0.900, perplexity 0.950" in line and "1.5 MB up, 6.0 MB down" in line
    assert final_line(rounds).startswith("after round 2: accuracy 0.800 (base model zero-shot 0.300)")
    text = markdown(rounds, {"model": "tiny"}, ["a.png"])
    rows = [row for row in text.splitlines() if row.startswith("| ") and row[2].isdigit()]
    assert [row.split("|")[1].strip() for row in rows] == ["0", "1", "2"]
    assert "a [0,1]; b [1]; c -" in rows[1] and "![a](a.png)" in text


def test_missing_values_are_shown_as_missing_not_as_zero() -> None:
    record = _round(1, 0.5)
    record["server_evaluation"] = None
    (r,) = summarize([record])
    assert r.accuracy is None and "accuracy n/a" in round_line(r)


def test_plots_are_written_as_png(tmp_path: Path) -> None:
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(
        "\n".join(json.dumps(r) for r in [BASELINE, _round(1, 0.5), _round(2, 0.6)]) + "\n{cut"
    )
    rounds = summarize(read_metrics(metrics))  # a line cut off mid-write is skipped
    assert len(rounds) == 3
    paths = write_plots(rounds, tmp_path)
    assert [p.name for p in paths] == ["accuracy_retention.png", "allocation.png", "bytes.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000


def test_the_observer_view_counts_clients_done_per_round() -> None:
    topics = Topics("sim")
    view = FederationView(topics, rounds=3)

    def status(cid: str, state: str, round_: int, detail: str = "") -> str | None:
        msg = protocol.encode(protocol.StatusMessage(cid, state, round_, detail))
        return view.on_message(topics.client(cid, ClientTopic.STATUS), msg)

    assert status("a", "online", 0, "announced") == "a announced its capacity and labels"
    assert status("a", "training", 1) == "round 1: a training (1 started)"
    assert status("b", "training", 1) == "round 1: b training (2 started)"
    blocks, _ = compress_state({0: {"w": torch.ones(2, 2)}}, Level.FP32)
    update = protocol.UpdateMessage(1, "a", "t", Level.FP32, blocks, 16, 4, 2.5, 30.0, 0)
    frame = protocol.encode(update)
    line = view.on_message(topics.client("a", ClientTopic.UPDATE), frame)
    assert line is not None and line.startswith("round 1: a done (1/2 clients): blocks [0], loss 2.500")
    assert view.on_message(topics.client("a", ClientTopic.UPDATE), b"garbage") is None
    assert status("b", "offline", 1, "connection lost") == "b offline (connection lost)"
    assert status("b", "offline", 1, "connection lost") is None  # said once
