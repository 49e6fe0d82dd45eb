"""The task runner across rounds whose block assignment changes (error-feedback residual per block)."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from edge_client.agent import AnnouncedCapacity, TaskRunner, build_client_model
from edge_client.data import make_local_batches
from fedbe import protocol, sources
from fedbe.blocks import get_block_state
from fedbe.compression import Level, compress_state
from fedbe.datasets import Example
from fedbe.errors import BaseModelMismatchError
from fedbe.expansion import expand_model, plan_expansion
from fedbe.fingerprint import base_fingerprint
from fedbe.recipe import Recipe


def _runner() -> tuple[TaskRunner, dict]:
    """A task runner over a tiny expanded llama (2 new blocks) and the blocks' starting weights."""
    base = sources.build_tiny_model("llama")
    registry = plan_expansion(4, 2, "interleave").registry()
    status = protocol.CoordinatorStatusMessage(
        "running", 0, base_fingerprint(base), 4, registry.new_layer_indices,
        tuple(b.source_layer for b in registry.blocks),
    )  # fmt: skip
    reference = sources.build_tiny_model("llama")
    weights = get_block_state(reference, expand_model(reference, plan_expansion(4, 2, "interleave")))
    client = build_client_model(base, base_fingerprint(base), status, "fp32")
    tokenizer = sources.load_tokenizer("tiny:llama")
    examples = [Example(f"text number {i} about sport", "sport") for i in range(8)]

    def batches(batch_size: int, max_tokens: int, seed: int) -> list[Any]:
        return make_local_batches(tokenizer, examples, batch_size, max_tokens)

    runner = TaskRunner(
        client, "c1", batches, lambda model, n: (0, 0.0, 0.0), AnnouncedCapacity({}, lambda layers: True)
    )
    return runner, weights


def _task(
    round_: int, blocks: tuple[int, ...], weights: dict, level: Level = Level.FP32, **overrides: Any
) -> protocol.TaskMessage:
    """A training task sending ``weights`` at ``level``, passed through the wire codec as a client gets it;
    ``overrides`` set task fields or recipe fields."""
    knobs = {f.name for f in dataclasses.fields(Recipe)}
    recipe = Recipe(**{"steps": 1, "lr": 1e-3, "batch_size": 4, "max_tokens": 32, "distill_lambda": 0.0,
                       **{k: v for k, v in overrides.items() if k in knobs}})  # fmt: skip
    fields: dict[str, Any] = dict(
        round=round_, task_id=f"t{round_}", client_id="c1", block_ids=blocks, download_level=level,
        weights=compress_state(weights, level)[0], upload_level=Level.INT8, recipe=recipe,
        deadline_seconds=0.0, seed=round_, evaluate=False,
    )  # fmt: skip
    fields.update({k: v for k, v in overrides.items() if k not in knobs})
    return protocol.decode(protocol.encode(protocol.TaskMessage(**fields)))


def test_a_block_assigned_for_the_first_time_after_int8_rounds_of_another_block_trains() -> None:
    runner, weights = _runner()
    for round_, blocks in ((1, (1,)), (2, (0, 1)), (3, (0,))):  # the set of blocks changes every round
        (reply,) = runner.run(_task(round_, blocks, {b: weights[b] for b in blocks}), lambda: False)
        assert isinstance(reply, protocol.UpdateMessage), reply
        assert sorted(reply.blocks) == list(blocks)
    assert sorted(runner.residual) == [0, 1]


def test_a_block_sent_but_not_assigned_runs_frozen_and_changes_what_the_assigned_block_learns() -> None:
    """The task carries every block's weights and assigns one; the client trains only that one, inside
    the model with the other block in place (a block whose weights a task does not carry is bypassed)."""
    import torch

    from fedbe.compression import decompress_state

    g = torch.Generator().manual_seed(0)
    _, start = _runner()
    weights = {
        b: {n: t + 0.05 * torch.randn(t.shape, generator=g) for n, t in p.items()} for b, p in start.items()
    }
    deltas = []
    for sent in ((0, 1), (1,)):  # block 0 in place (context), then bypassed
        runner, _ = _runner()
        task = _task(1, (1,), {b: weights[b] for b in sent}, upload_level=Level.FP32, steps=2)
        (reply,) = runner.run(task, lambda: False)
        assert isinstance(reply, protocol.UpdateMessage), reply
        assert sorted(reply.blocks) == [1]  # the context block is not trained and not sent back
        deltas.append(decompress_state(reply.blocks)[1]["mlp.down_proj.weight"])
    assert not torch.allclose(deltas[0], deltas[1])


