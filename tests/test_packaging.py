"""The wheel: it holds every module and data file of the source tree, the device profiles included,
and an installed wheel finds a profile by name from any working directory."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# source folder -> where its files land in the wheel (pyproject.toml maps profiles/ to fedbe_profiles)
PACKAGE_FOLDERS = {
    "fedbe": "fedbe",
    "edge_client": "edge_client",
    "coordinator": "coordinator",
    "fedbe_sim": "fedbe_sim",
    "profiles": "fedbe_profiles",
}


def _pip(*args: str, cwd: Path) -> None:
    # offline, with this environment's setuptools: the test needs no package index
    command = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args]
    subprocess.run(command, cwd=cwd, check=True, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel built from a copy of the source tree (the build writes build/ and *.egg-info next to it)."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    for folder in PACKAGE_FOLDERS:
        shutil.copytree(ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    _pip("wheel", "--no-deps", "--no-index", "--no-build-isolation", "-w", str(work / "dist"), str(source), cwd=work)
    (built,) = (work / "dist").glob("fedbe-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel: Path) -> Path:
    """The wheel installed into a folder of its own (not into this environment)."""
    target = wheel.parent.parent / "site"
    _pip("install", "--no-deps", "--no-index", "--target", str(target), str(wheel), cwd=wheel.parent)
    return target


def test_the_wheel_holds_every_file_of_the_source_tree_and_the_profiles(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {
        f"{PACKAGE_FOLDERS[folder]}/{path.relative_to(ROOT / folder).as_posix()}"
        for folder in PACKAGE_FOLDERS
        for path in (ROOT / folder).rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    }
    assert expected - names == set()
    profiles = {n for n in names if n.startswith("fedbe_profiles/") and n.endswith(".yaml")}
    assert "fedbe_profiles/jetson-orin-nano-8gb.yaml" in profiles
    assert len(profiles) == len(list((ROOT / "profiles").glob("*.yaml")))


def _run_installed(installed: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``fedbe-edge ARGS`` of the installed wheel, from ``cwd``, with nothing of this checkout on the path."""
    env = {**os.environ, "PYTHONPATH": str(installed), "FEDBE_CACHE": str(cwd / "cache")}
    code = "import sys; from edge_client.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run(
        [sys.executable, "-c", code, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


def test_an_installed_wheel_profiles_a_device_by_profile_name_from_anywhere(
    installed: Path, tmp_path: Path
) -> None:
    help_text = _run_installed(installed, tmp_path, "--help")
    assert help_text.returncode == 0, help_text.stderr
    assert "jetson-orin-nano-8gb" in help_text.stdout and "cpu-laptop" in help_text.stdout
    args = ("--model", "tiny:llama", "--batch-size", "2", "--max-tokens", "16", "--json")
    done = _run_installed(installed, tmp_path, "profile", "--profile", "jetson-orin-nano-8gb", *args)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["profile"] == "jetson-orin-nano-8gb"
    assert Path(report["profile_file"]) == installed / "fedbe_profiles" / "jetson-orin-nano-8gb.yaml"
    unknown = _run_installed(installed, tmp_path, "run", "--broker", "mqtt://127.0.0.1:9", "--client-id", "d1",
                             "--data", "none.jsonl", "--profile", "toaster-9000")  # fmt: skip
    assert unknown.returncode == 1
    assert "toaster-9000: profile file not found" in unknown.stderr and "jetson-orin-nano-8gb" in unknown.stderr
