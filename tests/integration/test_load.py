"""The control-plane load test at 50 clients (benchmarks/load_bench.py runs it at 500): no message lost."""

from __future__ import annotations

from pathlib import Path

from fedbe.broker import MosquittoBroker
from tests.conftest import load_benchmark


def test_fifty_fake_clients_finish_three_rounds_and_no_message_is_lost(
    broker: MosquittoBroker, tmp_path: Path
) -> None:
    # (the broker fixture only skips the test where mosquitto is missing; run_load starts its own)
    bench = load_benchmark("load_bench")
    r = bench.run_load(50, 3, tmp_path, fleets=2, timeout=180)
    assert r["rounds"] == 3 and r["closed_by"] == ["all answered"]
    assert r["tasks_sent_by_coordinator"] == r["tasks_received_by_clients"] == 150
    assert (
        r["updates_sent_by_clients"]
        == r["updates_seen_by_spy"]
        == r["updates_accepted_by_coordinator"]
        == 150
    )
    assert r["rejected"] == 0 and r["rejections_by_reason"] == {}
    assert (
        r["update_delivery_p50_ms"] > 0 and r["announce_rtt_p99_ms"] > 0 and r["coordinator_peak_rss_mib"] > 0
    )
