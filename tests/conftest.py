"""Shared test settings.

The fedbe tests run tiny models whose ops take microseconds. With several threads, OpenMP's
spin-waiting makes each op cost milliseconds as soon as another process shares the two cores (a
20-step training loop went from 0.03 s to 2.6 s), so those tests run single-threaded.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

_FEDBE_TESTS = Path(__file__).parent / "fedbe"


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
