"""The HTTP endpoint (routes, bearer token) on a real loopback socket, and the ``http`` config section."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from coordinator.config import HttpSettings, config_digest, parse_run_config
from coordinator.http_endpoint import HttpEndpoint, Response, authorized
from fedbe.errors import ConfigError

BASE = {"model": "tiny:llama", "state_dir": "state"}
TOKEN = "0123456789abcdef-secret"
ROUTES = {"/hello": lambda: Response(200, "text/plain", b"hi\n")}


def get(url: str, token: str | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as res:
            return res.status, res.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@pytest.fixture
def guarded() -> Iterator[str]:
    endpoint = HttpEndpoint("127.0.0.1", 0, ROUTES, TOKEN).start()
    yield f"http://127.0.0.1:{endpoint.port}"
    endpoint.stop()


def test_with_a_token_a_request_without_it_or_with_another_gets_401(guarded: str) -> None:
    assert get(f"{guarded}/hello")[0] == 401
    assert get(f"{guarded}/hello", "wrong-token-of-some-length")[0] == 401
    assert get(f"{guarded}/nowhere")[0] == 401  # refused before the path is looked at
    assert get(f"{guarded}/hello", TOKEN) == (200, b"hi\n")
    status, body = get(f"{guarded}/nowhere", TOKEN)
    assert status == 404 and b"/hello" in body


def test_without_a_token_every_request_is_authorized() -> None:
    assert authorized(None, None) and authorized("Bearer x", None)
    assert not authorized(None, TOKEN) and not authorized(TOKEN, TOKEN)
    assert authorized(f"Bearer {TOKEN}", TOKEN)


def parse(tmp_path: Path, http: object) -> HttpSettings:
    return parse_run_config({**BASE, "http": http}, "run.yaml", tmp_path).http


def test_http_is_off_and_loopback_by_default_and_does_not_change_the_digest(tmp_path: Path) -> None:
    plain = parse_run_config(BASE, "run.yaml", tmp_path)
    assert plain.http == HttpSettings(host="127.0.0.1", port=None, token_file=None)
    watched = parse_run_config({**BASE, "http": {"port": 9464}}, "run.yaml", tmp_path)
    assert config_digest(watched) == config_digest(plain)


def test_a_non_loopback_host_needs_a_token_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"run.yaml: http.host is not a loopback address.*token_file"):
        parse(tmp_path, {"host": "0.0.0.0", "port": 9464})
    (tmp_path / "token").write_text(TOKEN + "\n")
    cfg = parse(tmp_path, {"host": "0.0.0.0", "port": 9464, "token_file": "token"})
    assert cfg.read_token() == TOKEN and cfg.token_file == tmp_path / "token"
    assert parse(tmp_path, {"host": "::1", "port": 9464}).token_file is None


@pytest.mark.parametrize(
    ("http", "message"),
    [
        ({"port": 0}, r"http.port must be >= 1"),
        ({"port": 70000}, r"http.port is not a TCP port"),
        ({"port": "9464"}, r"http.port must be a whole number"),
        ({"token_file": "missing"}, r"http.token_file names no existing file"),
        ({"prot": 9464}, r"unknown field 'http.prot'.*Did you mean 'port'"),
    ],
)
def test_bad_http_fields_name_the_field_and_the_fix(tmp_path: Path, http: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse(tmp_path, http)


def test_a_short_token_is_refused(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("short\n")
    with pytest.raises(ConfigError, match=r"http.token_file holds no usable token.*16 characters"):
        parse(tmp_path, {"port": 9464, "token_file": "token"})
