"""The coordinator's crash-safe state directory: snapshots, pending updates, metrics and a lock.

Layout of ``state_dir``::

    LOCK                    flock'ed by the running coordinator (pid and host inside)
    LATEST                  name of the last committed snapshot, e.g. "round-000012"
    round-000011/           older snapshots, pruned down to ``keep``
    round-000012/
        snapshot.json       round, expansion, fingerprint, model source, config digest, clients,
                            rng state, last_trained, optimizer scalars, the privacy history,
                            sha256 of every tensor file
        global.safetensors  the global new-block state (fedbe.blocks.save_block_state)
        optimizer-<slot>.safetensors   one per server-optimizer tensor slot (e.g. momentum)
    pending/round-000013/<client id>.frame   raw frames of accepted updates of the open round
    pending/round-000013/plan.json           the open round's plan (its clients and their blocks)
    metrics.jsonl           one JSON object per line
    baseline.json           the base model's server-side scores (server_eval.baseline), written once

What is guaranteed (on a POSIX file system that honours fsync and rename):

* **A snapshot is all or nothing.** :meth:`CheckpointStore.save` writes into a temporary sibling
  folder, fsyncs every file and the folder, renames it into place, fsyncs ``state_dir``, and only
  then commits by replacing ``LATEST`` atomically. Nothing older is deleted or overwritten before
  the new snapshot is committed; a crash or error at any point leaves the last committed snapshot
  loadable. A folder newer than ``LATEST`` (crash between rename and commit) is ignored.
* **A crash between rounds loses nothing**: the round's snapshot was committed before the next
  round began.
* **An accepted update is on disk before it counts**: the coordinator calls
  :meth:`~CheckpointStore.save_pending_update` (atomic write + fsync) before it counts the update.
  After a crash mid-round the restarted coordinator reads :meth:`~CheckpointStore.pending_updates`
  for the round after the last snapshot and re-uses them; pending updates up to a round are
  removed only after that round's snapshot is committed.
* **A resumed round keeps its plan**: :meth:`~CheckpointStore.save_round_plan` writes the open
  round's plan before its tasks go out, and the restarted coordinator reads it back
  (:meth:`~CheckpointStore.round_plan`) instead of planning the round again, so every client that
  was given a task can still deliver it.
* **A corrupt snapshot is detected** (sha256 of every tensor file, strict JSON and layout checks);
  :meth:`~CheckpointStore.load_latest` then falls back to the previous one with a WARNING.
* Disk full, permission denied or a read-only file system raise :class:`CheckpointError` naming
  the path, the cause and what to do; the last good snapshot stays intact.
* :meth:`~CheckpointStore.lock` (``fcntl.flock``) keeps a second coordinator off the same folder
  (on local file systems; NFS may not honour it).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import math
import os
import re
import shutil
import socket
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from coordinator.privacy import RoundPrivacy, history_from_json, history_to_json
from fedbe.blocks import load_block_state, save_block_state
from fedbe.compression import BlockState
from fedbe.errors import ConfigError, FedbeError
from fedbe.expansion import BlockRegistry
from fedbe.protocol import check_name

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
LATEST_FILE, LOCK_FILE, METRICS_FILE, PENDING_DIR = "LATEST", "LOCK", "metrics.jsonl", "pending"
PLAN_FILE = "plan.json"
BASELINE_FILE = "baseline.json"
SNAPSHOT_JSON, GLOBAL_FILE = "snapshot.json", "global.safetensors"
_ROUND_DIR = re.compile(r"^round-(\d{6,})$")
_SLOT = re.compile(r"^[A-Za-z0-9_]{1,64}$")
_WRITABLE = "make the folder writable for this user or choose another state_dir"
_ERRNO_ADVICE = {
    errno.ENOSPC: ("the disk is full", "free space there or move state_dir to a larger disk"),
    errno.EDQUOT: ("the disk quota is exhausted", "free space there or raise the quota"),
    errno.EACCES: ("permission denied", _WRITABLE),
    errno.EPERM: ("operation not permitted", _WRITABLE),
    errno.EROFS: ("the file system is read-only", "remount it read-write or choose another state_dir"),
}


class CheckpointError(FedbeError):
    """The state directory can not be written or read, or holds no usable snapshot."""


@dataclass(frozen=True, eq=False)
class ServerOptimizerState:
    """A server optimizer's state: named tensor slots (e.g. ``momentum``, ``m``, ``v``) and scalars."""

    tensors: dict[str, BlockState] = field(default_factory=dict)
    scalars: dict[str, float | int] = field(default_factory=dict)


