"""The dashboard's routes on a real loopback socket: its files answer without a token (they hold no
data), the document does not, and every response forbids caching, sniffing and inline script.
What the page draws is checked in a browser: tests/integration/test_dashboard.py."""

from __future__ import annotations

import re
import urllib.error
import urllib.request
from collections.abc import Iterator
from html.parser import HTMLParser
from importlib import resources

import pytest

from coordinator.dashboard import FILES, PUBLIC, dashboard_routes
from coordinator.http_endpoint import JSON, HttpEndpoint, Response

TOKEN = "0123456789abcdef-secret"


def get(url: str, token: str | None = None) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as res:
            return res.status, dict(res.headers), res.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


@pytest.fixture
def guarded() -> Iterator[str]:
    routes = {"/status.json": lambda: Response(200, JSON, b"{}\n"), **dashboard_routes()}
    endpoint = HttpEndpoint("127.0.0.1", 0, routes, TOKEN, public=PUBLIC).start()
    yield f"http://127.0.0.1:{endpoint.port}"
    endpoint.stop()


def test_the_page_and_its_files_need_no_token_but_the_document_does(guarded: str) -> None:
    for path, (name, content_type) in FILES.items():
        status, headers, body = get(guarded + path)
        assert (status, headers["Content-Type"]) == (200, content_type), path
        assert body == (resources.files("coordinator") / "web" / name).read_bytes()
    assert get(f"{guarded}/status.json")[0] == 401
    assert get(f"{guarded}/dashboard.js?token={TOKEN}")[0] == 200  # the query string is not a path
    assert get(f"{guarded}/status.json", TOKEN)[:1] == (200,)
    assert get(f"{guarded}/index.html")[0] == 401  # only the listed paths are public


@pytest.mark.parametrize("path", ["/", "/dashboard.js", "/status.json", "/nowhere"])
def test_every_response_forbids_caching_sniffing_framing_and_inline_script(guarded: str, path: str) -> None:
    _, headers, _ = get(guarded + path, TOKEN)
    assert headers["Cache-Control"] == "no-store" and headers["X-Content-Type-Options"] == "nosniff"
    policy = dict(p.strip().split(" ", 1) for p in headers["Content-Security-Policy"].split(";"))
    assert policy["default-src"] == "'self'" and policy["frame-ancestors"] == "'none'"
    assert "unsafe-inline" not in headers["Content-Security-Policy"]


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.script_text = ""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data: str) -> None:
        if self.tags and self.tags[-1][0] == "script":
            self.script_text += data.strip()


def test_the_page_loads_only_its_own_files_and_holds_no_inline_script_or_style() -> None:
    page = _Tags()
    page.feed((resources.files("coordinator") / "web" / "index.html").read_text())
    scripts = [a for t, a in page.tags if t == "script"]
    assert [a.get("src") for a in scripts] == ["dashboard.js"] and page.script_text == ""
    assert not [t for t, a in page.tags if t == "style" or "style" in a or any(k.startswith("on") for k in a)]
    links = {a.get("href") for t, a in page.tags if t == "link"}
    assert "dashboard.css" in links and not [h for h in links if h and "//" in h]  # nothing from elsewhere


def test_the_script_inserts_text_never_html_and_keeps_the_token_out_of_urls() -> None:
    script = (resources.files("coordinator") / "web" / "dashboard.js").read_text()
    assert not re.search(r"innerHTML|outerHTML|insertAdjacentHTML|document\.write|eval\(", script)
    assert "textContent" in script and "Authorization: `Bearer ${token}`" in script
    fetches = re.findall(r"fetch\(([^,)]*)", script)
    assert fetches == ['"status.json"']  # the token goes in a header, not in the fetched URL
