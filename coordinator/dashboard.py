"""The dashboard: a read-only page at ``/`` that draws ``/status.json`` in the browser.

Three static files shipped with the ``coordinator`` package (``coordinator/web/``): the page, its
script and its style sheet. No framework, no CDN: the page works offline, and the script draws its
charts as inline SVG. Keeping the script in a file of its own lets the server forbid inline script
(:data:`coordinator.http_endpoint.SECURITY_HEADERS`), so a client id or a rejection reason that a
device sent can never run as code; the script inserts every such string as text as well.

The files hold no data, so they are :data:`PUBLIC`: a browser opens the page without a token. With
a token, the page takes it once from the URL's fragment (``/#token=TOKEN``, which a browser never
sends to a server, so it lands in no log), keeps it in the tab's ``sessionStorage`` and sends it as
``Authorization: Bearer`` with each fetch of ``/status.json``.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import resources

from coordinator.http_endpoint import Response

# path -> (file in coordinator/web/, content type)
FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/dashboard.js": ("dashboard.js", "text/javascript; charset=utf-8"),
    "/dashboard.css": ("dashboard.css", "text/css; charset=utf-8"),
}
PUBLIC = frozenset(FILES)


def dashboard_routes() -> dict[str, Callable[[], Response]]:
    """The dashboard's routes, its files read once (a missing file is a broken install: it raises)."""
    web = resources.files("coordinator") / "web"
    return {
        path: _constant(Response(200, content_type, (web / name).read_bytes()))
        for path, (name, content_type) in FILES.items()
    }


def _constant(response: Response) -> Callable[[], Response]:
    return lambda: response