@dataclass(frozen=True, eq=False)
class Snapshot:
    """Everything needed to continue a run after ``round`` (the last completed round; 0 = none yet).

    ``expansion`` is :meth:`BlockRegistry.to_dict`; ``clients`` and ``rng_state`` are JSON values
    the coordinator owns (see :func:`rng_state_to_json`); ``last_trained`` maps block id -> the
    last round in which the block was updated; ``privacy_history`` is each differentially private
    round's sampling rate and noise multiplier, what the accountant composes, so epsilon after a
    resume is what it would have been without one.
    """

    round: int
    global_state: BlockState
    expansion: dict[str, object]
    base_fingerprint: str
    model_source: str
    config_digest: str
    clients: dict[str, object] = field(default_factory=dict)
    rng_state: object = None
    server_optimizer_state: ServerOptimizerState = field(default_factory=ServerOptimizerState)
    last_trained: dict[int, int] = field(default_factory=dict)
    privacy_history: tuple[RoundPrivacy, ...] = ()

    @property
    def registry(self) -> BlockRegistry:
        return BlockRegistry.from_dict(self.expansion)


def rng_state_to_json(state: object) -> object:
    """``random.Random.getstate()`` (nested tuples) as JSON-able nested lists."""
    return [rng_state_to_json(x) for x in state] if isinstance(state, tuple | list) else state


def rng_state_from_json(data: object) -> object:
    """The inverse of :func:`rng_state_to_json`, ready for ``random.Random.setstate``."""
    return tuple(rng_state_from_json(x) for x in data) if isinstance(data, list) else data


