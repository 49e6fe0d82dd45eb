"""The ``fedbe-edge run`` agent: announce, receive tasks, train the assigned blocks, send updates.

Life of an agent:

1. connect (MQTT v5 persistent session, last will = retained ``offline`` status), publish a
   retained ``online`` status, subscribe to its own task and notice topics and to the retained
   coordinator status;
2. from the coordinator status, learn the federation's expansion (which layer indices are new
   blocks, copied from which base layers) and its base fingerprint; load the local base model,
   refuse to go on if its fingerprint differs, expand it the same way and freeze the base;
3. measure the device (cached microbenchmark) and announce capacity and label histogram;
4. for each task: validate it, refuse it if it would exceed the memory budget, load the sent
   weights (blocks not sent are bypassed), train the assigned blocks off the network thread,
   and publish the compressed delta (error feedback kept per block across rounds);
5. SIGTERM/SIGINT: stop at the next step, send the round's fate (``abandoned``) and an
   ``offline`` status, disconnect.

Every message is encoded and decoded by :mod:`fedbe.protocol`; topics come from
:class:`fedbe.protocol.Topics`.
"""

from __future__ import annotations

import logging
import queue
import resource
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedModel

from edge_client.loss import BaseCache, LabelPrior
from edge_client.trainer import evaluate_loss, train_blocks
from fedbe import protocol
from fedbe.blocks import block_delta, block_layout, get_block_state, set_block_state
from fedbe.compression import BlockState, compress_state, decompress_state
from fedbe.errors import BaseModelMismatchError, CodecError, FedbeError
from fedbe.expansion import BlockRegistry, ExpansionPlan, NewBlock, bypassed, expand_model
from fedbe.protocol import ClientTopic, Topics
from fedbe.quantization import freeze_base
from fedbe.transport import Connection

log = logging.getLogger(__name__)


@dataclass
class ClientModel:
    """The client's expanded model with a frozen base, and what it was built from."""

    model: PreTrainedModel
    registry: BlockRegistry
    fingerprint: str
    precision: str


@dataclass(frozen=True)
class AnnouncedCapacity:
    """What the agent announces about its device (see AnnounceMessage)."""

    fields: dict[str, Any]
    fits: Callable[[tuple[int, ...]], bool]  # layer indices of assigned blocks -> within memory budget?


def registry_from_status(status: protocol.CoordinatorStatusMessage) -> BlockRegistry:
    blocks = tuple(
        NewBlock(k, layer, source)
        for k, (layer, source) in enumerate(zip(status.new_layer_indices, status.source_layers, strict=True))
    )
    registry = BlockRegistry(status.base_num_layers, blocks)
    plan = ExpansionPlan(status.base_num_layers, tuple(b.source_layer for b in blocks))
    if plan.registry() != registry:
        raise FedbeError(
            f"the coordinator's expansion (new layers {list(status.new_layer_indices)} after base layers "
            f"{list(status.source_layers)}) is not a valid block expansion"
        )
    return registry


def build_client_model(
    base: PreTrainedModel, fingerprint: str, status: protocol.CoordinatorStatusMessage, precision: str
) -> ClientModel:
    """Expand ``base`` (in place) exactly as the coordinator did and freeze it in ``precision``."""
    if fingerprint != status.base_fingerprint:
        raise BaseModelMismatchError(
            f"this device's base model ({fingerprint}) differs from the federation's ({status.base_fingerprint}); "
            "blocks trained on different bases can not be averaged. Install the same model and pass it with --model.",
            found=fingerprint, expected=status.base_fingerprint,
        )
    registry = registry_from_status(status)
    if base.config.num_hidden_layers != registry.base_num_layers:
        raise FedbeError(
            f"the base has {base.config.num_hidden_layers} layers, the federation {registry.base_num_layers}"
        )
    expanded = expand_model(
        base, ExpansionPlan(registry.base_num_layers, tuple(b.source_layer for b in registry.blocks))
    )
    frozen = freeze_base(base, expanded, precision)
    return ClientModel(base, expanded, fingerprint, frozen.precision.value)


def peak_memory_bytes() -> int:
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


