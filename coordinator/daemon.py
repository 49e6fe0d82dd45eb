"""The coordinator daemon: rounds over MQTT, with deadlines, durable state and resume.

One round:

1. wait until at least ``min_clients`` eligible clients (online, announced, same base) are known;
2. select up to ``clients_per_round`` of them (seeded RNG, restored on resume);
3. allocate new blocks to them (:mod:`coordinator.allocation`, a pure function);
4. send each client a task with the current weights of exactly its assigned blocks;
5. collect updates until every assigned client answered (update or error) or went offline, or
   the deadline passed with at least ``min_clients`` updates (a client counts as gone once it has
   been offline for ``OFFLINE_GRACE_SECONDS``); each accepted update is written to
   the state directory before it counts, so a crash mid-round loses none;
6. screen the updates (unassigned blocks, shapes, non-finite values, norm outliers) and
   aggregate each block over its trainers (:mod:`coordinator.aggregation`);
7. optionally run federated evaluation; write the snapshot atomically; one metrics line.

All I/O is here; the algorithms are pure functions elsewhere. Messages go through
:mod:`fedbe.protocol`, topics through :class:`fedbe.protocol.Topics`.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import random
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from coordinator.registry import ClientRegistry, check_announce
from fedbe import protocol
from fedbe.blocks import BlockState, block_layout, get_block_state
from fedbe.compression import Level, compress_state, decompress_state
from fedbe.errors import BaseModelMismatchError, CodecError
from fedbe.expansion import BlockRegistry
from fedbe.protocol import ClientTopic, Topics
from fedbe.protocol.messages import MAX_LABELS
from fedbe.transport import Connection

log = logging.getLogger(__name__)

PROVISIONAL_BLOCKS = 6  # blocks: auto measures clients on this many interleaved blocks first
# A round stops waiting for an assigned client once it has been offline this long. Not at once: a
# broker restart fires every client's last will (mosquitto does so even with a will delay), and
# the clients come back within seconds with their updates (paho reconnects after 1, 2, 4 ... s).
OFFLINE_GRACE_SECONDS = 10.0


@dataclass
class RoundLog:
    """What happened in one round (becomes a metrics line)."""

    round: int
    selected: list[str] = field(default_factory=list)
    assignments: dict[str, list[int]] = field(default_factory=dict)
    short_runs: dict[str, int] = field(default_factory=dict)  # client -> steps, where below training.steps
    updates: dict[str, dict[str, Any]] = field(default_factory=dict)
    rejected: list[dict[str, str]] = field(default_factory=list)
    errors: list[dict[str, str]] = field(default_factory=list)
    bytes_down: dict[str, int] = field(default_factory=dict)
    bytes_up: dict[str, int] = field(default_factory=dict)
    blocks: dict[int, dict[str, Any]] = field(default_factory=dict)
    evaluation: dict[str, Any] | None = None
    expansion: dict[str, Any] | None = None  # the blocks: auto decision, in round 1
    server_evaluation: dict[str, Any] | None = None
    seconds: float = 0.0
    closed_by: str = ""


class Inbox:
    """Decodes what arrives and routes it by topic; invalid messages are counted, never fatal."""

    def __init__(self, conn: Connection, topics: Topics) -> None:
        self.conn, self.topics = conn, topics
        self.rejections: dict[str, int] = {}

    def next(self, timeout: float) -> tuple[str, ClientTopic, bytes] | None:
        try:
            topic, payload = self.conn.inbox.get(timeout=max(timeout, 0.0))
        except queue.Empty:
            return None
        parsed = self.topics.parse_client_topic(topic)
        if parsed is None:
            self.count("unexpected_topic")
            return None
        return parsed[0], parsed[1], payload

    def count(self, reason: str) -> None:
        self.rejections[reason] = self.rejections.get(reason, 0) + 1


def encode_weights(
    state: BlockState, block_ids: list[int] | tuple[int, ...], level: Level = Level.FP32
) -> dict[int, Any]:
    compressed, _ = compress_state({b: state[b] for b in block_ids}, level)
    return compressed


class MessagePump:
    """Handles the client-lifecycle messages common to every phase (announce, status)."""

    def __init__(self, inbox: Inbox, clients: ClientRegistry, conn: Connection, topics: Topics) -> None:
        self.inbox, self.clients, self.conn, self.topics = inbox, clients, conn, topics
        self.stashed_updates: list[tuple[str, bytes]] = []  # arrived between rounds: offered to the next

    def handle_lifecycle(self, client_id: str, kind: ClientTopic, payload: bytes) -> bool:
        """True if the message was a lifecycle message (and was handled)."""
        if kind is ClientTopic.ANNOUNCE:
            try:
                msg = protocol.decode(payload, expected_type=protocol.AnnounceMessage)
            except CodecError as exc:
                log.warning("invalid announce from %s: %s", client_id, exc)
                self.inbox.count(f"invalid_announce_{exc.reason}")
                return True
            if msg.client_id != client_id:
                self.inbox.count("announce_for_other_client")
                return True
            problem = check_announce(msg)
            if problem is not None:
                log.warning("refusing the announce of %s: %s", client_id, problem)
                self.inbox.count("malformed_profile")
                self.clients.record(client_id).announce = None  # not eligible until it announces sensibly
                notice = protocol.NoticeMessage(client_id, "refused", f"invalid announce: {problem}")
            else:
                notice = self.clients.on_announce(msg)
            self.conn.publish(self.topics.client(client_id, ClientTopic.NOTICE), protocol.encode(notice))
            return True
        if kind is ClientTopic.STATUS:
            try:
                status = protocol.decode(payload, expected_type=protocol.StatusMessage)
            except CodecError as exc:
                self.inbox.count(f"invalid_status_{exc.reason}")
                return True
            if status.client_id != client_id:
                self.inbox.count("status_for_other_client")
                return True
            self.clients.on_status(client_id, status.state)
            return True
        return False


def wait_for_clients(
    pump: MessagePump, minimum: int, stop: threading.Event, timeout: float | None = None
) -> bool:
    started, last_log = time.monotonic(), 0.0
    while not stop.is_set():
        if len(pump.clients.eligible()) >= minimum:
            return True
        now = time.monotonic()
        if timeout is not None and now - started > timeout:
            return False
        if now - last_log > 10:
            log.info("waiting for clients: %d of %d needed are ready", len(pump.clients.eligible()), minimum)
            last_log = now
        item = pump.inbox.next(0.5)
        if item is None or pump.handle_lifecycle(*item):
            continue
        if item[1] is ClientTopic.UPDATE:  # a late update: the next round decides (drop or fold)
            pump.stashed_updates.append((item[0], item[2]))
        else:
            pump.inbox.count(f"{item[1].value}_outside_round")
    return False


def select_clients(eligible: list[str], per_round: int, rng: random.Random) -> list[str]:
    chosen = list(eligible) if len(eligible) <= per_round else rng.sample(eligible, per_round)
    return sorted(chosen)


def layout_for(model: Any, registry: BlockRegistry) -> dict[int, dict[str, tuple[int, ...]]]:
    return block_layout(model, registry)


def initial_state(model: Any, registry: BlockRegistry) -> BlockState:
    return get_block_state(model, registry)


def decode_update(
    payload: bytes, layout: Any, assigned: tuple[int, ...], max_bytes: int
) -> protocol.UpdateMessage:
    return protocol.decode(
        payload, max_bytes=max_bytes, expected_type=protocol.UpdateMessage, expected_layout=layout,
        allowed_blocks=assigned,
    )  # fmt: skip


def deltas_of(update: protocol.UpdateMessage) -> BlockState:
    return decompress_state(update.blocks)


class RoundCollector:
    """Collects one round's replies until it can close (all answered, or deadline with enough updates)."""

    def __init__(self, round_: int, assignments: dict[str, tuple[int, ...]], layout: Any, max_bytes: int,
                 persist: Any, already: dict[str, bytes], count: Any = None) -> None:  # fmt: skip
        self.round = round_
        self.count = count  # reason -> None: every rejection is counted in the metrics by its reason
        self.assignments = assignments
        self.layout = layout
        self.max_bytes = max_bytes
        self.persist = persist  # (client_id, frame) -> None: durable before the update counts
        self.updates: dict[str, protocol.UpdateMessage] = {}
        self.frames_bytes: dict[str, int] = {}
        self.errors: dict[str, protocol.TaskErrorMessage] = {}
        self.rejected: list[dict[str, str]] = []
        self.late: list[protocol.UpdateMessage] = []
        for client_id, frame in already.items():  # accepted before a restart
            self.offer_update(client_id, frame, persisted=True)

    def pending(self, offline: set[str]) -> set[str]:
        answered = set(self.updates) | set(self.errors)
        return {c for c in self.assignments if c not in answered and c not in offline}

    def reject(self, client_id: str, reason: str, detail: str) -> None:
        self.rejected.append({"client": client_id, "reason": reason, "detail": detail[:300]})
        if self.count is not None:
            self.count(reason)
        log.warning("round %d: rejected update from %s (%s): %s", self.round, client_id, reason, detail)

    def offer_update(self, client_id: str, frame: bytes, persisted: bool = False) -> None:
        assigned = self.assignments.get(client_id)
        if assigned is None:
            try:
                msg = protocol.decode(frame, max_bytes=self.max_bytes, expected_type=protocol.UpdateMessage)
            except CodecError as exc:
                self.reject(client_id, exc.reason, str(exc))
                return
            if msg.round < self.round:
                self.late.append(msg)
                self.reject(client_id, "late", f"update for round {msg.round} arrived in round {self.round}")
            else:
                self.reject(client_id, "unassigned_client", f"{client_id} has no task in round {self.round}")
            return
        try:
            msg = decode_update(frame, self.layout, assigned, self.max_bytes)
        except CodecError as exc:
            self.reject(client_id, exc.reason, str(exc))
            return
        if msg.client_id != client_id:
            self.reject(client_id, "wrong_client", f"update names client {msg.client_id!r}")
        elif msg.round != self.round:
            if msg.round < self.round:
                self.late.append(msg)
            self.reject(client_id, "wrong_round", f"update for round {msg.round}, this is round {self.round}")
        elif client_id in self.updates:
            self.reject(client_id, "duplicate", "a second update for the same round (replay?)")
        elif set(msg.blocks) != set(assigned):
            self.reject(
                client_id, "blocks_mismatch", f"sent blocks {sorted(msg.blocks)}, assigned {list(assigned)}"
            )
        else:
            if not persisted:
                self.persist(client_id, frame)
            self.updates[client_id] = msg
            self.frames_bytes[client_id] = len(frame)

    def offer_error(self, client_id: str, frame: bytes) -> None:
        try:
            msg = protocol.decode(frame, max_bytes=self.max_bytes, expected_type=protocol.TaskErrorMessage)
        except CodecError as exc:
            self.reject(client_id, f"invalid_error_{exc.reason}", str(exc))
            return
        if msg.client_id != client_id:
            self.reject(client_id, "wrong_client", f"task error names client {msg.client_id!r}")
        elif msg.round == self.round and client_id in self.assignments:
            self.errors[client_id] = msg
            log.warning(
                "round %d: %s could not do its task (%s): %s", self.round, client_id, msg.code, msg.reason
            )