class CheckpointStore:
    """One run's state directory (see the module docstring). Keeps the newest ``keep`` snapshots."""

    def __init__(self, state_dir: str | Path, keep: int = 2) -> None:
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ValueError(f"keep must be a whole number >= 1, got {keep!r}")
        self.state_dir = Path(state_dir)
        self.keep = keep
        self._lock_fd: int | None = None

    # -- lock -----------------------------------------------------------------------------------
    def lock(self) -> CheckpointStore:
        """Take the exclusive lock on the state dir (``with store.lock(): ...`` releases it)."""
        if self._lock_fd is not None:
            return self
        path = self.state_dir / LOCK_FILE
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise _io_error(exc, "lock", path, None) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "unknown"
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EACCES):
                raise CheckpointError(
                    f"state dir {self.state_dir} is in use by another coordinator ({holder}). Stop that one, "
                    "or give this run its own state_dir."
                ) from exc
            raise _io_error(exc, "lock", path, None) from exc
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self._lock_fd = fd
        return self

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None

    def __enter__(self) -> CheckpointStore:
        return self.lock()

    def __exit__(self, *exc_info: object) -> None:
        self.unlock()

    # -- snapshots ------------------------------------------------------------------------------
    def committed_round(self) -> int | None:
        """The round ``LATEST`` names (no validation of the snapshot itself); None if there is none."""
        try:
            name = (self.state_dir / LATEST_FILE).read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise _io_error(exc, "read", self.state_dir / LATEST_FILE, None) from exc
        match = _ROUND_DIR.match(name)
        return int(match.group(1)) if match else None

    def save(self, snapshot: Snapshot) -> Path:
        """Write and commit ``snapshot``; prune older ones and the pending updates it covers."""
        _check_snapshot(snapshot)
        committed = self.committed_round()
        if committed is not None and snapshot.round <= committed:
            raise CheckpointError(
                f"round {snapshot.round} is not after the last saved round {committed} in {self.state_dir}; "
                "snapshots only move forward (resume from load_latest())"
            )
        final = self.state_dir / _round_name(snapshot.round)
        tmp = self.state_dir / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            self._remove_stale_tmp()
            tmp.mkdir()
            _write_snapshot_files(tmp, snapshot)
            _fsync_dir(tmp)
            if final.exists():  # an uncommitted leftover of a crash between rename and commit
                shutil.rmtree(final)
            os.rename(tmp, final)
            _fsync_dir(self.state_dir)
            _atomic_write(self.state_dir / LATEST_FILE, f"{final.name}\n".encode())
        except BaseException as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            self._discard_uncommitted(snapshot.round)
            if isinstance(exc, OSError):
                raise _io_error(exc, f"save round {snapshot.round} to", self.state_dir, committed) from exc
            raise
        log.info("saved round %d to %s", snapshot.round, final)
        try:
            self._prune(snapshot.round)
            self.clear_pending(snapshot.round)
        except (OSError, CheckpointError) as exc:  # the snapshot is committed; leftovers are harmless
            log.warning(
                "round %d is saved, but cleaning up %s failed: %s", snapshot.round, self.state_dir, exc
            )
        return final

    def load_latest(self) -> Snapshot | None:
        """The last committed snapshot; an older one (with a WARNING) if it is corrupt; None if fresh."""
        committed = self.committed_round()
        rounds = sorted((r for r in self._round_dirs() if committed is None or r <= committed), reverse=True)
        if committed is None and not (self.state_dir / LATEST_FILE).exists() and not rounds:
            return None
        newer = [r for r in self._round_dirs() if committed is not None and r > committed]
        if newer:
            log.warning("ignoring uncommitted snapshot(s) %s in %s (after LATEST)", newer, self.state_dir)
        if committed is None:
            log.warning("%s has no valid %s; trying the snapshots present", self.state_dir, LATEST_FILE)
        elif committed not in rounds:
            log.warning("%s names %s, which is missing", LATEST_FILE, _round_name(committed))
        problems: list[str] = []
        for r in rounds:
            folder = self.state_dir / _round_name(r)
            try:
                return _read_snapshot(folder, r)
            except (OSError, ValueError, KeyError, TypeError, AttributeError, FedbeError) as exc:
                problems.append(f"{folder.name}: {exc}")
                log.warning("snapshot %s is unusable (%s); falling back to an older one", folder, exc)
        raise CheckpointError(
            f"no usable snapshot in {self.state_dir}: {'; '.join(problems) or 'none found'}. Restore the folder "
            "from a backup, or start the run afresh with an empty state_dir."
        )

    # -- pending updates of the open round ------------------------------------------------------
    def save_pending_update(self, round: int, client_id: str, frame: bytes) -> None:
        """Persist an accepted update's raw frame (atomic, fsynced) before the coordinator counts it."""
        path = self._pending_dir(round) / f"{_client_file(client_id)}.frame"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            _atomic_write(path, bytes(frame))
        except OSError as exc:
            raise _io_error(exc, f"save the update of {client_id} for round {round} to", path, None) from exc

    def pending_updates(self, round: int) -> dict[str, bytes]:
        """Client id -> raw frame of every update persisted for ``round``."""
        folder = self._pending_dir(round)
        try:
            return {p.stem: p.read_bytes() for p in sorted(folder.glob("*.frame"))}
        except OSError as exc:
            raise _io_error(exc, "read pending updates in", folder, None) from exc

    def save_round_plan(self, round: int, record: Mapping[str, object]) -> None:
        """Persist the plan of the open ``round`` (atomic, fsynced); it goes with the round's pending
        updates once the round's snapshot is committed."""
        path = self._pending_dir(round) / PLAN_FILE
        try:
            data = json.dumps(record, sort_keys=True).encode("utf-8")
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"the plan of round {round} is not JSON-serializable: {exc}") from exc
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            _atomic_write(path, data)
        except OSError as exc:
            raise _io_error(exc, f"save the plan of round {round} to", path, None) from exc

    def round_plan(self, round: int) -> dict[str, object] | None:
        """The plan saved for ``round``; None when there is none or it is unreadable (with a WARNING:
        the round is then planned again)."""
        path = self._pending_dir(round) / PLAN_FILE
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("ignoring the unreadable plan %s (%s); round %d is planned again", path, exc, round)
            return None
        return data if isinstance(data, dict) else None

    def clear_pending(self, up_to_round: int) -> None:
        """Remove the pending updates of every round <= ``up_to_round``."""
        base = self.state_dir / PENDING_DIR
        for folder in base.glob("round-*") if base.is_dir() else ():
            match = _ROUND_DIR.match(folder.name)
            if match and int(match.group(1)) <= up_to_round:
                shutil.rmtree(folder)

    # -- metrics --------------------------------------------------------------------------------
    def append_metrics(self, record: Mapping[str, object]) -> None:
        """Append one JSON line to ``metrics.jsonl`` (flushed and fsynced; NaN/inf become null)."""
        try:
            line = json.dumps(_finite(record), sort_keys=True, allow_nan=False) + "\n"
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"metrics record is not JSON-serializable: {exc}") from exc
        path = self.state_dir / METRICS_FILE
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            with open(path, "a+b") as f:
                end = f.seek(0, os.SEEK_END)
                if end and os.pread(f.fileno(), 1, end - 1) != b"\n":  # a line cut off by a crash
                    line = "\n" + line
                f.write(line.encode("utf-8"))
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            raise _io_error(exc, "append metrics to", path, None) from exc

    def save_baseline(self, record: Mapping[str, object]) -> None:
        """Write the base model's evaluation (atomically; NaN/inf become null)."""
        path = self.state_dir / BASELINE_FILE
        try:
            data = json.dumps(_finite(record), sort_keys=True, allow_nan=False, indent=1).encode("utf-8")
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"baseline record is not JSON-serializable: {exc}") from exc
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            _atomic_write(path, data)
        except OSError as exc:
            raise _io_error(exc, "write", path, None) from exc

    def load_baseline(self) -> dict[str, object] | None:
        """The saved base-model evaluation, or None when there is none (or it is unreadable)."""
        path = self.state_dir / BASELINE_FILE
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable %s (%s); the base model is scored again", path, exc)
            return None
        return data if isinstance(data, dict) else None

    def read_metrics(self) -> list[dict[str, object]]:
        """Every complete record of ``metrics.jsonl`` (a line cut off by a crash is skipped)."""
        path = self.state_dir / METRICS_FILE
        records = []
        for line in path.read_text(encoding="utf-8").splitlines() if path.exists() else []:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                log.warning("skipping a damaged line in %s: %.80r", path, line)
        return records

    # -- internals ------------------------------------------------------------------------------
    def _round_dirs(self) -> list[int]:
        if not self.state_dir.is_dir():
            return []
        return [int(m.group(1)) for p in self.state_dir.iterdir() if (m := _ROUND_DIR.match(p.name))]

    def _pending_dir(self, round: int) -> Path:
        return self.state_dir / PENDING_DIR / _round_name(round)

    def _discard_uncommitted(self, round: int) -> None:
        """After a failed save: remove the round's folder unless ``LATEST`` already names it."""
        try:
            if self.committed_round() != round:
                shutil.rmtree(self.state_dir / _round_name(round), ignore_errors=True)
        except CheckpointError:
            pass  # LATEST unreadable: leave everything as it is

    def _remove_stale_tmp(self) -> None:
        for leftover in self.state_dir.glob(".tmp-round-*"):
            shutil.rmtree(leftover, ignore_errors=True)

    def _prune(self, committed: int) -> None:
        old = sorted((r for r in self._round_dirs() if r <= committed), reverse=True)[self.keep :]
        for r in old:
            shutil.rmtree(self.state_dir / _round_name(r))


