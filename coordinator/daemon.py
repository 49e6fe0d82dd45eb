"""The coordinator daemon: the run loop and its I/O (messages, timers, checkpoints, evaluation).

One round:

1. wait until at least ``min_clients`` eligible clients (online, announced, same base) are known;
2. plan it (:func:`coordinator.round.plan_round`, pure: selection with the seeded RNG restored on
   resume, and the allocation of new blocks) and save the plan in the state directory; a round
   resumed after a crash keeps its saved plan;
3. send each assigned client a task: the current weights of every new block and the recipe;
4. collect replies (:mod:`coordinator.inbox`) until every assigned client answered (update or error)
   or went offline, or the deadline passed with at least ``min_clients`` updates (a client counts as
   gone once it has been offline for ``OFFLINE_GRACE_SECONDS``); each accepted update is written to
   the state directory before it counts, so a crash mid-round loses none, and an update sent while
   the coordinator was down waits in its persistent broker session for the resumed round;
5. close it (:func:`coordinator.round.close_round`, pure: screening, weight caps, late updates,
   aggregation or DP-FedAvg, the server optimizer), the same function ``fedbe bench`` runs;
6. optionally evaluate (federated, or on the coordinator: :mod:`coordinator.server_eval`); write the
   snapshot atomically; one metrics line (:class:`coordinator.round_log.RoundLog`).

With ``privacy`` configured, a round that would take epsilon past ``epsilon_budget`` is not started
(checked before step 2, from the sampling rate it would have): the run finishes there as it does after
its last round. The noise comes from the operating system's entropy, never from the config's seed.

The class holds the state every step reads and checkpoints (model, registry, global state, RNG,
clients); the decisions are pure functions elsewhere (:mod:`coordinator.round`, and
:mod:`coordinator.growth` for ``blocks: auto`` and growing the model on a plateau), and so is the
metrics line (:mod:`coordinator.round_log`). :class:`coordinator.fleet_monitor.FleetMonitor` is told
each step (and ticks while messages are awaited): ``status.json``, the Prometheus metrics, the HTTP endpoint.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from typing import Any

from coordinator import privacy
from coordinator.fleet_monitor import FleetMonitor
from coordinator.growth import PROVISIONAL_BLOCKS, Best, auto_block_count, plan_growth, renumbering
from coordinator.inbox import (
    Inbox,
    MessagePump,
    RoundCollector,
    collect_round,
    deltas_of,
    encode_weights,
    wait_for_clients,
)
from coordinator.optimizer_snapshot import optimizer_state_from_snapshot, optimizer_state_to_snapshot
from coordinator.registry import ClientRegistry
from coordinator.round import (
    Candidate,
    Reply,
    RoundPlan,
    close_round,
    plan_from_json,
    plan_round,
    plan_to_json,
    trained_blocks,
)
from coordinator.round_log import RoundLog, federated_summary
from coordinator.server_eval import ServerEvaluator
from fedbe import protocol
from fedbe.blocks import block_layout, get_block_state
from fedbe.errors import BaseModelMismatchError, ConfigError
from fedbe.expansion import BlockRegistry
from fedbe.protocol import ClientTopic, Topics
from fedbe.protocol.messages import MAX_LABELS
from fedbe.transport import Connection

log = logging.getLogger(__name__)


class Coordinator:
    """Runs the federation described by a :class:`coordinator.config.RunConfig`."""

    def __init__(self, cfg: Any, conn: Connection, store: Any, stop: threading.Event | None = None) -> None:
        self.cfg, self.conn, self.store = cfg, conn, store
        self.stop = stop or threading.Event()
        self.baseline: dict[str, Any] | None = None  # the base model's server evaluation (round 0)
        self.topics = Topics(cfg.federation)
        self.inbox = Inbox(conn, self.topics)
        self._warned_labels = False  # too many labels for label_balance: warned once
        self._best: Best | None = None  # the best accuracy so far, for auto_expansion's plateau
        self.monitor = FleetMonitor(cfg)  # status.json, the Prometheus metrics and their HTTP endpoint
        self.evaluator = (
            None
            if cfg.server_eval is None
            else ServerEvaluator(cfg.server_eval, cfg.model, cfg.training.max_tokens)
        )

    # -- set-up and resume -------------------------------------------------------------------
    def setup(self) -> None:
        from fedbe import expansion, sources  # noqa: PLC0415
        from fedbe.fingerprint import base_fingerprint  # noqa: PLC0415

        cfg = self.cfg
        log.info("loading the base model %s", cfg.model)
        model = sources.load_model(cfg.model)
        self.fingerprint = base_fingerprint(model)
        from coordinator.checkpoint import rng_state_from_json  # noqa: PLC0415
        from coordinator.config import config_digest, round_policy  # noqa: PLC0415

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
                    found=self.fingerprint,
                    expected=snapshot.base_fingerprint,
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
        self.clients = ClientRegistry(self.fingerprint, cfg.labels)
        self.rng = random.Random(cfg.seed)
        self.last_trained: dict[int, int] = {}
        self.server_state: Any = None
        self.expansion_decision: dict[str, Any] | None = None
        history: tuple[privacy.RoundPrivacy, ...] = ()
        self.budget_spent = False
        if snapshot is not None:
            self.auto_pending = False
            self.global_state = snapshot.global_state
            self.round = snapshot.round
            self.clients = ClientRegistry.from_json(self.fingerprint, dict(snapshot.clients), cfg.labels)
            self.rng.setstate(rng_state_from_json(snapshot.rng_state))  # type: ignore[arg-type]
            self.last_trained = {int(k): int(v) for k, v in snapshot.last_trained.items()}
            self.server_state = snapshot.server_optimizer_state
            history = snapshot.privacy_history
            log.info("resuming after round %d from %s", self.round, self.store.state_dir)
        else:
            self.global_state = get_block_state(model, self.registry)
            self.round = 0
        self.policy = round_policy(cfg)
        self._check_privacy_history(history)
        self.earlier_privacy = history  # kept in the snapshot when a private run goes on without privacy
        self.ledger = None if cfg.privacy is None else privacy.PrivacyLedger(cfg.privacy, list(history))
        # unpredictable noise: a generator seeded from the config could be replayed by anyone holding it
        self.noise = privacy.SystemNoise() if cfg.privacy is not None else None
        self.server_state = optimizer_state_from_snapshot(self.server_state)
        self.pump = MessagePump(self.inbox, self.clients, self.conn, self.topics)
        self.monitor.attach(self.clients, self.round)
        self.pump.on_wait = self.monitor.tick
        self.publish_status("starting")

    def _check_privacy_history(self, history: tuple[privacy.RoundPrivacy, ...]) -> None:
        """Refuse to add privacy to a run whose earlier rounds ran without it (their updates are not
        covered, so no epsilon would be true); warn when a private run goes on without it."""
        if self.cfg.privacy is not None and self.round > len(history):
            raise ConfigError(
                f"{self.store.state_dir}: {self.round - len(history)} of its {self.round} rounds ran "
                "without privacy, so no epsilon covers them; to train with privacy, start a fresh state_dir "
                "(or remove the privacy section to continue this run without it)"
            )
        if self.cfg.privacy is None and history:
            log.warning("this run's first %d rounds ran with privacy and the config has none now: the rounds "
                        "from here on are not private", len(history))  # fmt: skip

    def _install_expansion(self, model: Any) -> None:
        """Expand ``model`` (an unexpanded base) as ``self.registry`` says and make it current."""
        from fedbe import expansion  # noqa: PLC0415

        plan = expansion.ExpansionPlan(
            self.registry.base_num_layers, tuple(b.source_layer for b in self.registry.blocks)
        )
        expansion.expand_model(model, plan)
        self.model = model
        self.layout = block_layout(model, self.registry)

    def decide_expansion(self) -> None:
        """``blocks: auto``: size the expansion from the announced capacities, once, before round 1
        (:func:`coordinator.growth.auto_block_count`)."""
        from fedbe import expansion, sources  # noqa: PLC0415

        layers = self.registry.base_num_layers
        capacities = [r.max_blocks() for r in self.clients.eligible()]
        n, reason = auto_block_count(capacities, layers, self.cfg.auto_expansion)
        self.expansion_decision = {"blocks": n, "reason": reason, "placement": self.cfg.placement}
        log.info("blocks: auto decided %d new blocks: %s", n, reason)
        self.auto_pending = False
        if n == len(self.registry.blocks):
            return
        self.registry = expansion.plan_expansion(layers, n, self.cfg.placement).registry()
        self._install_expansion(sources.load_model(self.cfg.model))
        self.global_state = get_block_state(self.model, self.registry)
        for rec in self.clients.clients.values():  # capacities were measured on the old expansion
            rec.announce = None
        self.publish_status("starting")

    def maybe_grow(self, round_: int, rlog: RoundLog) -> dict[str, Any] | None:
        """Add one identity-initialised block when the evaluation score has plateaued
        (``auto_expansion``; :func:`coordinator.growth.plan_growth` decides when and where).

        The score is the server-side accuracy when configured, else the federated accuracy. Existing
        blocks keep their weights (renumbered by depth); the new one starts as the base model did.
        """
        from fedbe import sources  # noqa: PLC0415

        source = rlog.server_evaluation or rlog.evaluation or {}
        score = source.get("accuracy")
        if not self.cfg.auto_expansion.plateau_rounds or score is None:
            return None
        self._best, growth = plan_growth(self._best, score, round_, self.registry, self.cfg.auto_expansion,
                                         self.cfg.placement)  # fmt: skip
        if growth is None:
            return None
        old, self.registry = self.registry, growth.registry
        self._install_expansion(sources.load_model(self.cfg.model))
        fresh = get_block_state(self.model, self.registry)
        keep, added = renumbering(old, self.registry)
        self.global_state = {keep[o]: t for o, t in self.global_state.items()}
        self.global_state[added] = fresh[added]
        self.last_trained = {keep[o]: r for o, r in self.last_trained.items()}
        self.server_state = None  # optimizer buffers were keyed by the old block ids
        for rec in self.clients.clients.values():
            rec.announce = None  # capacities were measured on the old expansion
        log.info("adding new block %d after base layer %d: %s", added, growth.after_base_layer, growth.reason)
        self.publish_status("starting")
        return {"blocks": len(self.registry.blocks), "added_block": added,
                "after_base_layer": growth.after_base_layer, "reason": growth.reason}  # fmt: skip

    def publish_status(self, state: str) -> None:
        msg = protocol.CoordinatorStatusMessage(
            state=state, round=self.round, base_fingerprint=self.fingerprint,
            base_num_layers=self.registry.base_num_layers, new_layer_indices=self.registry.new_layer_indices,
            source_layers=tuple(b.source_layer for b in self.registry.blocks),
        )  # fmt: skip
        self.conn.publish(self.topics.coordinator_status(), protocol.encode(msg), retain=True, wait=30)
        self.monitor.state(state)

    # -- the run -------------------------------------------------------------------------------
    def run(self) -> int:
        with self.monitor.running():
            return self._run()

    def _run(self) -> int:
        for kind in (ClientTopic.ANNOUNCE, ClientTopic.STATUS, ClientTopic.UPDATE, ClientTopic.EVAL,
                     ClientTopic.ERROR):  # fmt: skip
            self.conn.subscribe(self.topics.all_clients(kind))
        self.setup()
        if self.cfg.server_eval is not None and self.cfg.server_eval.baseline:
            self.evaluate_baseline()
        while self.round < self.cfg.rounds and not self.stop.is_set() and not self.budget_spent:
            if not wait_for_clients(self.pump, self.cfg.min_clients, self.stop):
                break
            if self.auto_pending:
                self.decide_expansion()
                continue
            self.run_round(self.round + 1)
        if self.budget_spent:
            self.publish_status("finished")
            log.info("federation finished after %d rounds (privacy budget spent); state in %s", self.round,
                     self.store.state_dir)  # fmt: skip
            return 0
        if self.round >= self.cfg.rounds:
            self.publish_status("finished")
            log.info("federation finished after %d rounds; state in %s", self.round, self.store.state_dir)
            return 0
        self.publish_status("stopped")
        return 130

    def candidates(self) -> list[Candidate]:
        """The eligible clients as the round's plan sees them (speeds corrected by what they measured)."""
        out = []
        for rec in self.clients.eligible():
            assert rec.announce is not None
            forward, backward = rec.step_model(self.registry.num_layers)
            out.append(Candidate(rec.client_id, rec.max_blocks(), forward, backward,
                                 dict(rec.announce.label_histogram)))  # fmt: skip
        return out

    def federation_labels(self) -> tuple[str, ...]:
        """What a label-balanced loss balances over: ``labels`` if configured (a client
        announcing others is refused), else every label an accepted client announced (sorted).

        Empty (plain cross-entropy) when there are more than a task may carry: the union of many
        clients' histograms can pass the per-client limit, and a task that can not be encoded would
        stop the round.
        """
        if self.cfg.labels:
            return self.cfg.labels
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
                  evaluate: bool = False, balance_labels: tuple[str, ...] = ()) -> None:  # fmt: skip
        """Publish a client's task: the weights of every new block (it trains its own with the others in
        place, frozen), the recipe, and ``balance_labels`` (the round's :meth:`federation_labels`)."""
        level = self.cfg.download_level
        task = protocol.TaskMessage(
            round=round_, task_id=f"r{round_}-{'eval' if evaluate else 'train'}-{client_id}", client_id=client_id,
            block_ids=() if evaluate else blocks, download_level=level,
            weights=encode_weights(self.global_state, list(self.registry.block_ids), level),
            upload_level=self.cfg.upload_level, recipe=self.cfg.training,
            deadline_seconds=self.cfg.round_deadline_seconds, seed=self.cfg.seed * 100003 + round_,
            evaluate=evaluate, balance_labels=() if evaluate else balance_labels,
        )  # fmt: skip
        frame = protocol.encode(task, max_bytes=self.cfg.broker.max_message_bytes)
        self.conn.publish(self.topics.client(client_id, ClientTopic.TASK), frame, wait=30)
        rlog.bytes_down[client_id] = rlog.bytes_down.get(client_id, 0) + len(frame)

    def privacy_allows(self, eligible: int) -> bool:
        """Whether the next round, sampling ``min(clients_per_round, eligible)`` of ``eligible``
        clients, keeps epsilon within ``privacy.epsilon_budget``; if not, the run is to finish."""
        refusal = None if self.ledger is None else self.ledger.refusal(min(self.cfg.clients_per_round, eligible),
                                                                       eligible)  # fmt: skip
        if refusal is not None:
            log.warning("%s, so the federation stops before round %d", refusal, self.round + 1)
            self.budget_spent = True
        return refusal is None

    def run_round(self, round_: int) -> None:
        candidates = self.candidates()
        if not self.privacy_allows(len(candidates)):
            return
        started = time.monotonic()
        rlog = RoundLog(round_)
        plan = self.plan(round_, candidates)
        alloc, assignments = plan.allocation, plan.assignments
        rlog.selected = list(plan.selected)
        rlog.assignments = {c: list(b) for c, b in alloc.assignments.items()}
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
            self.inbox.bad,
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
                self.send_task(cid, round_, blocks, rlog, balance_labels=labels)
        self.monitor.round_started(round_, plan.selected, assignments, collector,
                                   started + self.cfg.round_deadline_seconds)  # fmt: skip
        rlog.closed_by = collect_round(self.pump, collector, started, self.cfg.round_deadline_seconds,
                                       self.cfg.min_clients, self.stop)  # fmt: skip
        if rlog.closed_by == "hard limit":
            log.warning("round %d: closing with %d updates, fewer than min_clients=%d, after 3x the deadline",
                        round_, len(collector.updates), self.cfg.min_clients)  # fmt: skip
        self.monitor.phase("closing")
        # a resumed round's clients were sampled before the restart, from at least those it selected
        self.close_round(plan, collector, rlog, eligible=max(len(candidates), len(plan.selected)))
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

    def plan(self, round_: int, candidates: list[Candidate]) -> RoundPlan:
        """The round's saved plan when it is resumed after a crash, else a new one, saved before any
        task goes out. Planning a resumed round again would select among the clients back online
        first, and refuse the update of an assigned client that is not (yet) back."""
        from coordinator.checkpoint import rng_state_from_json, rng_state_to_json  # noqa: PLC0415

        saved = self.store.round_plan(round_)
        if saved is not None:
            try:
                plan = plan_from_json(saved["plan"], round_, self.policy.recipe, self.registry.block_ids)
                self.rng.setstate(rng_state_from_json(saved["rng_state"]))  # type: ignore[arg-type]
            except (KeyError, TypeError, ValueError) as exc:
                log.warning("round %d: the saved plan can not be resumed (%s); planning the round again",
                            round_, exc)  # fmt: skip
            else:
                log.info("round %d: resuming its saved plan (clients %s)", round_, list(plan.selected))
                return plan
        plan = plan_round(self.policy, round_, candidates, self.registry, self.last_trained, self.cfg.seed,
                          self.rng)  # fmt: skip
        self.store.save_round_plan(round_, {"plan": plan_to_json(plan),
                                            "rng_state": rng_state_to_json(self.rng.getstate())})  # fmt: skip
        return plan

    def close_round(self, plan: RoundPlan, collector: RoundCollector, rlog: RoundLog, eligible: int) -> None:
        """Hand the collected updates to :func:`coordinator.round.close_round`; record what it decided
        (with privacy on, also what the round cost: ``eligible`` clients were sampled from)."""
        round_ = plan.round
        replies = [
            Reply(cid, deltas_of(msg), msg.num_samples, msg.round) for cid, msg in collector.updates.items()
        ]
        late = [Reply(m.client_id, deltas_of(m), m.num_samples, m.round) for m in collector.late
                if m.client_id in self.clients.clients]  # fmt: skip
        closing = time.monotonic()
        outcome = close_round(self.policy, plan, self.global_state, self.layout, replies, self.server_state, late,
                              noise=self.noise)  # fmt: skip
        rlog.aggregation_seconds = time.monotonic() - closing
        if self.ledger is not None:
            rlog.privacy = self.ledger.record(len(plan.selected), eligible, outcome.clipped_fraction)
            log.info("round %d privacy: epsilon %.4g at delta %g after %d rounds (%d of %d clients sampled)",
                     round_, rlog.privacy["epsilon"], rlog.privacy["delta"], len(self.ledger.history),
                     len(plan.selected), eligible)  # fmt: skip
        for cid, code, reason in outcome.rejected:
            collector.reject(cid, code, reason)
        for cid in outcome.accepted:
            msg = collector.updates[cid]
            predicted = self.clients.record(cid).predicted_step_seconds(
                self.registry.num_layers, min(self.registry.block(b).layer_index for b in msg.blocks)
            )
            self.clients.on_result(
                cid, round_, msg.num_steps, msg.wall_seconds, predicted, tuple(sorted(msg.blocks))
            )
        for cid, err in collector.errors.items():
            self.clients.on_failure(cid, err.code, len(collector.assignments.get(cid, ())))
        rlog.record_close(outcome, collector)
        self.global_state = outcome.new_state
        self.server_state = outcome.optimizer_state
        for block_id in trained_blocks(outcome):
            self.last_trained[block_id] = round_
        losses = [u["loss"] for u in rlog.updates.values() if u["steps"]]
        log.info(
            "round %d closed (%s): %d updates accepted, %d rejected, %d errors; mean loss %s; %.1f MB up, %.1f MB down",
            round_, rlog.closed_by, len(rlog.updates), len(rlog.rejected), len(rlog.errors),
            f"{sum(losses) / len(losses):.4f}" if losses else "n/a",
            sum(rlog.bytes_up.values()) / 1e6, sum(rlog.bytes_down.values()) / 1e6,
        )  # fmt: skip

    def server_eval(self, base_model: bool = False) -> dict[str, Any]:
        """The coordinator's own evaluation of the global model (or, ``base_model``, of the base)."""
        assert self.evaluator is not None
        return self.evaluator.score(self.model, self.registry, self.global_state, self.baseline, base_model)

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
        rlog = RoundLog(0, server_evaluation=result, seconds=time.monotonic() - started, closed_by="baseline")
        line = rlog.metrics_line(self.inbox.rejections)
        # metrics first, as in save(): a crash repeats, never loses, it
        self.store.append_metrics(line)
        self.store.save_baseline(result)
        self.baseline = result
        self.monitor.baseline_scored(line)

    def federated_eval(self, round_: int, rlog: RoundLog) -> dict[str, Any]:
        clients = [c for c in rlog.selected if c in self.clients.clients and self.clients.clients[c].eligible]
        for cid in clients:
            self.send_task(cid, round_, (), rlog, evaluate=True)
        results = self.pump.eval_results(clients, round_, self.cfg.round_deadline_seconds, self.stop)
        summary = federated_summary(results)
        if summary["examples"]:
            log.info("round %d federated evaluation: accuracy %.3f, loss %.4f over %d examples on %d clients",
                     round_, summary["accuracy"], summary["loss"], summary["examples"], len(results))  # fmt: skip
        return summary

    def save(self, rlog: RoundLog) -> None:
        from coordinator.checkpoint import Snapshot, rng_state_to_json  # noqa: PLC0415

        # Metrics first: if the snapshot write is interrupted the round is re-run and logged twice,
        # never missing from metrics.jsonl.
        line = rlog.metrics_line(self.inbox.rejections)
        self.store.append_metrics(line)
        self.monitor.round_closed(line)
        self.store.save(Snapshot(
            round=self.round, global_state=self.global_state, expansion=self.registry.to_dict(),
            base_fingerprint=self.fingerprint, model_source=self.cfg.model, clients=self.clients.to_json(),
            rng_state=rng_state_to_json(self.rng.getstate()),
            server_optimizer_state=optimizer_state_to_snapshot(self.server_state),
            last_trained=dict(self.last_trained), config_digest=self.config_digest,
            privacy_history=self.earlier_privacy if self.ledger is None else tuple(self.ledger.history),
        ))  # fmt: skip
        self.store.clear_pending(self.round)
        self.publish_status("running")
