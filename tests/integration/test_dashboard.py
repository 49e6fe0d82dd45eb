"""The dashboard in a real browser (Debian's headless chromium): a real coordinator with a bearer
token, a fake fleet and a real mosquitto; the page run by the browser shows a row per client with its
blocks, the allocation map and the charts of the rounds run, and without the token only says how to
give it. A status document with hostile strings shows them as text."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import urllib.request
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from coordinator.dashboard import PUBLIC, dashboard_routes
from coordinator.http_endpoint import JSON, HttpEndpoint, Response
from fedbe.broker import MosquittoBroker
from tests.integration.test_faults import coordinator, fake_fleet, stop_all, wait_until
from tests.integration.test_faults import write_config as faults_config
from tests.integration.test_observability import free_port

CLIENTS = ["c1", "c2", "c3"]
TOKEN = "dashboard-test-token-0123456789"
BROWSERS = ("chromium-headless-shell", "chromium")


@pytest.fixture
def browser() -> str:
    found = next((path for name in BROWSERS if (path := shutil.which(name))), None)
    if found is None:
        pytest.skip(
            "neither chromium-headless-shell nor chromium is installed (scripts/setup.sh installs it)"
        )
    return found


def run_browser(browser: str, tmp_path: Path, url: str, *args: str) -> str:
    """The browser's stdout after it loaded ``url`` and let its timers and fetches run for 4 s."""
    # a profile of its own per run: a new tab, with an empty sessionStorage
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"
    command = [browser, "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--user-data-dir={profile}",
               "--virtual-time-budget=4000", *args, url]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


class Dom(HTMLParser):
    """The elements of a dumped DOM: tag, attributes, own text, and the fleet row (``data-client``) it is in."""

    VOID = {"meta", "link", "br", "img", "input", "hr"}

    def __init__(self, html: str) -> None:
        super().__init__()
        self.elements: list[dict[str, Any]] = []
        self.stack: list[dict[str, Any]] = []
        self.row: str | None = None
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "tr":
            self.row = a.get("data-client")
        element = {"tag": tag, "attrs": a, "text": "", "row": self.row,
                   "in": [e["attrs"].get("id") for e in self.stack if e["attrs"].get("id")]}  # fmt: skip
        self.elements.append(element)
        if tag not in self.VOID:
            self.stack.append(element)

    def handle_endtag(self, tag: str) -> None:
        while self.stack and self.stack.pop()["tag"] != tag:
            pass
        if tag == "tr":
            self.row = None

    def handle_data(self, data: str) -> None:
        if self.stack:
            self.stack[-1]["text"] += data

    def by_id(self, id_: str) -> dict[str, Any]:
        return next(e for e in self.elements if e["attrs"].get("id") == id_)

    def within(self, id_: str, tag: str) -> list[dict[str, Any]]:
        return [e for e in self.elements if e["tag"] == tag and id_ in e["in"]]


