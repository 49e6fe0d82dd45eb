"""Shared test settings.

The fedbe tests run tiny models whose ops take microseconds. With several threads, OpenMP's
spin-waiting makes each op cost milliseconds as soon as another process shares the two cores (a
20-step training loop went from 0.03 s to 2.6 s), so those tests run single-threaded.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

_FEDBE_TESTS = Path(__file__).parent / "fedbe"
_BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str) -> ModuleType:
    """``benchmarks/<name>.py`` imported as a module (the scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(name, _BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _single_threaded_torch(request: pytest.FixtureRequest) -> Iterator[None]:
    if _FEDBE_TESTS not in Path(str(request.node.path)).parents:
        yield
        return
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
