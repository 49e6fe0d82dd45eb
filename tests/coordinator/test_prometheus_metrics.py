"""The Prometheus metrics, fed from a round's metrics line and the status document, read back as a scraper does."""

from __future__ import annotations

from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from coordinator.prometheus_metrics import OTHER, FleetMetrics
from tests.coordinator.test_fleet_status import document, record


def scrape(metrics: FleetMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the exposition, by name and sorted labels."""
    out = {}
    for family in text_string_to_metric_families(metrics.exposition().decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def updates(outcome: str, reason: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    return ("fedbe_updates_total", (("outcome", outcome), ("reason", reason)))


def test_a_closed_round_moves_the_counters_by_what_its_line_records() -> None:
    m = FleetMetrics(privacy=True)
    line: dict[str, Any] = record(
        1, aggregation_seconds=0.2, privacy={"epsilon": 0.8},
        server_evaluation={"accuracy": 0.7, "retention": {"definition_retention": 0.99}},
    )  # fmt: skip
    m.observe_round(line)
    m.observe_round(record(2, errors=[], rejected=[{"client": "x", "reason": "something new", "detail": ""}]))
    got = scrape(m)
    assert got[("fedbe_rounds_completed_total", ())] == 2
    assert got[("fedbe_round", ())] == 2
    assert got[("fedbe_round_duration_seconds_count", ())] == 2
    assert got[("fedbe_round_duration_seconds_sum", ())] == 25.0
    assert got[("fedbe_aggregation_duration_seconds_count", ())] == 1
    assert got[updates("accepted", "")] == 4
    assert got[updates("rejected", "norm_outlier")] == 1
    assert got[updates("late", "late")] == 1
    assert got[updates("error", "refused_memory")] == 1
    assert got[updates("rejected", OTHER)] == 1  # a reason the coordinator does not give: bounded
    assert got[("fedbe_bytes_total", (("direction", "up"),))] == 300
    assert got[("fedbe_bytes_total", (("direction", "down"),))] == 4014
    assert got[("fedbe_accuracy", (("source", "server"),))] == 0.7
    assert got[("fedbe_retention", (("probe", "definition"),))] == 0.99
    assert got[("fedbe_privacy_epsilon", ())] == 0.8


def test_the_live_gauges_follow_the_status_document_and_epsilon_exists_only_with_privacy() -> None:
    m = FleetMetrics(privacy=False)
    m.observe_status(document(1_800_000_000.0))
    got = scrape(m)
    assert got[("fedbe_clients_online", ())] == 1
    assert got[("fedbe_clients_selected", ())] == 1
    assert got[("fedbe_round_updates", ())] == 1
    assert got[("fedbe_round", ())] == 3
    assert got[("fedbe_round_deadline_remaining_seconds", ())] == 41.0
    assert not any(name == "fedbe_privacy_epsilon" for name, _ in got)


def test_two_coordinators_in_one_process_keep_separate_registries() -> None:
    a, b = FleetMetrics(), FleetMetrics()
    a.observe_round(record(1))
    assert scrape(a)[("fedbe_rounds_completed_total", ())] == 1
    assert scrape(b)[("fedbe_rounds_completed_total", ())] == 0