# -- snapshot files -----------------------------------------------------------------------------
def _write_snapshot_files(folder: Path, snapshot: Snapshot) -> None:
    record: dict[str, object] = {
        "format": FORMAT_VERSION,
        "round": snapshot.round,
        "base_fingerprint": snapshot.base_fingerprint,
        "model_source": snapshot.model_source,
        "config_digest": snapshot.config_digest,
        "expansion": snapshot.expansion,
        "clients": snapshot.clients,
        "rng_state": snapshot.rng_state,
        "last_trained": {str(b): r for b, r in snapshot.last_trained.items()},
        "optimizer_slots": sorted(snapshot.server_optimizer_state.tensors),
        "optimizer_scalars": snapshot.server_optimizer_state.scalars,
        "privacy_history": history_to_json(snapshot.privacy_history),
    }
    try:
        json.dumps(record, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(
            f"snapshot of round {snapshot.round} holds a value JSON can not store: {exc}"
        ) from exc
    files = {GLOBAL_FILE: snapshot.global_state}
    files.update(
        {f"optimizer-{slot}.safetensors": s for slot, s in snapshot.server_optimizer_state.tensors.items()}
    )
    for name, state in files.items():
        _save_tensors(state, folder / name)
    record["files"] = {name: _sha256(folder / name) for name in files}
    _write_file(folder / SNAPSHOT_JSON, json.dumps(record, sort_keys=True, indent=1).encode("utf-8"))


def _read_snapshot(folder: Path, round: int) -> Snapshot:
    record = json.loads((folder / SNAPSHOT_JSON).read_text(encoding="utf-8"))
    if not isinstance(record, dict) or record.get("format") != FORMAT_VERSION or record["round"] != round:
        raise CheckpointError(f"{SNAPSHOT_JSON} is not a format-{FORMAT_VERSION} record of round {round}")
    for name, digest in record["files"].items():
        if _sha256(folder / name) != digest:
            raise CheckpointError(f"{name} does not match its recorded sha256 (damaged or truncated)")
    slots = record["optimizer_slots"]
    snapshot = Snapshot(
        round=_whole(record["round"], "round"),
        global_state=load_block_state(folder / GLOBAL_FILE),
        expansion=dict(record["expansion"]),
        base_fingerprint=str(record["base_fingerprint"]),
        model_source=str(record["model_source"]),
        config_digest=str(record["config_digest"]),
        clients=dict(record["clients"]),
        rng_state=record["rng_state"],
        server_optimizer_state=ServerOptimizerState(
            tensors={s: load_block_state(folder / f"optimizer-{s}.safetensors") for s in slots},
            scalars=dict(record["optimizer_scalars"]),
        ),
        last_trained={int(b): _whole(r, "last_trained") for b, r in record["last_trained"].items()},
        # a snapshot written before privacy existed ran no private round
        privacy_history=history_from_json(record.get("privacy_history", [])),
    )
    _check_snapshot(snapshot)
    return snapshot


def _check_snapshot(snapshot: Snapshot) -> None:
    if isinstance(snapshot.round, bool) or not isinstance(snapshot.round, int) or snapshot.round < 0:
        raise CheckpointError(f"snapshot round must be a whole number >= 0, got {snapshot.round!r}")
    registry = snapshot.registry  # validates the expansion record
    if set(snapshot.global_state) != set(registry.block_ids):
        raise CheckpointError(
            f"global state has blocks {sorted(snapshot.global_state)}, the expansion {list(registry.block_ids)}"
        )
    bad = [s for s in snapshot.server_optimizer_state.tensors if not _SLOT.match(s)]
    if bad:
        raise CheckpointError(f"optimizer slot names {bad} must be 1-64 letters, digits or '_'")


def _save_tensors(state: BlockState, path: Path) -> None:
    try:
        save_block_state(state, path)
    except OSError:
        raise
    except Exception as exc:  # noqa: BLE001 - safetensors reports I/O failures as SafetensorError
        code = re.search(r"os error (\d+)", str(exc))
        if code:
            raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from exc
        raise CheckpointError(f"could not write tensors to {path}: {exc}") from exc
    _fsync_file(path)


def _whole(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise CheckpointError(f"{what} must be a whole number, got {value!r}")
    return value


def _finite(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _round_name(round: int) -> str:
    return f"round-{round:06d}"


def _client_file(client_id: str) -> str:
    try:
        return check_name(client_id)
    except ConfigError as exc:
        raise CheckpointError(f"can not store an update of client {client_id!r}: {exc}") from exc


# -- durable file primitives --------------------------------------------------------------------
def _write_file(path: Path, data: bytes) -> None:
    """Create/replace ``path`` with ``data`` and fsync it (not atomic: use in a temporary folder)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, data: bytes) -> None:
    """Write a sibling temporary file, fsync it, rename it over ``path``, fsync the folder."""
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        _write_file(tmp, data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _io_error(exc: OSError, action: str, path: Path, committed: int | None) -> CheckpointError:
    """An OSError as a CheckpointError that says where, why (errno in words) and what to do."""
    cause, advice = _ERRNO_ADVICE.get(
        exc.errno or 0, (exc.strerror or str(exc), "check the folder and the disk")
    )
    where = exc.filename or path
    kept = "" if committed is None else f" The last good snapshot (round {committed}) is intact."
    return CheckpointError(f"could not {action} {path}: {cause} ({where}). To fix: {advice}.{kept}")
