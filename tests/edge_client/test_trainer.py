"""The local trainer trains exactly the assigned blocks and honours its budget."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from edge_client.trainer import evaluate_loss, train_blocks
from fedbe import expansion, quantization, sources
from fedbe.blocks import get_block_state
from fedbe.datasets import Batch
from fedbe.errors import FedbeError
from fedbe.recipe import PLAIN


def _batches(n: int = 2, seed: int = 0) -> list[Batch]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 512, (4, 16), generator=g)
        ids[:, 8:] = 7  # a learnable target: the answer is always token 7
        labels = ids.clone()
        labels[:, :8] = -100
        out.append(Batch(ids, torch.ones_like(ids), labels))
    return out


@pytest.fixture
def expanded() -> tuple[torch.nn.Module, expansion.BlockRegistry]:
    torch.manual_seed(0)
    model = sources.build_tiny_model("llama")
    registry = expansion.expand_model(model, expansion.plan_expansion(4, 2, "interleave"))
    quantization.freeze_base(model, registry, "nf4")
    return model, registry


def test_loss_goes_down_and_only_the_assigned_block_changes(expanded) -> None:
    model, registry = expanded
    batches = _batches()
    before = {name: t.detach().clone() for name, t in model.state_dict().items()}
    blocks_before = get_block_state(model, registry)
    loss0 = evaluate_loss(model, batches)
    result = train_blocks(model, registry, [1], batches, replace(PLAIN, steps=40, lr=1e-2))
    assert result.steps == 40 and result.samples == 40 * 4
    # (the tiny tied head caps logits near +-1.5, so the loss floor is ~4.5, not 0)
    assert evaluate_loss(model, batches) < 0.85 * loss0
    blocks_after = get_block_state(model, registry)
    assert all(torch.equal(blocks_before[0][n], blocks_after[0][n]) for n in blocks_before[0])
    assert any(not torch.equal(blocks_before[1][n], blocks_after[1][n]) for n in blocks_before[1])
    trained_prefix = f"model.layers.{registry.block(1).layer_index}."
    for name, tensor in model.state_dict().items():
        if not name.startswith(trained_prefix):
            assert torch.equal(tensor, before[name]), name
    assert not any(p.requires_grad for p in model.parameters())  # frozen again afterwards


def test_deadline_stops_training_early(expanded) -> None:
    model, registry = expanded
    result = train_blocks(model, registry, [0, 1], _batches(), replace(PLAIN, steps=1000), deadline_seconds=0.0)
    assert result.stopped_by_deadline and result.steps == 0


def test_non_finite_loss_is_reported_not_trained_on(expanded) -> None:
    model, registry = expanded
    with torch.no_grad():
        expansion.new_block_module(model, registry, 0).mlp.up_proj.weight.fill_(float("inf"))
    with pytest.raises(FedbeError, match="learning rate"):
        train_blocks(model, registry, [0], _batches(), replace(PLAIN, steps=5))


def test_invalid_config_and_block_ids_are_rejected(expanded) -> None:
    model, registry = expanded
    with pytest.raises(FedbeError, match="steps"):
        replace(PLAIN, steps=0)
    with pytest.raises(FedbeError, match="lr must be"):
        replace(PLAIN, lr=float("nan"))
    with pytest.raises(FedbeError, match="unknown block id"):
        train_blocks(model, registry, [7], _batches(), replace(PLAIN, steps=1))