class Coordinator:
    """Runs the federation described by a :class:`coordinator.config.RunConfig`."""

    def __init__(self, cfg: Any, conn: Connection, store: Any, stop: threading.Event | None = None) -> None:
        self.cfg, self.conn, self.store = cfg, conn, store
        self.stop = stop or threading.Event()
        self.baseline: dict[str, Any] | None = None  # the base model's server evaluation (round 0)
        self.topics = Topics(cfg.federation)
        self.inbox = Inbox(conn, self.topics)
        self._warned_labels = False  # too many labels for label_balance: warned once

    # -- set-up and resume -------------------------------------------------------------------
    def setup(self) -> None:
        from coordinator import aggregation  # noqa: PLC0415
        from fedbe import expansion, sources  # noqa: PLC0415
        from fedbe.fingerprint import base_fingerprint  # noqa: PLC0415

        cfg = self.cfg
        log.info("loading the base model %s", cfg.model)
        model = sources.load_model(cfg.model)
        self.fingerprint = base_fingerprint(model)
        from coordinator.checkpoint import rng_state_from_json  # noqa: PLC0415
        from coordinator.config import config_digest  # noqa: PLC0415

        self.config_digest = config_digest(cfg)
        if cfg.auto_expansion.plateau_rounds:
            log.info("auto_expansion: a block is added after %d rounds without an accuracy gain of %g",
                     cfg.auto_expansion.plateau_rounds, cfg.auto_expansion.plateau_min_delta)  # fmt: skip
        snapshot = self.store.load_latest()
        if snapshot is not None and snapshot.config_digest != self.config_digest:
            log.warning("the config changed since the state directory was written; resuming with the new one")
        if snapshot is not None:
            if snapshot.base_fingerprint != self.fingerprint:
                raise BaseModelMismatchError(
                    f"the state directory {cfg.state_dir} was written for base model {snapshot.base_fingerprint}, "
                    f"but model {cfg.model} has fingerprint {self.fingerprint}; set model to the base the run "
                    "started with, or use a fresh state_dir to start a new run",
                    found=self.fingerprint, expected=snapshot.base_fingerprint,
                )
            self.registry = BlockRegistry.from_dict(snapshot.expansion)
        else:
            layers = model.config.num_hidden_layers
            self.auto_pending = cfg.blocks == "auto" and isinstance(cfg.placement, str)
            n = min(layers, PROVISIONAL_BLOCKS) if cfg.blocks == "auto" else cfg.blocks
            placement = cfg.placement
            self.registry = expansion.plan_expansion(
                layers, None if isinstance(placement, tuple) else n, placement
            ).registry()
            if self.auto_pending:
                log.info(
                    "blocks: auto — provisional expansion with %d blocks until the clients have announced", n
                )
        self._install_expansion(model)
        self.clients = ClientRegistry(self.fingerprint, cfg.training.labels)
        self.rng = random.Random(cfg.seed)
        self.last_trained: dict[int, int] = {}
        self.server_state: Any = None
        self.expansion_decision: dict[str, Any] | None = None
        if snapshot is not None:
            self.auto_pending = False
            self.global_state = snapshot.global_state
            self.round = snapshot.round
            self.clients = ClientRegistry.from_json(self.fingerprint, dict(snapshot.clients))
            self.rng.setstate(rng_state_from_json(snapshot.rng_state))  # type: ignore[arg-type]
            self.last_trained = {int(k): int(v) for k, v in snapshot.last_trained.items()}
            self.server_state = snapshot.server_optimizer_state
            log.info("resuming after round %d from %s", self.round, self.store.state_dir)
        else:
            self.global_state = initial_state(model, self.registry)
            self.round = 0
        self.server_optimizer = make_server_optimizer(cfg.aggregation)
        self.server_state = _optimizer_state_from_snapshot(self.server_state, aggregation)
        self.pump = MessagePump(self.inbox, self.clients, self.conn, self.topics)
        self.publish_status("starting")

    def _install_expansion(self, model: Any) -> None:
        """Expand ``model`` (an unexpanded base) as ``self.registry`` says and make it current."""
        from fedbe import expansion  # noqa: PLC0415

        plan = expansion.ExpansionPlan(
            self.registry.base_num_layers, tuple(b.source_layer for b in self.registry.blocks)
        )
        expansion.expand_model(model, plan)
        self.model = model
        self.layout = layout_for(model, self.registry)

    def decide_expansion(self) -> None:
        """``blocks: auto``: size the expansion from the announced capacities, once, before round 1.

        N = round(sum of the clients' max trainable blocks / trainers_per_block), clamped to
        [1, min(base layers, auto_expansion.max_blocks)]: enough blocks that, at full capacity,
        each is trained by about ``trainers_per_block`` clients per round.
        """
        from fedbe import expansion, sources  # noqa: PLC0415

        auto = self.cfg.auto_expansion
        eligible = self.clients.eligible()
        capacity = sum(r.max_blocks() for r in eligible)
        layers = self.registry.base_num_layers
        limit = min(layers, auto.max_blocks or layers)
        n = max(1, min(limit, round(capacity / auto.trainers_per_block)))
        reason = (
            f"{len(eligible)} clients can train {capacity} blocks per round in all; "
            f"{capacity} / trainers_per_block {auto.trainers_per_block:g} -> {n} blocks (limit {limit})"
        )
        self.expansion_decision = {"blocks": n, "reason": reason, "placement": self.cfg.placement}
        log.info("blocks: auto decided %d new blocks: %s", n, reason)
        self.auto_pending = False
        if n == len(self.registry.blocks):
            return
        self.registry = expansion.plan_expansion(layers, n, self.cfg.placement).registry()
        self._install_expansion(sources.load_model(self.cfg.model))
        self.global_state = initial_state(self.model, self.registry)
        for rec in self.clients.clients.values():  # capacities were measured on the old expansion
            rec.announce = None
        self.publish_status("starting")

    def maybe_grow(self, round_: int, rlog: RoundLog) -> dict[str, Any] | None:
        """Add one identity-initialised block when the evaluation score has not improved by
        ``plateau_min_delta`` for ``plateau_rounds`` rounds (``auto_expansion``).

        The score is the server-side accuracy when configured, else the federated accuracy. The new
        block is a zeroed copy of a base layer, so the model's function does not change; existing
        blocks keep their weights (renumbered by depth). With ``interleave`` the new block goes after
        the base layer farthest from every existing new block, with ``top`` on top of the stack.
        """
        from fedbe import expansion, sources  # noqa: PLC0415

        auto = self.cfg.auto_expansion
        source = rlog.server_evaluation or rlog.evaluation or {}
        score = source.get("accuracy")
        if not auto.plateau_rounds or score is None:
            return None
        best = getattr(self, "_best", None)
        if best is None or score > best[0] + auto.plateau_min_delta:
            self._best = (float(score), round_)
            return None
        if round_ - best[1] < auto.plateau_rounds:
            return None
        layers = self.registry.base_num_layers
        if len(self.registry.blocks) >= min(layers, auto.max_blocks or layers):
            return None
        after = [b.source_layer for b in self.registry.blocks]
        if self.cfg.placement == "top":
            new_after = layers - 1
        else:
            free = [i for i in range(layers) if i not in after]
            if not free:
                return None
            new_after = max(free, key=lambda i: (min(abs(i - a) for a in after), i))
        old = self.registry
        self.registry = expansion.ExpansionPlan(layers, tuple(sorted([*after, new_after]))).registry()
        self._install_expansion(sources.load_model(self.cfg.model))
        fresh = initial_state(self.model, self.registry)
        # Old blocks map to the new ones by (source layer, order among blocks copied from it).
        new_ids = [b.block_id for b in self.registry.blocks]
        keep = {}
        taken: set[int] = set()
        for block in old.blocks:
            match = next(
                n
                for n in new_ids
                if n not in taken and self.registry.block(n).source_layer == block.source_layer
            )
            taken.add(match)
            keep[block.block_id] = match
        added = next(n for n in new_ids if n not in taken)
        self.global_state = {keep[o]: t for o, t in self.global_state.items()}
        self.global_state[added] = fresh[added]
        self.last_trained = {keep[o]: r for o, r in self.last_trained.items()}
        self.server_state = None  # optimizer buffers were keyed by the old block ids
        for rec in self.clients.clients.values():
            rec.announce = None  # capacities were measured on the old expansion
        self._best = (float(score), round_)
        reason = (
            f"accuracy {score:.3f} has not improved by {auto.plateau_min_delta:g} on {best[0]:.3f} "
            f"(round {best[1]}) for {round_ - best[1]} rounds"
        )
        log.info("adding new block %d after base layer %d: %s", added, new_after, reason)
        self.publish_status("starting")
        return {"blocks": len(self.registry.blocks), "added_block": added, "after_base_layer": new_after,
                "reason": reason}  # fmt: skip

    def publish_status(self, state: str) -> None:
        msg = protocol.CoordinatorStatusMessage(
            state=state, round=self.round, base_fingerprint=self.fingerprint,
            base_num_layers=self.registry.base_num_layers, new_layer_indices=self.registry.new_layer_indices,
            source_layers=tuple(b.source_layer for b in self.registry.blocks),
        )  # fmt: skip
        self.conn.publish(self.topics.coordinator_status(), protocol.encode(msg), retain=True, wait=30)

    # -- the run -------------------------------------------------------------------------------
    def run(self) -> int:
        for kind in (ClientTopic.ANNOUNCE, ClientTopic.STATUS, ClientTopic.UPDATE, ClientTopic.EVAL,
                     ClientTopic.ERROR):  # fmt: skip
            self.conn.subscribe(self.topics.all_clients(kind))
        self.setup()
        if self.cfg.server_eval is not None and self.cfg.server_eval.baseline:
            self.evaluate_baseline()
        while self.round < self.cfg.rounds and not self.stop.is_set():
            if not wait_for_clients(self.pump, self.cfg.min_clients, self.stop):
                break
            if self.auto_pending:
                self.decide_expansion()
                continue
            self.run_round(self.round + 1)
        if self.round >= self.cfg.rounds:
            self.publish_status("finished")
            log.info("federation finished after %d rounds; state in %s", self.round, self.store.state_dir)
            return 0
        self.publish_status("stopped")
        return 130

    def capacities(self, selected: list[str], round_: int) -> list[Any]:
        from coordinator.allocation import ClientCapacity  # noqa: PLC0415

        caps = []
        n = self.registry.num_layers
        for cid in selected:
            rec = self.clients.clients[cid]
            a = rec.announce
            assert a is not None
            forward, backward = rec.step_model(n)
            caps.append(ClientCapacity(
                client_id=cid, max_blocks=rec.max_blocks(), base_forward_seconds=forward,
                layer_backward_seconds=backward, steps=self.cfg.training.steps,
                deadline_seconds=self.cfg.round_deadline_seconds, label_histogram=dict(a.label_histogram),
                protected=self.cfg.training.round_distill_lambda(round_) > 0,
            ))  # fmt: skip
        return caps

    def allocate(self, selected: list[str], round_: int) -> Any:
        from coordinator import allocation  # noqa: PLC0415

        a = self.cfg.allocation
        slots = allocation.slots_from_registry(
            self.registry, top_risk=a.top_risk, interleaved_risk=a.interleaved_risk
        )
        policy = allocation.AllocationPolicy(
            strategy=a.strategy.value,
            max_unprotected_risk=a.max_unprotected_risk,
            risk_weight=a.risk_weight,
            cost_weight=a.cost_weight,
            max_block_divergence=a.max_block_divergence,
            min_steps_fraction=a.min_steps_fraction,
        )
        return allocation.allocate(
            slots, self.capacities(selected, round_), num_layers=self.registry.num_layers,
            last_trained=self.last_trained, round=round_, seed=self.cfg.seed * 100003 + round_, policy=policy,
        )  # fmt: skip

    def federation_labels(self) -> tuple[str, ...]:
        """What a label-balanced loss balances over: ``training.labels`` if configured (a client
        announcing others is refused), else every label an accepted client announced (sorted).

        Empty (plain cross-entropy) when there are more than a task may carry: the union of many
        clients' histograms can pass the per-client limit, and a task that can not be encoded would
        stop the round.
        """
        if self.cfg.training.labels:
            return self.cfg.training.labels
        labels = sorted({
            label for rec in self.clients.clients.values() if rec.announce is not None and rec.refused is None
            for label in rec.announce.label_histogram
        })  # fmt: skip
        if len(labels) > MAX_LABELS:
            if not self._warned_labels:
                log.warning("training.label_balance: the clients announced %d labels, more than a task carries "
                            "(%d); training plain cross-entropy", len(labels), MAX_LABELS)  # fmt: skip
                self._warned_labels = True
            return ()
        return tuple(labels)

    def send_task(self, client_id: str, round_: int, blocks: tuple[int, ...], rlog: RoundLog, *,
                  evaluate: bool = False, steps: int | None = None,
                  balance_labels: tuple[str, ...] = ()) -> None:  # fmt: skip
        """Publish a client's task; ``steps`` (default ``training.steps``) is fewer for a short run, and
        ``balance_labels`` (the round's :meth:`federation_labels`) asks for the label-balanced loss."""
        t = self.cfg.training
        lam = t.round_distill_lambda(round_)
        # a client runs the blocks it is sent and bypasses the others; with context_blocks it is sent
        # all of them and trains its own inside the current global model
        weight_ids = self.registry.block_ids if evaluate or t.context_blocks else blocks
        task = protocol.TaskMessage(
            round=round_, task_id=f"r{round_}-{'eval' if evaluate else 'train'}-{client_id}", client_id=client_id,
            block_ids=() if evaluate else blocks, weights_level=t.task_weights_level,
            weights=encode_weights(self.global_state, list(weight_ids), t.task_weights_level),
            reply_level=self.cfg.update_level,
            steps=0 if evaluate else (steps or t.steps), lr=t.round_lr(round_), batch_size=t.batch_size,
            max_tokens=t.max_tokens,
            deadline_seconds=self.cfg.round_deadline_seconds, seed=self.cfg.seed * 100003 + round_,
            distill_lambda=lam, evaluate=evaluate, distill_top_k=t.distill_top_k,
            identity_pull=t.identity_pull, rehearsal_rows=t.rehearsal_rows if lam > 0 else 0,
            distill_sample=t.distill_sample,
            distill_rows=t.distill_rows,
            balance_labels=() if evaluate else balance_labels, balance_form=t.round_balance_form(round_),
        )  # fmt: skip
        frame = protocol.encode(task, max_bytes=self.cfg.broker.max_message_bytes)
        self.conn.publish(self.topics.client(client_id, ClientTopic.TASK), frame, wait=30)
        rlog.bytes_down[client_id] = rlog.bytes_down.get(client_id, 0) + len(frame)

    def run_round(self, round_: int) -> None:
        started = time.monotonic()
        rlog = RoundLog(round_)
        eligible = [r.client_id for r in self.clients.eligible()]
        rlog.selected = select_clients(eligible, self.cfg.clients_per_round, self.rng)
        alloc = self.allocate(rlog.selected, round_)
        assignments = {c: b for c, b in alloc.assignments.items() if b}
        rlog.assignments = {c: list(b) for c, b in alloc.assignments.items()}
        rlog.short_runs = {c: n for c, n in alloc.steps.items() if n < self.cfg.training.steps}
        if rlog.short_runs:
            log.info("round %d: blocks %s offered to clients that reach them only with short runs: %s", round_,
                     list(alloc.short_run_blocks), rlog.short_runs)  # fmt: skip
        if not assignments:
            log.warning("round %d: no selected client can train any block: %s", round_, alloc.reasons)
        if alloc.withdrawn_blocks:
            log.info("round %d: blocks %s left untrained: the clients able to train them hold labels too far "
                     "from the selected clients' pooled labels (allocation.max_block_divergence %g)", round_,
                     list(alloc.withdrawn_blocks), self.cfg.allocation.max_block_divergence)  # fmt: skip
        already = self.store.pending_updates(round_)
        collector = RoundCollector(
            round_, assignments, self.layout, self.cfg.broker.max_message_bytes,
            lambda cid, frame: self.store.save_pending_update(round_, cid, frame), already, self.inbox.count,
        )  # fmt: skip
        log.info("round %d/%d: %d clients, allocation %s%s", round_, self.cfg.rounds, len(assignments),
                 {c: list(b) for c, b in assignments.items()},
                 f" ({len(already)} updates recovered)" if already else "")  # fmt: skip
        for cid, frame in self.pump.stashed_updates:
            collector.offer_update(cid, frame)
        self.pump.stashed_updates.clear()
        # the labels once a round (they scan every registered client), for every task of the round
        labels = self.federation_labels() if self.cfg.training.label_balance else ()
        for cid, blocks in assignments.items():
            if cid not in collector.updates:
                self.send_task(
                    cid, round_, blocks, rlog, steps=rlog.short_runs.get(cid), balance_labels=labels
                )
        rlog.closed_by = self.collect(collector, started)
        self.close_round(round_, collector, rlog)
        if self.cfg.eval_every and round_ % self.cfg.eval_every == 0:
            rlog.evaluation = self.federated_eval(round_, rlog)
        if self.cfg.server_eval is not None and (
            not self.cfg.eval_every or round_ % self.cfg.eval_every == 0
        ):
            rlog.server_evaluation = self.server_eval()
        rlog.seconds = time.monotonic() - started
        if self.expansion_decision is not None and round_ == 1:
            rlog.expansion = self.expansion_decision
        grown = self.maybe_grow(round_, rlog)
        if grown is not None:
            rlog.expansion = grown
        self.round = round_
        self.save(rlog)

    def collect(self, collector: RoundCollector, started: float) -> str:
        deadline = started + self.cfg.round_deadline_seconds
        hard_limit = started + 3 * self.cfg.round_deadline_seconds
        offline_since: dict[str, float] = {}  # client -> when this round first saw it offline
        while not self.stop.is_set():
            now = time.monotonic()
            for cid, rec in self.clients.clients.items():
                if rec.online:
                    offline_since.pop(cid, None)
                else:
                    offline_since.setdefault(cid, now)
            gone = {c for c, t in offline_since.items() if now - t >= OFFLINE_GRACE_SECONDS}
            if not collector.pending(gone):
                return "all answered"
            if now > deadline and len(collector.updates) >= self.cfg.min_clients:
                return "deadline"
            if now > hard_limit:
                log.warning("round %d: closing with %d updates, fewer than min_clients=%d, after 3x the deadline",
                            collector.round, len(collector.updates), self.cfg.min_clients)  # fmt: skip
                return "hard limit"
            item = self.inbox.next(min(0.5, max(deadline - now, 0.05)))
            if item is None:
                continue
            cid, kind, payload = item
            if self.pump.handle_lifecycle(cid, kind, payload):
                continue
            if kind is ClientTopic.UPDATE:
                collector.offer_update(cid, payload)
            elif kind is ClientTopic.ERROR:
                collector.offer_error(cid, payload)
            else:
                self.inbox.count(f"{kind.value}_during_training")
        return "stopped"

    def close_round(self, round_: int, collector: RoundCollector, rlog: RoundLog) -> None:
        from coordinator import aggregation  # noqa: PLC0415

        batch = self.cfg.training.batch_size
        # In client-id order, not arrival order: the float sums (and so the weights) do not depend on
        # which update came first, so a resumed run aggregates exactly as an uninterrupted one.
        deltas = {cid: deltas_of(collector.updates[cid]) for cid in sorted(collector.updates)}
        norms = {cid: aggregation.update_norm(d) for cid, d in deltas.items()}
        accepted: list[Any] = []
        for cid, delta in deltas.items():
            others = [n for other, n in norms.items() if other != cid]
            verdict = aggregation.screen_update(
                delta, collector.assignments[cid], self.layout, others, self.cfg.aggregation.norm_bound_factor
            )
            if not verdict.accepted:
                collector.reject(cid, verdict.code, verdict.reason)
                continue
            msg = collector.updates[cid]
            # The weight is what the client claims, capped at what its task allowed (steps x batch):
            # a client can not buy a larger share of the average by inflating num_samples.
            allowed = rlog.short_runs.get(cid, self.cfg.training.steps) * batch
            accepted.append(aggregation.ClientUpdate(cid, delta, min(msg.num_samples, allowed), 0))
            predicted = self.clients.clients[cid].predicted_step_seconds(
                self.registry.num_layers, min(self.registry.block(b).layer_index for b in msg.blocks)
            )
            self.clients.on_result(
                cid, round_, msg.num_steps, msg.wall_seconds, predicted, tuple(sorted(msg.blocks))
            )
            rlog.updates[cid] = {
                "blocks": sorted(msg.blocks), "samples": msg.num_samples, "steps": msg.num_steps,
                "loss": msg.mean_loss, "seconds": msg.wall_seconds, "peak_memory_bytes": msg.peak_memory_bytes,
                "norm": norms[cid],
            }  # fmt: skip
            rlog.bytes_up[cid] = collector.frames_bytes.get(cid, 0)
        if self.cfg.late_updates == "fold":
            for msg in collector.late:
                late_delta = deltas_of(msg)
                verdict = aggregation.screen_update(
                    late_delta, self.registry.block_ids, self.layout, list(norms.values()),
                    self.cfg.aggregation.norm_bound_factor,
                )  # fmt: skip
                if not verdict.accepted:
                    collector.reject(msg.client_id, verdict.code, "late update: " + verdict.reason)
                elif msg.client_id in self.clients.clients and msg.client_id not in rlog.updates:
                    # its task's steps are an earlier round's: capped at the most any task asks for
                    weight = min(msg.num_samples, self.cfg.training.steps * batch)
                    accepted.append(
                        aggregation.ClientUpdate(msg.client_id, late_delta, weight, round_ - msg.round)
                    )
        for cid, err in collector.errors.items():
            self.clients.on_failure(cid, err.code, len(collector.assignments.get(cid, ())))
            rlog.errors.append({"client": cid, "code": err.code, "reason": err.reason[:300]})
        rlog.rejected = collector.rejected
        result = aggregation.aggregate(
            self.global_state,
            accepted,
            self.server_optimizer,
            self.cfg.staleness_decay,
            self.server_state,
            block_average=self.cfg.aggregation.block_average,
        )
        self.global_state = result.new_state
        self.server_state = result.optimizer_state
        for block_id, report in result.per_block.items():
            if report.trainers:
                self.last_trained[block_id] = round_
            rlog.blocks[block_id] = {
                "trainers": list(report.trainers), "weight": report.weight_total, "update_norm": report.update_norm,
            }  # fmt: skip
        losses = [u["loss"] for u in rlog.updates.values() if u["steps"]]
        log.info(
            "round %d closed (%s): %d updates accepted, %d rejected, %d errors; mean loss %s; %.1f MB up, %.1f MB down",
            round_, rlog.closed_by, len(rlog.updates), len(rlog.rejected), len(rlog.errors),
            f"{sum(losses) / len(losses):.4f}" if losses else "n/a",
            sum(rlog.bytes_up.values()) / 1e6, sum(rlog.bytes_down.values()) / 1e6,
        )  # fmt: skip

    def server_eval(self, base_model: bool = False) -> dict[str, Any]:
        """Accuracy of the current global model on held-out BBC News test articles, on the coordinator;
        with ``server_eval.probe_*`` also the general-ability probes, and their retention against the
        baseline when there is one. ``base_model`` scores the base instead (every new block bypassed)."""
        import random as _random  # noqa: PLC0415

        from fedbe import datasets, sources  # noqa: PLC0415
        from fedbe.blocks import set_block_state  # noqa: PLC0415
        from fedbe.evaluation import classification_accuracy  # noqa: PLC0415
        from fedbe.expansion import bypassed  # noqa: PLC0415
        from fedbe.general_ability import GeneralProbe, retention  # noqa: PLC0415

        settings = self.cfg.server_eval
        if not hasattr(self, "_server_test"):
            _, test = datasets.split_train_test(datasets.load_bbc_news())
            _random.Random(0).shuffle(test)
            self._server_test = test[: settings.examples]
            self._server_labels = datasets.label_names(test)
            self._tokenizer = sources.load_tokenizer(self.cfg.model)
            self._probe = (
                GeneralProbe.build(settings.probe_questions, settings.probe_texts, split="test")
                if settings.probe_questions
                else None
            )
        if settings.precision != "fp32" and getattr(self, "_eval_frozen", None) is not self.model:
            from fedbe.quantization import freeze_base  # noqa: PLC0415

            freeze_base(self.model, self.registry, settings.precision)  # blocks stay fp32, the base not
            self._eval_frozen = self.model  # a new expansion loads a new model: frozen again then
        set_block_state(self.model, self.registry, self.global_state)
        started = time.monotonic()
        with bypassed(self.model, self.registry) if base_model else contextlib.nullcontext():
            accuracy = classification_accuracy(
                self.model,
                self._tokenizer,
                self._server_test,
                self._server_labels,
                self.cfg.training.max_tokens,
            )
            probe = self._probe
            probes = None if probe is None else probe.score(self.model, self._tokenizer)
        result: dict[str, Any] = {
            "dataset": "bbc-news",
            "examples": len(self._server_test),
            "accuracy": accuracy,
            "precision": settings.precision,
        }
        baseline = self.baseline
        if baseline is not None and not base_model:
            result["baseline_accuracy"] = baseline.get("accuracy")
        if probe is not None and probes is not None:
            result["probes"] = {**probes, "questions": len(probe.questions), "texts": len(probe.texts)}
            before = (baseline or {}).get("probes")
            if before is not None and not base_model:
                result["retention"] = retention(before, probes)
        result["seconds"] = time.monotonic() - started
        log.info(
            "server evaluation%s: accuracy %.3f on %d BBC News test articles%s (%.0f s)",
            " of the base model" if base_model else "", accuracy, len(self._server_test),
            "" if probes is None else
            f"; definitions {probes['definition_accuracy']:.3f}, perplexity {probes['perplexity']:.2f}"
            + ("".join(f", {k} {v:.3f}" for k, v in result.get("retention", {}).items())),
            result["seconds"],
        )  # fmt: skip
        return result

    def evaluate_baseline(self) -> None:
        """``server_eval.baseline``: score the base model once (round 0), the reference of retention.

        Saved in the state directory, so a resumed run keeps its reference instead of measuring again.
        """
        saved = self.store.load_baseline()
        if saved is not None:
            self.baseline = saved
            return
        started = time.monotonic()
        result = self.server_eval(base_model=True)
        record = asdict(RoundLog(0, server_evaluation=result, seconds=time.monotonic() - started,
                                 closed_by="baseline"))  # fmt: skip
        record["rejections_by_reason"] = dict(self.inbox.rejections)
        self.store.append_metrics(record)  # metrics first, as in save(): a crash repeats, never loses, it
        self.store.save_baseline(result)
        self.baseline = result

    def federated_eval(self, round_: int, rlog: RoundLog) -> dict[str, Any]:
        clients = [c for c in rlog.selected if self.clients.clients[c].eligible]
        for cid in clients:
            self.send_task(cid, round_, (), rlog, evaluate=True)
        results: dict[str, protocol.EvalResultMessage] = {}
        deadline = time.monotonic() + self.cfg.round_deadline_seconds
        while time.monotonic() < deadline and len(results) < len(clients) and not self.stop.is_set():
            item = self.inbox.next(0.5)
            if item is None:
                continue
            cid, kind, payload = item
            if self.pump.handle_lifecycle(cid, kind, payload):
                continue
            if kind is ClientTopic.EVAL:
                try:
                    msg = protocol.decode(payload, expected_type=protocol.EvalResultMessage)
                except CodecError:
                    self.inbox.count("invalid_eval")
                    continue
                if msg.round == round_ and cid in clients:
                    results[cid] = msg
            else:
                self.inbox.count(f"{kind.value}_during_eval")
        total = sum(r.num_examples for r in results.values())
        summary: dict[str, Any] = {"clients": len(results), "examples": total}
        if total:
            summary["loss"] = sum(r.loss * r.num_examples for r in results.values()) / total
            summary["accuracy"] = sum(r.accuracy * r.num_examples for r in results.values()) / total
            log.info("round %d federated evaluation: accuracy %.3f, loss %.4f over %d examples on %d clients",
                     round_, summary["accuracy"], summary["loss"], total, len(results))  # fmt: skip
        return summary

    def save(self, rlog: RoundLog) -> None:
        from coordinator.checkpoint import Snapshot, rng_state_to_json  # noqa: PLC0415

        # Metrics first: if the snapshot write is interrupted the round is re-run and logged twice,
        # never missing from metrics.jsonl.
        record = asdict(rlog)
        record["rejections_by_reason"] = dict(self.inbox.rejections)
        self.store.append_metrics(record)
        self.store.save(Snapshot(
            round=self.round, global_state=self.global_state, expansion=self.registry.to_dict(),
            base_fingerprint=self.fingerprint, model_source=self.cfg.model, clients=self.clients.to_json(),
            rng_state=rng_state_to_json(self.rng.getstate()),
            server_optimizer_state=_optimizer_state_to_snapshot(self.server_state),
            last_trained=dict(self.last_trained), config_digest=self.config_digest,
        ))  # fmt: skip
        self.store.clear_pending(self.round)
        self.publish_status("running")


def make_server_optimizer(settings: Any) -> Any:
    from coordinator.aggregation import FedAdam, FedAvgM  # noqa: PLC0415

    if settings.server_optimizer == "fedavgm":
        return FedAvgM(lr=settings.server_lr, momentum=settings.momentum)
    if settings.server_optimizer == "fedadam":
        return FedAdam(lr=settings.server_lr, beta1=settings.beta1, beta2=settings.beta2, tau=settings.tau)
    return None


_OPTIMIZER_KINDS = {1: "FedAvgMState", 2: "FedAdamState"}


def _optimizer_state_to_snapshot(state: Any) -> Any:
    from coordinator.checkpoint import ServerOptimizerState  # noqa: PLC0415

    if state is None:
        return ServerOptimizerState()
    kind = {v: k for k, v in _OPTIMIZER_KINDS.items()}[type(state).__name__]
    return ServerOptimizerState(tensors=dict(vars(state)), scalars={"kind": kind})


def _optimizer_state_from_snapshot(data: Any, aggregation: Any) -> Any:
    if data is None or not getattr(data, "scalars", None):
        return None
    cls = getattr(aggregation, _OPTIMIZER_KINDS[int(data.scalars["kind"])])
    return cls(**data.tensors)
