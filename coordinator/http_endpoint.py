"""The coordinator's HTTP endpoint: a small threaded server over a table of routes.

Each route is a path and a function that returns a :class:`Response`; the coordinator serves
``/metrics`` (Prometheus' text format), ``/status.json`` (:mod:`coordinator.fleet_status`) and the
dashboard page with its script and style sheet (:mod:`coordinator.dashboard`). The server runs in
daemon threads (one per request, the standard library's :class:`~http.server.ThreadingHTTPServer`),
so a slow scraper never holds up a round; the handlers only read what the coordinator published,
never its live state.

With a token, every request must carry ``Authorization: Bearer TOKEN``, compared in constant time;
any other request gets 401 before its path is even looked at, except for the few ``public`` paths:
the dashboard's static files, which hold no data (a browser can not send the header when it opens a
page; the page's script sends it with each fetch of ``/status.json``). Every response carries
:data:`SECURITY_HEADERS`: nothing is cached, sniffed into another type, framed, or allowed to load
from anywhere but this server.
"""

from __future__ import annotations

import hmac
import logging
import socket
import threading
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

log = logging.getLogger(__name__)

JSON = "application/json"
SECURITY_HEADERS = (
    ("Cache-Control", "no-store"),
    ("X-Content-Type-Options", "nosniff"),
    # no inline script or style: the dashboard keeps its JS and CSS in files of their own
    (
        "Content-Security-Policy",
        "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; "
        "base-uri 'none'; form-action 'none'",
    ),
    ("Referrer-Policy", "no-referrer"),
)


@dataclass(frozen=True)
class Response:
    status: int
    content_type: str
    body: bytes


Routes = Mapping[str, Callable[[], Response]]


def authorized(header: str | None, token: str | None) -> bool:
    """Whether an ``Authorization`` header carries ``token`` (always, without a token)."""
    if token is None:
        return True
    given = (header or "").encode("utf-8", "replace")
    return hmac.compare_digest(given, f"Bearer {token}".encode())


def respond(
    routes: Routes, path: str, header: str | None, token: str | None, public: Collection[str] = ()
) -> Response:
    """What a GET of ``path`` answers (the query string is ignored); ``public`` paths need no token."""
    path = path.split("?", 1)[0]
    if path not in public and not authorized(header, token):
        return Response(401, "text/plain; charset=utf-8", b"401: send Authorization: Bearer TOKEN\n")
    route = routes.get(path)
    if route is None:
        known = ", ".join(sorted(routes))
        return Response(404, "text/plain; charset=utf-8", f"404: no such path; try {known}\n".encode())
    return route()


class _IPv6Server(ThreadingHTTPServer):
    address_family = socket.AF_INET6


class HttpEndpoint:
    """Serves ``routes`` on ``host:port`` (port 0: any free one; :attr:`port` says which) until stopped;
    with a ``token``, only the ``public`` paths answer a request without it."""

    def __init__(
        self, host: str, port: int, routes: Routes, token: str | None = None, public: Collection[str] = ()
    ) -> None:
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            server_version = "fedbe-coordinator"

            def do_GET(self) -> None:  # noqa: N802 -- the name http.server dispatches to
                self._answer(send_body=True)

            def do_HEAD(self) -> None:  # noqa: N802
                self._answer(send_body=False)

            def _answer(self, send_body: bool) -> None:
                try:
                    res = respond(
                        endpoint.routes,
                        self.path,
                        self.headers.get("Authorization"),
                        endpoint.token,
                        endpoint.public,
                    )
                except Exception:  # a route's bug must not kill the server thread silently
                    log.exception("http: %s failed", self.path)
                    res = Response(
                        500, "text/plain; charset=utf-8", b"500: internal error, see the coordinator log\n"
                    )
                self.send_response(res.status)
                self.send_header("Content-Type", res.content_type)
                self.send_header("Content-Length", str(len(res.body)))
                for name, value in SECURITY_HEADERS:
                    self.send_header(name, value)
                if res.status == 401:
                    self.send_header("WWW-Authenticate", 'Bearer realm="fedbe-coordinator"')
                self.end_headers()
                if send_body:
                    self.wfile.write(res.body)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002 -- the base's name
                log.debug("http %s: " + format, self.address_string(), *args)

        self.routes, self.token, self.public = routes, token, frozenset(public)
        self.server = (_IPv6Server if ":" in host else ThreadingHTTPServer)((host, port), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, name="fedbe-http", daemon=True)

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def start(self) -> HttpEndpoint:
        self.thread.start()
        host = self.server.server_address[0]
        assert isinstance(host, str)  # an AF_INET or AF_INET6 address
        url = f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"
        log.info("serving %s on %s%s", ", ".join(sorted(self.routes)), url,
                 " (bearer token required: open the dashboard as /#token=TOKEN)" if self.token else "")  # fmt: skip
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
