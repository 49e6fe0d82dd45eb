"""``fedbe simulate``'s plan and process handling, without running a federation (see
tests/integration/test_simulate.py for that)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import psutil
import pytest

from coordinator.config import parse_run_config
from fedbe.device_profile import shipped_profile_folder
from fedbe.errors import ConfigError
from fedbe.recipe import RecipeError
from fedbe_sim import simulate
from fedbe_sim.cli import build_parser


def _args(tmp_path: Path, *extra: str) -> argparse.Namespace:
    return build_parser().parse_args(["simulate", "--out", str(tmp_path / "out"), *extra])


def test_defaults_give_heterogeneous_clients_and_a_valid_coordinator_config(tmp_path: Path) -> None:
    settings = simulate.settings_from_args(_args(tmp_path))
    shards = [tmp_path / f"client-{i:02d}.jsonl" for i in range(settings.clients)]
    specs = simulate.client_specs(settings, shards)
    assert len({s.profile.stem for s in specs}) >= 3  # at least three different device profiles
    assert len({s.client_id for s in specs}) == len(specs) and [s.data for s in specs] == shards
    config = simulate.run_config(settings, "mqtt://127.0.0.1:1999", tmp_path / "state")
    cfg = parse_run_config(config, "simulate", tmp_path)  # the coordinator accepts what simulate writes
    assert cfg.rounds == settings.rounds and cfg.clients_per_round == cfg.min_clients == settings.clients
    assert cfg.server_eval is not None and cfg.server_eval.baseline and cfg.server_eval.probe_questions > 0
    # FedBE's default: clients self-distil against the base (cached top-K), so every client is protected
    assert cfg.training.distill_lambda == settings.distill_lambda and min(settings.distill_lambda) > 0
    assert cfg.training.distill_top_k > 0
    assert cfg.labels == ()  # no labels given: the clients' announced labels
    labelled = simulate.run_config(
        settings, "mqtt://127.0.0.1:1999", tmp_path / "state", ["tech", "business"]
    )
    assert parse_run_config(labelled, "simulate", tmp_path).labels == ("business", "tech")
    assert cfg.training.lr_decay == 1.0  # a constant lr unless --lr-decay says otherwise
    decayed = simulate.run_config(
        simulate.settings_from_args(_args(tmp_path, "--lr-decay", "0.5")),
        "mqtt://127.0.0.1:1999",
        tmp_path / "s",
    )
    assert parse_run_config(decayed, "simulate", tmp_path).training.lr_in_round(3) == pytest.approx(
        settings.lr / 4
    )
    scheduled = simulate.run_config(
        simulate.settings_from_args(_args(tmp_path, "--distill-lambda", "6,3")),
        "mqtt://127.0.0.1:1999",
        tmp_path,
    )
    training = parse_run_config(scheduled, "simulate", tmp_path).training
    assert [training.distill_lambda_in_round(r) for r in (1, 2, 3)] == [6.0, 3.0, 3.0]
    command = simulate.edge_command(settings, specs[0], "mqtt://127.0.0.1:1999")
    assert "--emulate" in command and str(specs[0].profile) in command
    assert simulate.child_environment()["OMP_NUM_THREADS"] == "1"
    assert cfg.http.port is None  # no HTTP endpoint unless --http-port asks for one


def test_http_port_serves_the_coordinator_on_loopback_without_a_token(tmp_path: Path) -> None:
    settings = simulate.settings_from_args(_args(tmp_path, "--http-port", "18080"))
    config = simulate.run_config(settings, "mqtt://127.0.0.1:1999", tmp_path / "state")
    http = parse_run_config(config, "simulate", tmp_path).http
    assert (http.host, http.port, http.token_file) == ("127.0.0.1", 18080, None)


def test_more_clients_than_profiles_cycle_through_them(tmp_path: Path) -> None:
    settings = simulate.settings_from_args(
        _args(
            tmp_path,
            "--clients",
            "5",
            "--profiles",
            f"cpu-laptop,{shipped_profile_folder() / 'rtx-3060-12gb.yaml'}",
        )
    )
    specs = simulate.client_specs(settings, [tmp_path / f"{i}.jsonl" for i in range(5)])
    assert [s.profile.stem for s in specs] == ["cpu-laptop", "rtx-3060-12gb"] * 2 + ["cpu-laptop"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--profiles", "no-such-device"), "--profiles: no-such-device: profile file not found.* cpu-laptop"),
        (("--blocks", "many"), "--blocks must be a whole number or auto"),
        (("--probe-questions", "0"), "must both be 0 or both be at least 1"),
        (("--lr-decay", "0"), r"--lr-decay must be a number in \(0, 1\]"),
        (("--lr-decay", "1.5"), r"--lr-decay must be a number in \(0, 1\]"),
        (("--lr-decay", "nan"), r"--lr-decay must be a number in \(0, 1\]"),
        (("--http-port", "70000"), r"--http-port must be a TCP port \(1-65535\), got 70000"),
    ],
)
def test_bad_settings_are_clear_errors(tmp_path: Path, extra: tuple[str, ...], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        simulate.settings_from_args(_args(tmp_path, *extra))


@pytest.mark.parametrize("bad", ["-1", "6,x", "6,,3"])
def test_a_bad_distill_lambda_schedule_is_a_clear_error(tmp_path: Path, bad: str) -> None:
    """The schedule is read by :func:`fedbe.recipe.parse_schedule`: a :class:`RecipeError` naming the flag."""
    with pytest.raises(
        RecipeError, match="--distill-lambda must be a number >= 0 or comma-separated ones"
    ) as exc:
        simulate.settings_from_args(_args(tmp_path, "--distill-lambda", bad))
    assert exc.value.name == "--distill-lambda"


def test_a_non_empty_output_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("x")
    with pytest.raises(ConfigError, match="not an empty folder"):
        simulate.settings_from_args(_args(tmp_path))


def test_without_mosquitto_it_says_how_to_install_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("fedbe.broker.find_mosquitto", lambda: None)
    with pytest.raises(simulate.SimulationError, match="apt-get install mosquitto"):
        simulate.run_simulation(_args(tmp_path))
    assert not (tmp_path / "out").exists()  # nothing started, nothing written


def test_stop_all_ends_each_child_and_what_it_started_in_its_group(tmp_path: Path) -> None:
    children = simulate.Children()
    # A child that ignores SIGTERM and has a grandchild: both must be gone after stop_all.
    script = "import signal, subprocess, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); " \
             "subprocess.Popen(['sleep', '300']); print('ready', flush=True); time.sleep(300)"  # fmt: skip
    proc = children.spawn(
        "stubborn", [sys.executable, "-c", script], tmp_path / "stubborn.log", dict(os.environ)
    )
    children.spawn("polite", ["sleep", "300"], tmp_path / "polite.log", dict(os.environ))
    deadline = time.monotonic() + 30
    while "ready" not in (tmp_path / "stubborn.log").read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    family = [psutil.Process(pid) for pid in children.pids()]
    family += psutil.Process(proc.pid).children(recursive=True)
    assert len(family) == 3
    assert os.getpgid(proc.pid) == proc.pid != os.getpgid(0)  # its own process group
    started = time.monotonic()
    children.stop_all(grace=1.0)
    assert time.monotonic() - started < 10
    assert all(p.poll() is not None for p in children.procs.values())
    gone, alive = psutil.wait_procs(family, timeout=5)
    assert not alive, alive
