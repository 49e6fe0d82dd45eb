"""``fedbe simulate`` end to end on a tiny model: real mosquitto, coordinator and three edge processes.

One smoke run checks every output and the consistency of the metrics; the interruption tests
check that SIGINT (Ctrl-C) and SIGTERM leave no process behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from fedbe.broker import find_mosquitto
from tests.integration.conftest import ROOT

pytestmark = pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not installed")

TINY = ["--model", "tiny:llama", "--blocks", "2", "--steps", "2", "--max-tokens", "48", "--eval-examples", "10",
        "--probe-questions", "8", "--probe-texts", "6", "--deadline", "60"]  # fmt: skip


def start(out: Path, log: Path, *extra: str) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with log.open("wb") as handle:
        return subprocess.Popen(
            [sys.executable, "-m", "fedbe_sim.cli", "simulate", "--out", str(out), *TINY, *extra],
            cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip


def watch_family(proc: subprocess.Popen[bytes], until: float, stop_when: str = "", log: Path | None = None
                 ) -> dict[int, psutil.Process]:  # fmt: skip
    """Every descendant seen while ``proc`` runs (until it exits, ``until``, or ``stop_when`` is logged)."""
    seen: dict[int, psutil.Process] = {}
    parent = psutil.Process(proc.pid)
    while proc.poll() is None and time.monotonic() < until:
        try:
            for child in parent.children(recursive=True):
                seen.setdefault(child.pid, child)
        except psutil.NoSuchProcess:
            break
        if stop_when and log is not None and stop_when in log.read_text(errors="replace"):
            break
        time.sleep(0.2)
    return seen


def assert_all_gone(family: dict[int, psutil.Process]) -> None:
    _, alive = psutil.wait_procs(list(family.values()), timeout=10)
    survivors = [f"{p.pid} {' '.join(p.cmdline()[:4])}" for p in alive if p.is_running()]
    assert not survivors, f"processes left behind: {survivors}"


def test_simulate_runs_a_federation_and_writes_consistent_outputs(tmp_path: Path) -> None:
    out, log = tmp_path / "sim", tmp_path / "simulate.log"
    proc = start(out, log, "--rounds", "2")
    family = watch_family(proc, time.monotonic() + 240)
    try:
        code = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text(errors="replace")
    assert code == 0, text[-4000:]
    assert len(family) >= 5, family  # mosquitto, the coordinator and three edges at least
    assert_all_gone(family)
    for name in ("metrics.jsonl", "report.md", "accuracy_retention.png", "allocation.png", "bytes.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    for png in out.glob("*.png"):
        assert png.read_bytes()[:4] == b"\x89PNG"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [0, 1, 2]  # the base model, then one line per round
    for r in records:
        server = r["server_evaluation"]
        assert server["examples"] == 10 and 0.0 <= server["accuracy"] <= 1.0
        assert 0.0 <= server["probes"]["definition_accuracy"] <= 1.0 and server["probes"]["perplexity"] > 1.0
    for r in records[1:]:
        assert r["closed_by"] == "all answered" and len(r["updates"]) == 3
        assert sum(r["bytes_up"].values()) > 0 and sum(r["bytes_down"].values()) > sum(r["bytes_up"].values())
        kept = r["server_evaluation"]["retention"]
        before, after = records[0]["server_evaluation"]["probes"], r["server_evaluation"]["probes"]
        assert kept["perplexity_retention"] == pytest.approx(before["perplexity"] / after["perplexity"])
        assert r["server_evaluation"]["baseline_accuracy"] == records[0]["server_evaluation"]["accuracy"]
    report = (out / "report.md").read_text()
    rows = [row for row in report.splitlines() if row.startswith("| ") and row[2].isdigit()]
    assert len(rows) == 3
    assert f"{records[-1]['server_evaluation']['accuracy']:.3f}" in rows[-1]
    # progress: every client's update of every round, and a line per closed round
    for rnd in (1, 2):
        assert text.count(f"round {rnd}: c0") >= 6, text  # 3 x training + 3 x done
        assert f"round {rnd}/2 closed: 3 updates" in text
    assert "round 0 (base model): zero-shot accuracy" in text


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_an_interrupted_simulation_leaves_no_process_behind(tmp_path: Path, signum: int) -> None:
    out, log = tmp_path / "sim", tmp_path / "simulate.log"
    proc = start(out, log, "--rounds", "200")
    try:
        family = watch_family(proc, time.monotonic() + 180, stop_when="training", log=log)
        assert proc.poll() is None, log.read_text()[-3000:]
        assert len(family) >= 5, family
        proc.send_signal(signum)
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text(errors="replace")
    assert code == 130, text[-3000:]
    assert "stopping every process this simulation started" in text
    assert_all_gone(family)


def test_a_failing_process_stops_the_simulation_with_its_log_and_leaves_nothing_behind(
    tmp_path: Path,
) -> None:
    out, log = tmp_path / "sim", tmp_path / "simulate.log"
    proc = start(out, log, "--model", "tiny:nosucharch")  # every process fails to load it
    try:
        family = watch_family(proc, time.monotonic() + 180)
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text(errors="replace")
    assert code == 1, text[-3000:]
    assert "exited with code" in text and "nosucharch" in text  # which process, and the end of its log
    assert_all_gone(family)
    assert not (out / "report.md").exists()
