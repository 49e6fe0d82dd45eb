"""``fedbe-coordinator status``: the fleet's live state, from ``state_dir/status.json`` or the HTTP endpoint.

Reading is I/O at the edge (:func:`read_state`, :func:`read_url`); whether the coordinator is alive
(:func:`liveness`) and the table (:func:`render`) are pure functions of the document
(:mod:`coordinator.fleet_status` describes it) and the time. Light on imports on purpose: the command
runs on an operator's laptop and in scripts, and ``--help`` must be instant.

Exit status: 0 the coordinator is running; 3 it is not (finished, stopped, or its document is stale);
1 there is no document to read.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from fedbe.console import read_secret
from fedbe.errors import FedbeError

STALE_AFTER_HEARTBEATS = 3  # a heartbeat older than this many periods: the coordinator is gone
NOT_RUNNING = 3
TABLE_ROUNDS = 5  # the document keeps more (the dashboard charts them); a terminal shows the last few


class StatusUnavailable(FedbeError):
    """There is no status document to show (no file, no endpoint, refused)."""


def add_status_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    st = sub.add_parser(
        "status",
        help="show the fleet: devices, the open round's progress, recent rounds",
        description="Show what the coordinator reports about its fleet: each device (profile, kind, precision, "
        "online or offline and since when, its blocks this round, its last update's fate), the open round's "
        "progress and the last rounds' accuracy and retention. Reads STATE/status.json (written by a running "
        "coordinator) or the coordinator's HTTP endpoint (the run config's http section). Exit status 0: the "
        "coordinator runs; 3: it does not (finished, stopped, or stale: no heartbeat); 1: nothing to read.",
    )
    source = st.add_mutually_exclusive_group(required=True)
    source.add_argument("--state", type=Path, metavar="DIR", help="the run's state directory")
    source.add_argument("--url", metavar="http://HOST:PORT", help="the coordinator's HTTP endpoint")
    st.add_argument("--token-file", type=Path, help="file whose first line is the endpoint's bearer token")
    st.add_argument("--json", action="store_true", help="print the status document as JSON")
    st.add_argument("--watch", type=float, nargs="?", const=2.0, metavar="SECONDS",
                    help="refresh every SECONDS (default 2) until Ctrl-C")  # fmt: skip


def read_state(state_dir: Path) -> dict[str, Any]:
    path = state_dir / "status.json"
    try:
        return _document(json.loads(path.read_text(encoding="utf-8")), str(path))
    except FileNotFoundError:
        raise StatusUnavailable(f"{path} does not exist: no coordinator has run with state_dir {state_dir} "
                                "since status reporting came in (or the path is wrong)") from None  # fmt: skip
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise StatusUnavailable(f"can not read {path}: {exc}") from exc


def read_url(url: str, token: str | None, timeout: float = 10.0) -> dict[str, Any]:
    target = url.rstrip("/") + "/status.json"
    request = urllib.request.Request(target, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as res:  # noqa: S310 -- an operator's URL
            return _document(json.loads(res.read().decode("utf-8")), target)
    except urllib.error.HTTPError as exc:
        hint = " (pass --token-file with the run config's http.token_file)" if exc.code == 401 else ""
        raise StatusUnavailable(f"{target}: HTTP {exc.code} {exc.reason}{hint}") from exc
    except (urllib.error.URLError, OSError) as exc:
        raise StatusUnavailable(f"can not reach {target}: {exc}; is the coordinator running with http.port "
                                "set?") from exc  # fmt: skip
    except ValueError as exc:
        raise StatusUnavailable(f"{target} did not answer a status document: {exc}") from exc


def _document(data: object, where: str) -> dict[str, Any]:
    if not isinstance(data, dict) or data.get("schema") != 1:
        raise StatusUnavailable(f"{where} is not a fedbe status document (schema 1)")
    return data


def read_token(path: Path | None) -> str | None:
    return None if path is None else read_secret(path, "--token-file")


def seconds_since(stamp: str | None, now: float) -> float | None:
    if not stamp:
        return None
    return now - datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def liveness(doc: Mapping[str, Any], now: float, host: str, pid_alive: bool | None) -> tuple[bool, str]:
    """Whether the coordinator that wrote ``doc`` runs, and a sentence saying so. ``pid_alive``: whether
    its pid exists, when it ran on this ``host`` (None elsewhere)."""
    coord = doc.get("coordinator", {})
    state = coord.get("state", "?")
    age = seconds_since(doc.get("heartbeat"), now)
    where = f"pid {coord.get('pid')} on {coord.get('host')}"
    if state in ("finished", "stopped"):
        return False, f"the coordinator {state} (last heartbeat {_ago(age)}; {where})"
    if coord.get("host") == host and pid_alive is False:
        return False, f"NOT RUNNING: {where} is gone (stale status, last heartbeat {_ago(age)})"
    limit = STALE_AFTER_HEARTBEATS * float(doc.get("heartbeat_seconds", 5.0))
    if age is None or age > limit:
        return False, f"STALE: no heartbeat for {_ago(age)} (expected every {doc.get('heartbeat_seconds')} s): " \
                      f"the coordinator ({where}) is not running or can not write"  # fmt: skip
    return True, f"coordinator {state}, {where}, federation {coord.get('federation')}, heartbeat {_ago(age)}"


def _ago(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    return f"{seconds:.0f} s ago" if seconds < 120 else f"{seconds / 60:.0f} min ago"


def _pid_alive(pid: object) -> bool | None:
    if not isinstance(pid, int) or pid <= 0:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # it exists, owned by someone else
        return True
    return True


def _table(headers: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [headers, *rows]]


def _num(value: object, fmt: str = "{:.3f}") -> str:
    return "-" if value is None else fmt.format(value)


def render(doc: Mapping[str, Any], now: float, verdict: str) -> str:
    """The readable view: a line on the coordinator, the devices, the round, the recent rounds."""
    lines = [verdict, ""]
    devices = []
    for d in doc.get("devices", []):
        fate = d.get("last_update")
        fate_text = "-" if fate is None else f"r{fate['round']} {fate['fate']}" + (
            f" ({fate['code']})" if fate.get("code") else "")  # fmt: skip
        since = seconds_since(d.get("since"), now)
        devices.append([
            d["id"], d.get("profile") or "-", d.get("device_kind") or "-", d.get("precision") or "-",
            d["state"] + ("" if since is None else f" {_ago(since).removesuffix(' ago')}"),
            _num(d.get("last_round"), "{}"), ",".join(map(str, d.get("blocks", []))) or "-", fate_text,
        ])  # fmt: skip
    online = sum(1 for d in doc.get("devices", []) if d["state"] == "online")
    lines.append(f"DEVICES ({online} online of {len(devices)})")
    lines += _table(["ID", "PROFILE", "KIND", "PRECISION", "STATE (FOR)", "LAST ROUND", "BLOCKS", "LAST UPDATE"],
                    devices)  # fmt: skip
    r = doc.get("round", {})
    deadline = r.get("seconds_to_deadline")
    lines += ["", f"ROUND {r.get('number')}/{r.get('of')}: {r.get('phase')}, {r.get('arrived')}/{r.get('expected')} "
              f"updates arrived, {r.get('errors')} errors, {r.get('rejected')} rejected"
              + ("" if deadline is None else f", {deadline:.0f} s to the deadline")]  # fmt: skip
    rounds = [
        [str(x["round"]), x.get("closed_by", ""), f"{x.get('seconds', 0):.1f}", str(x.get("accepted")),
         str(x.get("rejected")), str(x.get("errors")), _num(x.get("accuracy")) + (
             f" ({x['accuracy_source']})" if x.get("accuracy_source") else ""),
         " ".join(f"{k} {v:.3f}" for k, v in (x.get("retention") or {}).items()) or "-", _num(x.get("epsilon"))]
        for x in doc.get("recent_rounds", [])[-TABLE_ROUNDS:]
    ]  # fmt: skip
    lines += ["", "RECENT ROUNDS"]
    lines += _table(["ROUND", "CLOSED BY", "SECONDS", "ACCEPTED", "REJECTED", "ERRORS", "ACCURACY", "RETENTION",
                     "EPSILON"], rounds)  # fmt: skip
    return "\n".join(lines)


def cmd_status(args: argparse.Namespace) -> int:
    token = read_token(args.token_file)
    while True:
        try:
            doc = read_state(args.state) if args.state is not None else read_url(args.url, token)
        except StatusUnavailable as exc:
            if args.watch is None:
                raise
            doc, code = None, 1
            print(f"\x1b[H\x1b[2J{exc}", flush=True)
        if doc is not None:
            now = time.time()
            coord = doc.get("coordinator", {})
            here = coord.get("host") == socket.gethostname()
            alive, verdict = liveness(
                doc, now, socket.gethostname(), _pid_alive(coord.get("pid")) if here else None
            )
            code = 0 if alive else NOT_RUNNING
            if args.json:
                print(json.dumps({**doc, "running": alive, "verdict": verdict}, indent=1), flush=True)
            else:
                print(
                    ("\x1b[H\x1b[2J" if args.watch is not None else "") + render(doc, now, verdict),
                    flush=True,
                )
        if args.watch is None:
            return code
        try:
            time.sleep(max(args.watch, 0.2))
        except KeyboardInterrupt:
            return code
