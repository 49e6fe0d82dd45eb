"""The state directory: snapshots survive crashes, corruption, a full disk; pending updates; the lock."""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import coordinator.checkpoint as checkpoint
from coordinator.checkpoint import (
    CheckpointError,
    CheckpointStore,
    ServerOptimizerState,
    Snapshot,
    rng_state_from_json,
    rng_state_to_json,
)
from fedbe.blocks import BlockState, get_block_state
from fedbe.expansion import expand_model, plan_expansion
from fedbe.sources import build_tiny_model

_MODEL = build_tiny_model("llama")
REGISTRY = expand_model(_MODEL, plan_expansion(4, 2, "interleave"))
REAL_STATE = get_block_state(_MODEL, REGISTRY)  # the real parameter names and shapes of two llama blocks
del _MODEL


def state(seed: int, scale: float = 1.0) -> BlockState:
    g = torch.Generator().manual_seed(seed)
    return {
        b: {n: torch.randn(t.shape, generator=g) * scale for n, t in ts.items()}
        for b, ts in REAL_STATE.items()
    }


def snapshot(round: int, seed: int | None = None, **changes: object) -> Snapshot:
    fields: dict[str, object] = dict(
        round=round,
        global_state=state(round if seed is None else seed),
        expansion=REGISTRY.to_dict(),
        base_fingerprint="llama-4L-0123456789abcdef",
        model_source="tiny:llama",
        config_digest="feedfacecafebeef",
    )
    fields.update(changes)
    return Snapshot(**fields)  # type: ignore[arg-type]


def assert_same_state(a: BlockState, b: BlockState) -> None:
    assert set(a) == set(b)
    for block_id in a:
        assert set(a[block_id]) == set(b[block_id])
        for name in a[block_id]:
            assert torch.equal(a[block_id][name], b[block_id][name]), (block_id, name)


def test_fresh_dir_has_no_snapshot(tmp_path: Path) -> None:
    assert CheckpointStore(tmp_path / "new").load_latest() is None


def test_round_trip(tmp_path: Path) -> None:
    rng = random.Random(42)
    rng.random()
    opt = ServerOptimizerState(tensors={"m": state(7), "v": state(8, 0.01)}, scalars={"step": 3, "lr": 0.5})
    original = snapshot(
        3,
        clients={"edge-1": {"rounds": [1, 2], "label_histogram": [3, 0, 1]}, "edge-2": {"rounds": []}},
        rng_state=rng_state_to_json(rng.getstate()),
        server_optimizer_state=opt,
        last_trained={0: 3, 1: 2},
    )
    json.dumps(original.rng_state)  # JSON-able
    store = CheckpointStore(tmp_path)
    folder = store.save(original)
    assert folder == tmp_path / "round-000003"
    assert (tmp_path / "LATEST").read_text() == "round-000003\n"
    loaded = CheckpointStore(tmp_path).load_latest()  # a new store: as after a restart
    assert loaded is not None
    assert loaded.round == 3
    assert_same_state(loaded.global_state, original.global_state)
    assert loaded.expansion == REGISTRY.to_dict() and loaded.registry == REGISTRY
    assert (loaded.base_fingerprint, loaded.model_source, loaded.config_digest) == (
        original.base_fingerprint,
        "tiny:llama",
        "feedfacecafebeef",
    )
    assert loaded.clients == original.clients
    assert loaded.last_trained == {0: 3, 1: 2}
    assert set(loaded.server_optimizer_state.tensors) == {"m", "v"}
    for slot in ("m", "v"):
        assert_same_state(loaded.server_optimizer_state.tensors[slot], opt.tensors[slot])
    assert loaded.server_optimizer_state.scalars == {"step": 3, "lr": 0.5}
    restored = random.Random()
    restored.setstate(rng_state_from_json(loaded.rng_state))  # type: ignore[arg-type]
    assert [restored.random() for _ in range(3)] == [rng.random() for _ in range(3)]


