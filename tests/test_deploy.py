"""deploy/*.service: systemd scores their sandboxes, and they run fedbe from files passed as credentials:
the edge agent from an enrolment bundle, the coordinator from its run config and certificate."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from coordinator.cli import build_parser as coordinator_parser
from coordinator.cli import main as coordinator_main
from coordinator.config import load_run_config
from edge_client.cli import build_parser
from edge_client.run_config import check_required, parse_with_file

ROOT = Path(__file__).resolve().parents[1]
EDGE_UNIT = ROOT / "deploy" / "fedbe-edge.service"
COORDINATOR_UNIT = ROOT / "deploy" / "fedbe-coordinator.service"
MAX_EXPOSURE = 3.0  # systemd-analyze: up to 3.9 is rated "OK", lower is better


def unit_settings(path: Path, section: str = "Service") -> dict[str, list[str]]:
    """``key -> values`` of one section of a unit file (continued lines joined, comments skipped)."""
    settings: dict[str, list[str]] = {}
    current, pending = "", ""
    for raw in path.read_text().splitlines():
        line = pending + raw.strip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = line.strip("[]")
        elif current == section:
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def exposure(unit: Path) -> float:
    done = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(unit)], capture_output=True,
                          text=True, timeout=120, check=False)  # fmt: skip
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", done.stdout)
    assert found, f"no score in the output of systemd-analyze: {done.stdout[-500:]} {done.stderr[-500:]}"
    return float(found.group(1))


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
@pytest.mark.parametrize("unit", [EDGE_UNIT, COORDINATOR_UNIT], ids=lambda p: p.name)
def test_systemd_rates_the_units_sandbox_at_most_3(unit: Path, tmp_path: Path) -> None:
    assert exposure(unit) <= MAX_EXPOSURE
    # the measurement discriminates: the same unit without its sandbox is rated exposed
    bare = tmp_path / unit.name
    bare.write_text("[Service]\nExecStart=" + unit_settings(unit)["ExecStart"][0] + "\n")
    assert exposure(bare) > 9.0


def test_the_units_command_line_parses_and_reads_a_bundle_passed_as_credentials(tmp_path: Path) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to enrol a device")
    service = unit_settings(EDGE_UNIT)
    (tmp_path / "clients.txt").write_text("c1\n")
    broker = tmp_path / "broker"
    assert coordinator_main(["broker-config", "--clients", str(tmp_path / "clients.txt"), "--out", str(broker),
                             "--client-certs"]) == 0  # fmt: skip
    bundle = tmp_path / "bundle"
    assert coordinator_main(["enroll", "--broker-dir", str(broker), "--device", "dev1", "--broker-url",
                             "mqtts://broker.example:8883", "--out", str(bundle)]) == 0  # fmt: skip
    # Every file of the bundle is handed over by LoadCredential=, under its own name, from /etc/fedbe/bundle.
    credentials = dict(entry.split(":", 1) for entry in service["LoadCredential"])
    assert credentials == {p.name: f"/etc/fedbe/bundle/{p.name}" for p in bundle.iterdir()}
    # systemd's specifiers: %d the credentials folder (here: the bundle itself), %S /var/lib, %C /var/cache
    [command] = service["ExecStart"]
    words = shlex.split(command.replace("%d", str(bundle)).replace("%S", str(tmp_path)))
    assert words[0].endswith("/fedbe-edge") and "--config" in words
    parser = build_parser()
    args = parse_with_file(parser, words[1:], bundle / "edge.yaml")
    check_required(args)
    assert (args.command, args.client_id, args.broker) == ("run", "dev1", "mqtts://broker.example:8883")
    assert (args.tls_cert, args.tls_key, args.tls_ca) == (bundle / "device.crt", bundle / "device.key",
                                                          bundle / "ca.crt")  # fmt: skip
    assert args.data == tmp_path / "fedbe" / "data.jsonl" and args.require_tls
    # The state and cache folders it writes are the ones systemd makes for it.
    assert service["StateDirectory"] == ["fedbe"] and service["CacheDirectory"] == ["fedbe"]
    assert service["DynamicUser"] == ["yes"] and service["ProtectSystem"] == ["strict"]


def test_the_coordinator_units_command_line_parses_and_its_run_config_reads_the_credentials(
    tmp_path: Path,
) -> None:
    service = unit_settings(COORDINATOR_UNIT)
    credentials = dict(entry.split(":", 1) for entry in service["LoadCredential"])
    folder = tmp_path / "credentials"  # what systemd makes of them: one folder, files by credential name
    folder.mkdir()
    for name in credentials:
        (folder / name).write_text("x\n")
    (folder / "run.yaml").write_text(
        "model: tiny:llama\nstate_dir: /var/lib/fedbe-coordinator/state\n"
        "broker: {url: 'mqtts://127.0.0.1:8883', tls_ca: ca.crt, require_tls: true, "
        "tls_cert: fedbe-coordinator.crt, tls_key: fedbe-coordinator.key}\n"
    )
    [command] = service["ExecStart"]
    words = shlex.split(command.replace("%d", str(folder)))
    args = coordinator_parser().parse_args(words[1:])
    assert args.command == "run" and args.config == folder / "run.yaml"
    broker = load_run_config(args.config).broker
    assert (broker.tls_ca, broker.tls_cert, broker.tls_key) == (
        folder / "ca.crt",
        folder / "fedbe-coordinator.crt",
        folder / "fedbe-coordinator.key",
    )
    assert service["StateDirectory"] == ["fedbe-coordinator"] and service["DynamicUser"] == ["yes"]