def test_weights_sent_as_int8_train_and_the_update_is_the_change_from_what_arrived() -> None:
    """download_level int8: the client runs the dequantized weights it was sent, and its
    update added to those weights gives exactly the block it trained (the server's fp32 copy never
    reaches the client, so the update can not be measured from it)."""
    import torch

    from fedbe.blocks import get_block_state
    from fedbe.compression import decompress_state

    runner, weights = _runner()
    g = torch.Generator().manual_seed(3)
    weights = {
        b: {n: t + 0.05 * torch.randn(t.shape, generator=g) for n, t in p.items()} for b, p in weights.items()
    }
    task = _task(1, (1,), weights, Level.INT8, upload_level=Level.FP32, steps=2)
    arrived = decompress_state(task.weights)
    (reply,) = runner.run(task, lambda: False)
    assert isinstance(reply, protocol.UpdateMessage), reply
    trained = get_block_state(runner.client.model, runner.client.registry, (1,))[1]
    update = decompress_state(reply.blocks)[1]
    for name, t in trained.items():
        assert torch.allclose(arrived[1][name] + update[name], t, atol=1e-6), name
    assert any(not torch.equal(arrived[1][n], weights[1][n]) for n in arrived[1])  # int8 rounded them
    assert any(not torch.equal(update[n], torch.zeros_like(update[n])) for n in update)


def test_distill_rows_travels_in_the_task_and_limits_what_the_cache_fills() -> None:
    """A task's distill_rows reaches the trainer: 2 steps of 4-row batches distilling 1 row each fill
    the base cache for 2 articles, not 8."""
    for rows, cached in ((1, 2), (0, 8)):
        runner, weights = _runner()
        task = _task(1, (0, 1), weights, steps=2, distill_lambda=1.0, distill_top_k=8, distill_rows=rows)
        assert task.recipe.distill_rows == rows
        (reply,) = runner.run(task, lambda: False)
        assert isinstance(reply, protocol.UpdateMessage), reply
        assert runner.base_cache is not None and len(runner.base_cache) == cached


def test_the_label_prior_is_the_clients_own_counts_on_the_labels_first_tokens(caplog: Any) -> None:
    from edge_client.service import label_prior_for
    from fedbe.evaluation import label_token_ids

    smollm2 = sources.load_tokenizer(sources.resolve_source("smollm2-135m"))
    train = [Example(f"text number {i}", "sport" if i % 4 else "tech") for i in range(8)]
    labels = ("business", "sport", "tech")
    prior = label_prior_for(smollm2, train)(labels)
    assert prior is not None and prior.counts == (0.0, 6.0, 2.0)  # its own counts; business absent
    assert prior.token_ids == tuple(t[0] for t in label_token_ids(smollm2, labels))
    assert len(set(prior.token_ids)) == 3
    assert label_prior_for(smollm2, [])(labels) is None  # unlabelled data: plain cross-entropy
    # the byte tokenizer of the tiny models starts every " label" with the space byte: no prior
    assert label_prior_for(sources.load_tokenizer("tiny:llama"), train)(labels) is None
    assert "share a first token" in caplog.text


def test_a_task_with_balance_labels_trains_the_label_balanced_loss() -> None:
    """The task's labels reach the trainer through the runner's prior factory; without labels in the
    task, or without a prior, the loss is plain cross-entropy."""
    from edge_client.loss import LabelPrior

    seen: list[tuple[str, ...]] = []

    def factory(labels: tuple[str, ...]) -> LabelPrior:
        seen.append(labels)
        # the tiny byte tokenizer: " sport" is the space byte (35), then "s" (118); the runner's examples
        # are all "sport", so offsets on the space byte change the loss of every label position
        return LabelPrior((35, 120, 121), (8.0, 0.0, 0.0))

    losses = {}
    abc = ("a", "b", "c")
    for name, task_labels, prior, balance in (("plain", (), factory, True), ("balanced", abc, factory, True),
                                              ("no prior", abc, None, True), ("off", abc, factory, False)):  # fmt: skip
        runner, weights = _runner()
        runner.label_prior = prior
        task = _task(1, (0, 1), weights, balance_labels=task_labels, label_balance=balance)
        (reply,) = runner.run(task, lambda: False)
        assert isinstance(reply, protocol.UpdateMessage), reply
        losses[name] = reply.mean_loss
    assert seen == [abc]  # a recipe without the balanced loss does not even ask for a prior
    assert losses["no prior"] == losses["plain"] == losses["off"]
    assert abs(losses["balanced"] - losses["plain"]) > 1e-4


def test_a_base_model_other_than_the_federations_is_refused() -> None:
    base = sources.build_tiny_model("llama")
    registry = plan_expansion(4, 2, "interleave").registry()
    status = protocol.CoordinatorStatusMessage(
        "running", 0, "llama-4L-00000000deadbeef", 4, registry.new_layer_indices,
        tuple(b.source_layer for b in registry.blocks),
    )  # fmt: skip
    with pytest.raises(BaseModelMismatchError, match="differs from the federation's") as info:
        build_client_model(base, base_fingerprint(base), status, "fp32")
    assert (info.value.found, info.value.expected) == (base_fingerprint(base), "llama-4L-00000000deadbeef")