def get_status(base: str) -> dict[str, Any]:
    req = urllib.request.Request(f"{base}/status.json", headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(req, timeout=10) as res:
        return dict(json.load(res))


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", "not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_the_page_shows_the_fleet_the_allocation_and_the_charts_and_asks_for_a_token(
    browser: str, broker: MosquittoBroker, tmp_path: Path
) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    (tmp_path / "token").write_text(TOKEN + "\n")
    # many slow rounds: the coordinator must still serve while the browser runs three times
    http = f"http: {{port: {port}, token_file: {tmp_path / 'token'}}}"
    config = faults_config(tmp_path / "run.yaml", broker.url, rounds=30, extra=f"{http}\neval_every: 1")
    coord = coordinator(config)
    procs = [coord, fake_fleet(tmp_path, broker.url, CLIENTS, "fleet", delay=1.0)]
    try:
        live: dict[str, Any] = {}

        def two_rounds_closed() -> bool:
            try:
                live.update(get_status(base))
            except OSError:
                return False
            closed = [r for r in live.get("recent_rounds", []) if r["round"] >= 1]  # {} before the first
            return len(closed) >= 2

        wait_until(two_rounds_closed, 120, "two closed rounds on /status.json", tmp_path, (coord,))

        locked = Dom(run_browser(browser, tmp_path, f"{base}/", "--dump-dom"))
        message = locked.by_id("message")
        assert "unauthorized" in message["text"] and "#token=" in message["text"], message
        assert "hidden" not in message["attrs"] and not locked.within("fleet", "td")

        dom = Dom(run_browser(browser, tmp_path, f"{base}/#token={TOKEN}", "--dump-dom"))
        assert "hidden" in dom.by_id("message")["attrs"]
        blocks = {
            e["row"]: e["text"] for e in dom.within("fleet", "td") if e["attrs"].get("class") == "blocks"
        }
        assert sorted(blocks) == CLIENTS
        assert all(text != "-" and set(text.split(",")) <= {"0", "1"} for text in blocks.values()), blocks
        assert dom.by_id("round-line")["text"].startswith("round ")
        held = {(int(e["attrs"]["data-round"]), e["attrs"]["data-client"])
                for e in dom.within("allocation", "rect") if "on" in e["attrs"]["class"].split()}  # fmt: skip
        for round_ in (1, 2):  # every client trains a block in every round here
            assert {c for r, c in held if r == round_} == set(CLIENTS), held
        for chart in ("chart-accuracy", "chart-bytes"):
            rounds = {int(e["attrs"]["data-round"]) for e in dom.within(chart, "circle")}
            assert {1, 2} <= rounds, (chart, rounds)
        accuracy = {float(e["attrs"]["data-value"]) for e in dom.within("chart-accuracy", "circle")}
        assert accuracy == {0.5}  # what every fake client reports for its evaluation
        assert dom.within("chart-retention", "p")  # no server evaluation: says so instead of a chart

        shot = tmp_path / "dashboard.png"
        run_browser(
            browser, tmp_path, f"{base}/#token={TOKEN}", f"--screenshot={shot}", "--window-size=1280,900"
        )
        assert png_size(shot) == (1280, 900)
        assert shot.stat().st_size > 15_000  # a blank page of this size compresses to a few kB
    finally:
        stop_all(procs)


HOSTILE = '<img src=x onerror="document.title=1">'


@pytest.fixture
def hostile_status() -> Iterator[str]:
    device = {"id": HOSTILE, "profile": "<b>p</b>", "device_kind": "cpu", "precision": "fp32", "state": "refused",
              "since": None, "last_round": 1, "blocks": [0], "refused": HOSTILE,
              "last_update": {"round": 1, "fate": "rejected", "code": "<script>x()</script>"}}  # fmt: skip
    doc = {"coordinator": {"federation": "<i>f</i>", "state": "running"}, "devices": [device],
           "round": {"number": 2, "of": 3, "phase": "training", "expected": 1, "arrived": 0, "errors": 0,
                     "rejected": 0, "seconds_to_deadline": 9.0},
           "recent_rounds": [{"round": 1, "accuracy": 0.5, "retention": {"<u>probe</u>": 0.9}, "bytes_up": 10,
                              "bytes_down": 20, "assignments": {HOSTILE: [0]}}]}  # fmt: skip
    body = json.dumps(doc).encode()
    routes = {"/status.json": lambda: Response(200, JSON, body), **dashboard_routes()}
    endpoint = HttpEndpoint("127.0.0.1", 0, routes, None, public=PUBLIC).start()
    yield f"http://127.0.0.1:{endpoint.port}/"
    endpoint.stop()


def test_strings_from_devices_are_shown_as_text_never_run_as_html(
    browser: str, hostile_status: str, tmp_path: Path
) -> None:
    dom = Dom(run_browser(browser, tmp_path, hostile_status, "--dump-dom"))
    assert not [e for e in dom.elements if e["tag"] in ("img", "b", "i", "u") or
                (e["tag"] == "script" and e["attrs"].get("src") != "dashboard.js")]  # fmt: skip
    cells = [e["text"] for e in dom.within("fleet", "td")]
    assert cells[0] == HOSTILE and "<b>p</b>" in cells and "r1 rejected (<script>x()</script>)" in cells
    assert dom.by_id("federation")["text"] == "federation <i>f</i>"
    assert {e["attrs"]["data-client"] for e in dom.within("allocation", "rect")} == {HOSTILE}
    assert any(e["text"] == "<u>probe</u>" for e in dom.within("chart-retention", "text"))