def test_snapshots_only_move_forward_and_must_match_the_expansion(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    store.save(snapshot(2))
    with pytest.raises(CheckpointError, match="round 2 is not after the last saved round 2"):
        store.save(snapshot(2))
    with pytest.raises(CheckpointError, match=r"global state has blocks \[0\], the expansion \[0, 1\]"):
        store.save(snapshot(3, global_state={0: state(1)[0]}))
    with pytest.raises(CheckpointError, match="JSON can not store"):
        store.save(snapshot(3, clients={"edge-1": object()}))
    assert not list(tmp_path.glob(".tmp-*"))


def test_crash_mid_save_keeps_the_previous_snapshot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = CheckpointStore(tmp_path)
    store.save(snapshot(1))
    real_write = checkpoint._write_file

    def crash_after_the_tensors(path: Path, data: bytes) -> None:
        if path.name == checkpoint.SNAPSHOT_JSON:  # the tensor files are already written
            real_write(path, data[: len(data) // 2])
            raise RuntimeError("simulated crash")
        real_write(path, data)

    monkeypatch.setattr(checkpoint, "_write_file", crash_after_the_tensors)
    with pytest.raises(RuntimeError, match="simulated crash"):
        store.save(snapshot(2))
    monkeypatch.undo()
    loaded = CheckpointStore(tmp_path).load_latest()
    assert loaded is not None and loaded.round == 1
    assert_same_state(loaded.global_state, state(1))
    assert not (tmp_path / "round-000002").exists() and not list(tmp_path.glob(".tmp-*"))


def test_leftovers_of_a_killed_save_are_ignored_then_replaced(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = CheckpointStore(tmp_path)
    store.save(snapshot(1))
    # A process killed mid-save leaves a temporary folder; one killed between rename and commit
    # leaves a complete folder that LATEST does not name yet.
    (tmp_path / ".tmp-round-000002-dead").mkdir()
    (tmp_path / ".tmp-round-000002-dead" / "global.safetensors").write_bytes(b"\x00" * 10)
    store.save(snapshot(2))
    (tmp_path / "LATEST").write_text("round-000001\n")
    with caplog.at_level(logging.WARNING, logger="coordinator.checkpoint"):
        loaded = CheckpointStore(tmp_path).load_latest()
    assert loaded is not None and loaded.round == 1
    assert "uncommitted" in caplog.text
    store.save(snapshot(2, seed=99))
    loaded = store.load_latest()
    assert loaded is not None and loaded.round == 2
    assert_same_state(loaded.global_state, state(99))
    assert not list(tmp_path.glob(".tmp-*"))


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda f: _flip_a_byte(f / "global.safetensors"), "sha256"),
        (lambda f: (f / "global.safetensors").unlink(), "global.safetensors"),
        (lambda f: (f / "snapshot.json").write_text('{"format": 1, "round"'), "snapshot"),
        (lambda f: (f / "snapshot.json").write_text('{"format": 99}'), "format-1"),
    ],
    ids=["bit-flip", "missing-tensors", "truncated-json", "unknown-format"],
)
def test_corrupt_latest_falls_back_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: object, reason: str
) -> None:
    store = CheckpointStore(tmp_path)
    store.save(snapshot(1))
    store.save(snapshot(2))
    damage(tmp_path / "round-000002")  # type: ignore[operator]
    with caplog.at_level(logging.WARNING, logger="coordinator.checkpoint"):
        loaded = store.load_latest()
    assert loaded is not None and loaded.round == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("round-000002" in w and reason in w for w in warnings), warnings