class TaskRunner:
    """Runs one task on a :class:`ClientModel`; keeps the error-feedback residual across rounds."""

    def __init__(
        self,
        client: ClientModel,
        client_id: str,
        train_batches: Callable[[int, int, int], list[Any]],
        evaluate: Callable[[PreTrainedModel, int], tuple[int, float, float]],
        capacity: AnnouncedCapacity,
        slowdown: float = 1.0,
        label_prior: Callable[[tuple[str, ...]], LabelPrior | None] | None = None,
    ) -> None:
        self.client = client
        self.client_id = client_id
        self.train_batches = train_batches  # (batch_size, max_tokens, seed) -> batches
        self.evaluate = evaluate  # (model, max_tokens) -> (examples, loss, accuracy)
        self.capacity = capacity
        self.slowdown = slowdown  # emulating a slower device: each step is stretched by this factor
        # the federation's labels -> this client's label prior (None: no labelled data, or unusable)
        self.label_prior = label_prior
        self.residual: BlockState = {}
        # The base's cached predictions for self-distillation: valid for this model and data only
        # (a new TaskRunner is built when the expansion or the base changes).
        self.base_cache: BaseCache | None = None

    def check(self, task: protocol.TaskMessage) -> str | None:
        """Why this task can not be run here, or None."""
        registry = self.client.registry
        if task.client_id != self.client_id:
            return f"task is addressed to {task.client_id!r}, not {self.client_id!r}"
        unknown = [b for b in task.block_ids if b not in registry.block_ids]
        if unknown:
            return f"task assigns unknown blocks {unknown}; this model has blocks {list(registry.block_ids)}"
        missing = [b for b in task.block_ids if b not in task.weights]
        if missing:
            return f"task assigns blocks {missing} without sending their weights"
        try:
            protocol.validate_blocks(task.weights, block_layout(self.client.model, registry))
        except CodecError as exc:
            return str(exc)
        if not task.block_ids and not task.evaluate:
            return "task has no blocks to train and no evaluation: nothing to do"
        return None

    def fits(self, task: protocol.TaskMessage) -> bool:
        if not task.block_ids:  # evaluation only: no trainable block, no optimizer state
            return True
        layers = tuple(self.client.registry.block(b).layer_index for b in task.block_ids)
        return self.capacity.fits(layers)

    def _stretch(self) -> Callable[[int, float], None]:
        """An on_step hook that sleeps so each step lasts ``slowdown`` times its real duration."""
        last = [time.perf_counter()]

        def on_step(step: int, loss: float) -> None:
            now = time.perf_counter()
            time.sleep((self.slowdown - 1.0) * (now - last[0]))
            last[0] = time.perf_counter()

        return on_step

    def run(self, task: protocol.TaskMessage, should_stop: Callable[[], bool]) -> list[Any]:
        """The messages that answer ``task`` (an update and/or an eval result, or a task error)."""
        model, registry = self.client.model, self.client.registry
        sent = decompress_state(task.weights)
        set_block_state(model, registry, sent)
        skipped = [b for b in registry.block_ids if b not in sent]
        replies: list[Any] = []
        with bypassed(model, registry, skipped):
            if task.block_ids:
                recipe = task.recipe
                torch.manual_seed(task.seed)
                batches = self.train_batches(recipe.batch_size, recipe.max_tokens, task.seed)
                top_k = recipe.distill_top_k if recipe.distill_lambda_in_round(task.round) > 0 else 0
                if top_k and (self.base_cache is None or self.base_cache.top_k != top_k):
                    self.base_cache = BaseCache(top_k)
                prior = (
                    self.label_prior(task.balance_labels)
                    if recipe.label_balance and task.balance_labels and self.label_prior
                    else None
                )
                result = train_blocks(
                    model, registry, task.block_ids, batches, recipe, task.round,
                    deadline_seconds=task.deadline_seconds if task.deadline_seconds > 0 else None,
                    should_stop=should_stop, base_cache=self.base_cache, label_prior=prior,
                )  # fmt: skip
                if result.stopped_early:
                    return [
                        protocol.TaskErrorMessage(
                            task.round,
                            task.task_id,
                            self.client_id,
                            "abandoned",
                            f"stopped after {result.steps} of {recipe.steps} steps (shutdown)",
                        )
                    ]
                trained = get_block_state(model, registry, task.block_ids)
                delta = block_delta(trained, {b: sent[b] for b in task.block_ids})
                # A block this client did not train before starts with a zero residual (the set of
                # assigned blocks changes from round to round).
                residual = {
                    b: self.residual.get(b) or {n: torch.zeros_like(t) for n, t in delta[b].items()}
                    for b in task.block_ids
                }
                compressed, new_residual = compress_state(delta, task.upload_level, residual)
                self.residual.update(new_residual)
                replies.append(
                    protocol.UpdateMessage(
                        round=task.round,
                        task_id=task.task_id,
                        client_id=self.client_id,
                        level=task.upload_level,
                        blocks=compressed,
                        num_samples=result.samples,
                        num_steps=result.steps,
                        mean_loss=result.mean_loss if result.steps else 0.0,
                        wall_seconds=result.wall_seconds,
                        peak_memory_bytes=peak_memory_bytes(),
                    )
                )
            if task.evaluate:
                n, loss, accuracy = self.evaluate(model, task.recipe.max_tokens)
                replies.append(
                    protocol.EvalResultMessage(task.round, task.task_id, self.client_id, n, loss, accuracy)
                )
        return replies


