"""The package layers, checked by import-linter's contract in pyproject.toml (not by convention).

``fedbe`` (the shared core) imports neither the edge client nor the coordinator; those two never
import each other; ``fedbe_sim`` (bench, simulate, the ``fedbe`` command) sits on top of all three.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def lint_imports() -> str:
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    if exe is None:
        pytest.fail("import-linter is not installed: run scripts/setup.sh")
    return exe


def test_layers_hold() -> None:
    done = subprocess.run([lint_imports(), "--config", str(ROOT / "pyproject.toml")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "1 kept, 0 broken" in done.stdout


def test_contract_catches_core_importing_the_coordinator(tmp_path: Path) -> None:
    # the same contract over a copy of the tree with one forbidden import added must break
    for pkg in ("fedbe", "edge_client", "coordinator", "fedbe_sim"):
        shutil.copytree(ROOT / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "fedbe" / "blocks.py").write_text(
        (ROOT / "fedbe" / "blocks.py").read_text() + "\nfrom coordinator import aggregation  # noqa\n"
    )
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    done = subprocess.run([lint_imports(), "--config", str(tmp_path / "pyproject.toml"), "--no-cache"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"})  # fmt: skip
    assert done.returncode != 0
    assert "fedbe.blocks -> coordinator.aggregation" in done.stdout