def test_nothing_usable_is_an_error_not_a_fresh_start(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    store.save(snapshot(1))
    _flip_a_byte(tmp_path / "round-000001" / "global.safetensors")
    with pytest.raises(CheckpointError, match=r"no usable snapshot in .*round-000001: .*sha256"):
        store.load_latest()


@pytest.mark.parametrize("keep", [1, 2, 3])
def test_keeps_the_newest_snapshots(tmp_path: Path, keep: int) -> None:
    store = CheckpointStore(tmp_path, keep=keep)
    for r in range(1, 5):
        store.save(snapshot(r))
    kept = sorted(p.name for p in tmp_path.glob("round-*"))
    assert kept == [f"round-{r:06d}" for r in range(5 - keep, 5)]
    loaded = store.load_latest()
    assert loaded is not None and loaded.round == 4


def test_the_open_rounds_plan_is_kept_until_its_snapshot_is_committed(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "state")
    assert store.round_plan(3) is None
    store.save_round_plan(3, {"plan": {"round": 3}, "rng_state": [3, [1, 2], None]})
    store.save_pending_update(3, "edge-1", b"frame")
    restarted = CheckpointStore(tmp_path / "state")
    assert restarted.round_plan(3) == {"plan": {"round": 3}, "rng_state": [3, [1, 2], None]}
    assert restarted.pending_updates(3) == {"edge-1": b"frame"}  # the plan is not taken for an update
    (tmp_path / "state" / "pending" / "round-000003" / "plan.json").write_text("{cut off")
    assert restarted.round_plan(3) is None  # unreadable: the round is planned again
    restarted.clear_pending(3)
    assert restarted.round_plan(3) is None


def test_pending_updates_are_persisted_and_cleared(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    store.save_pending_update(3, "edge-1", b"frame-1")
    store.save_pending_update(3, "edge.2", b"\x00frame-2")
    store.save_pending_update(3, "edge-1", b"frame-1-again")  # a re-sent update replaces the first
    store.save_pending_update(4, "edge-1", b"next")
    restarted = CheckpointStore(tmp_path)
    assert restarted.pending_updates(3) == {"edge-1": b"frame-1-again", "edge.2": b"\x00frame-2"}
    assert restarted.pending_updates(5) == {}
    restarted.clear_pending(3)
    assert restarted.pending_updates(3) == {} and restarted.pending_updates(4) == {"edge-1": b"next"}
    restarted.save(snapshot(4))  # committing round 4 clears what it covers
    assert restarted.pending_updates(4) == {}
    with pytest.raises(CheckpointError, match="client '../evil'"):
        store.save_pending_update(5, "../evil", b"x")


def test_metrics_are_appended_as_json_lines(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "run")
    store.append_metrics({"round": 1, "loss": 2.5, "clients": ["a", "b"]})
    store.append_metrics({"round": 2, "loss": float("nan"), "grad": [float("inf"), 1.0]})
    with open(tmp_path / "run" / "metrics.jsonl", "a") as f:
        f.write('{"round": 3, "lo')  # a line cut off by a crash
    store.append_metrics({"round": 3, "loss": 1.0})  # the restarted coordinator goes on
    assert store.read_metrics() == [
        {"round": 1, "loss": 2.5, "clients": ["a", "b"]},
        {"round": 2, "loss": None, "grad": [None, 1.0]},
        {"round": 3, "loss": 1.0},
    ]
    with pytest.raises(CheckpointError, match="not JSON-serializable"):
        store.append_metrics({"x": object()})


def _assert_failed_cleanly(
    store: CheckpointStore, exc: pytest.ExceptionInfo[CheckpointError], cause: str
) -> None:
    message = str(exc.value)
    assert cause in message and str(store.state_dir) in message
    assert "To fix:" in message and "round 1) is intact" in message
    loaded = store.load_latest()
    assert loaded is not None and loaded.round == 1
    assert_same_state(loaded.global_state, state(1))
    assert not list(store.state_dir.glob(".tmp-*")) and not (store.state_dir / "round-000002").exists()


@pytest.mark.parametrize("fail_on", ["global.safetensors", "snapshot.json", "LATEST"])
def test_disk_full_mid_save(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fail_on: str) -> None:
    store = CheckpointStore(tmp_path, keep=1)  # keep=1: the old snapshot must outlive the new one's commit
    store.save(snapshot(1))
    real_write, real_save = checkpoint._write_file, checkpoint.save_block_state

    def half_then_full(path: Path, data: bytes) -> None:
        if fail_on in path.name:  # LATEST is written as a temporary sibling, then renamed
            real_write(path, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real_write(path, data)

    def safetensors_disk_full(state: BlockState, path: Path) -> None:
        if Path(path).name == fail_on:  # what safetensors raises: its own error type, errno in the text
            raise type("SafetensorError", (Exception,), {})(
                "Error while serializing: I/O error: No space left on device (os error 28)"
            )
        real_save(state, path)

    monkeypatch.setattr(checkpoint, "_write_file", half_then_full)
    monkeypatch.setattr(checkpoint, "save_block_state", safetensors_disk_full)
    with pytest.raises(CheckpointError) as caught:
        store.save(snapshot(2))
    monkeypatch.undo()
    _assert_failed_cleanly(store, caught, "the disk is full")


def test_unwritable_state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = CheckpointStore(tmp_path)
    store.save(snapshot(1))
    if os.geteuid() != 0:
        tmp_path.chmod(0o500)
    else:  # root ignores the mode bits: make the folder refuse new entries as the kernel would

        def refuse(self: Path, *args: object, **kwargs: object) -> None:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))

        monkeypatch.setattr(Path, "mkdir", refuse)
    try:
        with pytest.raises(CheckpointError) as caught:
            store.save(snapshot(2))
    finally:
        tmp_path.chmod(0o700)
        monkeypatch.undo()
    _assert_failed_cleanly(store, caught, "permission denied")


@pytest.fixture
def tiny_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A real 2 MiB file system (needs root and mount rights; skipped otherwise)."""
    mount_point = tmp_path / f"fs-{uuid.uuid4().hex[:6]}"
    mount_point.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount_point)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"can not mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_really_full_disk_and_read_only_file_system(tiny_tmpfs: Path) -> None:
    store = CheckpointStore(tiny_tmpfs / "state", keep=5)
    store.save(snapshot(1))  # two small llama blocks: ~0.2 MB
    big = {b: {n: t.repeat(8, *([1] * (t.dim() - 1))) for n, t in ts.items()} for b, ts in state(2).items()}
    with pytest.raises(CheckpointError) as caught:
        store.save(snapshot(2, global_state=big))  # ~1.7 MB of tensors (plus a copy) does not fit
    _assert_failed_cleanly(store, caught, "the disk is full")
    subprocess.run(["mount", "-o", "remount,ro", str(tiny_tmpfs)], check=True)
    with pytest.raises(CheckpointError) as caught:
        store.save(snapshot(2))
    assert "read-only" in str(caught.value)
    loaded = store.load_latest()
    assert loaded is not None and loaded.round == 1


def test_lock_keeps_a_second_coordinator_out(tmp_path: Path) -> None:
    first, second = CheckpointStore(tmp_path / "run"), CheckpointStore(tmp_path / "run")
    with first.lock():
        assert f"pid {os.getpid()}" in (tmp_path / "run" / "LOCK").read_text()
        with pytest.raises(CheckpointError, match=rf"in use by another coordinator \(pid {os.getpid()} on "):
            second.lock()
        first.lock()  # re-entrant for the holder
    with second, pytest.raises(CheckpointError, match="in use"):  # released: now the second one has it
        CheckpointStore(tmp_path / "run").lock()


def test_the_privacy_history_is_saved_and_gives_the_same_epsilon(tmp_path: Path) -> None:
    from coordinator.privacy import RoundPrivacy, epsilon  # noqa: PLC0415

    history = (RoundPrivacy(0.5, 1.1),) * 4 + (RoundPrivacy(0.25, 1.1),)
    store = CheckpointStore(tmp_path / "state")
    store.save(snapshot(5, privacy_history=history))
    loaded = store.load_latest()
    assert loaded is not None and loaded.privacy_history == history
    assert epsilon(loaded.privacy_history, 1e-5) == epsilon(history, 1e-5)
    store.save(snapshot(6))  # a run without privacy stores none
    loaded = store.load_latest()
    assert loaded is not None and loaded.privacy_history == ()