class EdgeAgent:
    """Glue between the MQTT connection and the :class:`TaskRunner` (all on the agent's own thread)."""

    def __init__(
        self,
        connection: Connection,
        topics: Topics,
        client_id: str,
        setup: Callable[[protocol.CoordinatorStatusMessage], tuple[TaskRunner, protocol.AnnounceMessage]],
        stop: threading.Event | None = None,
    ) -> None:
        self.conn = connection
        self.topics = topics
        self.client_id = client_id
        self.setup = setup
        self.stop = stop or threading.Event()
        self.runner: TaskRunner | None = None
        self.status_key: tuple[Any, ...] | None = None
        self.announcement: protocol.AnnounceMessage | None = None
        self.tasks_done = 0

    def _send(self, kind: ClientTopic, msg: Any, retain: bool = False) -> None:
        self.conn.publish(
            self.topics.client(self.client_id, kind), protocol.encode(msg), retain=retain, wait=30
        )

    def status(self, state: str, round_: int = 0, detail: str = "") -> None:
        self._send(
            ClientTopic.STATUS, protocol.StatusMessage(self.client_id, state, round_, detail), retain=True
        )

    def run(self, max_tasks: int | None = None) -> int:
        for kind in (ClientTopic.TASK, ClientTopic.NOTICE):
            self.conn.subscribe(self.topics.client(self.client_id, kind))
        self.conn.subscribe(self.topics.coordinator_status())
        self.status("online", detail="waiting for the coordinator")
        log.info("%s online; waiting for the coordinator's status", self.client_id)
        try:
            while not self.stop.is_set():
                try:
                    topic, payload = self.conn.inbox.get(timeout=0.5)
                except queue.Empty:
                    continue
                code = self._handle(topic, payload)
                if code is not None:
                    return code
                if max_tasks is not None and self.tasks_done >= max_tasks:
                    return 0
            return 0
        finally:
            self.status("offline", detail="stopped")
            self.conn.close()

    def _handle(self, topic: str, payload: bytes) -> int | None:
        if topic == self.topics.coordinator_status():
            return self._on_coordinator(payload)
        parsed = self.topics.parse_client_topic(topic)
        if parsed is None or parsed[0] != self.client_id:
            log.warning("ignoring a message on unexpected topic %s", topic)
            return None
        if parsed[1] is ClientTopic.NOTICE:
            try:
                notice = protocol.decode(payload, expected_type=protocol.NoticeMessage)
            except CodecError as exc:
                log.warning("ignoring an invalid notice: %s", exc)
                return None
            if notice.code == "refused":
                log.error("the coordinator refused this client: %s", notice.reason)
                return 3
            return None
        if parsed[1] is ClientTopic.TASK:
            try:
                self._on_task(payload)
            except FedbeError as exc:  # a task must never take the agent down
                log.error("task failed: %s", exc)
                self._send(ClientTopic.ERROR, protocol.TaskErrorMessage(0, "unknown", self.client_id, "failed",
                                                                       str(exc)[:4000]))  # fmt: skip
        return None

    def _on_coordinator(self, payload: bytes) -> int | None:
        try:
            status = protocol.decode(payload, expected_type=protocol.CoordinatorStatusMessage)
        except CodecError as exc:
            log.warning("ignoring an invalid coordinator status: %s", exc)
            return None
        if status.state == "finished" and self.runner is not None:
            log.info("the coordinator says the federation is %s", status.state)
            return 0
        key = (
            status.base_fingerprint,
            status.base_num_layers,
            status.new_layer_indices,
            status.source_layers,
        )
        if key == self.status_key:
            # A (re)started coordinator publishes "starting": announce again so that its registry,
            # restored from disk with every client offline, sees this one. (Not after every round.)
            if self.announcement is not None and status.state == "starting":
                self._send(ClientTopic.ANNOUNCE, self.announcement)
            return None
        if self.status_key is not None:
            # The coordinator chose another expansion (blocks: auto): rebuild the model from the base.
            log.info(
                "the federation's expansion changed to new layers %s; rebuilding",
                list(status.new_layer_indices),
            )
            self.runner = None
        try:
            self.runner, announce = self.setup(status)
        except FedbeError as exc:
            log.error("%s", exc)
            self.status("offline", detail=str(exc)[:4000])
            return 2
        self.status_key = key
        self.announcement = announce
        self._send(ClientTopic.ANNOUNCE, announce)
        self.status("online", detail="announced")
        log.info(
            "announced: %d new blocks in the federation, up to %d trainable here",
            len(status.new_layer_indices),
            announce.max_trainable_blocks,
        )
        return None

    def _on_task(self, payload: bytes) -> None:
        try:
            task = protocol.decode(payload, expected_type=protocol.TaskMessage)
        except CodecError as exc:
            log.error("refusing an invalid task: %s", exc)
            self._send(
                ClientTopic.ERROR,
                protocol.TaskErrorMessage(0, "unknown", self.client_id, "invalid_task", str(exc)[:4000]),
            )
            return
        if self.runner is None:
            self._error(task, "busy", "not set up yet: no coordinator status received")
            return
        problem = self.runner.check(task)
        if problem is not None:
            log.error("refusing task %s: %s", task.task_id, problem)
            self._error(task, "invalid_task", problem)
            return
        try:
            fits = self.runner.fits(task)
        except FedbeError as exc:  # answer for this task's round, so the coordinator does not wait for it
            self._error(task, "failed", f"could not check the memory budget: {exc}")
            return
        if not fits:
            self._error(
                task,
                "refused_memory",
                f"training blocks {list(task.block_ids)} exceeds this device's memory budget",
            )
            return
        log.info("round %d: training blocks %s for %d steps", task.round, list(task.block_ids), task.recipe.steps)
        self.status("training", task.round)
        started = time.perf_counter()
        try:
            replies = self.runner.run(task, self.stop.is_set)
        except FedbeError as exc:
            self._error(task, "failed", str(exc))
            return
        except torch.OutOfMemoryError as exc:
            self._error(task, "refused_memory", f"ran out of memory: {exc}")
            return
        for reply in replies:
            kind = {
                protocol.UpdateMessage: ClientTopic.UPDATE,
                protocol.EvalResultMessage: ClientTopic.EVAL,
                protocol.TaskErrorMessage: ClientTopic.ERROR,
            }[type(reply)]
            self._send(kind, reply)
        self.tasks_done += 1
        self.status(
            "online", task.round, f"task {task.task_id} done in {time.perf_counter() - started:.1f} s"
        )

    def _error(self, task: protocol.TaskMessage, code: str, reason: str) -> None:
        self._send(
            ClientTopic.ERROR,
            protocol.TaskErrorMessage(task.round, task.task_id, self.client_id, code, reason[:4000]),
        )


def make_evaluator(
    eval_batches: Callable[[int], list[Any]],
    accuracy: Callable[[PreTrainedModel, int], float] | None,
    num_examples: int,
) -> Callable[[PreTrainedModel, int], tuple[int, float, float]]:
    def evaluate(model: PreTrainedModel, max_tokens: int) -> tuple[int, float, float]:
        loss = evaluate_loss(model, eval_batches(max_tokens))
        acc = accuracy(model, max_tokens) if accuracy is not None else 0.0
        return num_examples, loss, acc

    return evaluate
