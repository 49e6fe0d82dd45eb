"""`fedbe-coordinator status` without a coordinator: no torch on its path, clear words when nothing is there."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.coordinator.test_fleet_status import document

ROOT = Path(__file__).resolve().parents[2]
PAST = 1_600_000_000.0  # 2020: its heartbeat is long gone


def run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, text=True, capture_output=True, timeout=60,
                          check=False)  # fmt: skip


def test_status_help_and_a_missing_state_do_not_import_torch(tmp_path: Path) -> None:
    code = (
        "import sys\nfrom coordinator.cli import main\n"
        f"rc = main(['status', '--state', {str(tmp_path)!r}])\n"
        "assert 'torch' not in sys.modules, 'torch imported'\nsys.exit(rc)"
    )
    done = run(code)
    assert done.returncode == 1, done.stderr
    assert "status.json does not exist" in done.stderr


def test_a_stale_document_is_reported_as_not_running(tmp_path: Path) -> None:
    (tmp_path / "status.json").write_text(json.dumps(document(PAST)))
    done = run(
        f"import sys\nfrom coordinator.cli import main\nsys.exit(main(['status', '--state', {str(tmp_path)!r}]))"
    )
    assert done.returncode == 3, done.stderr
    assert done.stdout.startswith("STALE: no heartbeat") and "DEVICES (1 online of 1)" in done.stdout


def test_an_endpoint_that_is_not_there_is_a_clear_error() -> None:
    done = run(
        "import sys\nfrom coordinator.cli import main\nsys.exit(main(['status', '--url', 'http://127.0.0.1:1']))"
    )
    assert done.returncode == 1 and "can not reach http://127.0.0.1:1/status.json" in done.stderr, done.stderr
