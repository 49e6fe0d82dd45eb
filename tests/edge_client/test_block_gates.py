"""Per-block gates (``TrainConfig.block_gate``): a scalar per trained block, folded in when training ends."""

from __future__ import annotations

import pytest
import torch

from edge_client.trainer import TrainConfig, _forward_logits, block_gates, train_blocks
from fedbe import expansion, quantization, sources
from fedbe.blocks import get_block_state
from fedbe.datasets import Batch


def _batches(n: int = 2, seed: int = 0) -> list[Batch]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 256, (4, 16), generator=g)
        ids[:, 12:] = 7
        labels = torch.full_like(ids, -100)
        labels[:, 12:] = 7
        out.append(Batch(ids, torch.ones_like(ids), labels))
    return out


def _model(arch: str = "llama") -> tuple[torch.nn.Module, expansion.BlockRegistry]:
    torch.manual_seed(0)
    model = sources.build_tiny_model(arch)
    registry = expansion.expand_model(model, expansion.plan_expansion(4, 2, "interleave"))
    quantization.freeze_base(model, registry, "fp32")
    return model, registry


def _projections(model, registry, block_id: int) -> list[torch.nn.Module]:
    block = expansion.new_block_module(model, registry, block_id)
    return [block.get_submodule(p) for p in expansion.architecture_of(model).output_projections]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_gate_scales_the_blocks_contribution_and_folds_into_it_exactly(arch: str) -> None:
    model, registry = _model(arch)
    batch = _batches(1)[0]
    # give the blocks something to add (a new block starts as the identity)
    train_blocks(model, registry, [0, 1], [batch], TrainConfig(steps=3, lr=1e-2))
    with torch.no_grad():
        trained = _forward_logits(model, batch)
        with expansion.bypassed(model, registry):
            base = _forward_logits(model, batch)
    before = {n: t.clone() for n, t in get_block_state(model, registry)[1].items()}
    assert not torch.allclose(trained, base, atol=1e-4)
    with block_gates(model, registry, [1]) as gates:
        assert set(gates) == {1} and float(gates[1].detach()) == 1.0 and gates[1].requires_grad
        with torch.no_grad():
            assert torch.equal(_forward_logits(model, batch), trained)  # a gate of 1 changes nothing
            gates[1].fill_(0.0)
            with expansion.bypassed(model, registry, [1]):
                without_block_1 = _forward_logits(model, batch)
            assert torch.allclose(_forward_logits(model, batch), without_block_1, atol=1e-5)  # 0: block off
            gates[1].fill_(0.7)
            gated = _forward_logits(model, batch)
    assert not torch.allclose(gated, trained, atol=1e-4)
    with torch.no_grad():
        folded = _forward_logits(model, batch)
    assert torch.allclose(folded, gated, atol=1e-5)  # the fold computes what the gated block computed
    after = get_block_state(model, registry)[1]
    assert set(after) == set(before)  # no gate in the block's state
    projection_names = expansion.architecture_of(model).output_projections
    for name, tensor in after.items():
        expected = before[name] * 0.7 if name.startswith(projection_names) else before[name]
        assert torch.allclose(tensor, expected), name
    assert all(not p._forward_hooks for p in _projections(model, registry, 1))


def test_gates_are_folded_and_their_hooks_removed_when_training_fails() -> None:
    model, registry = _model()
    train_blocks(model, registry, [0], _batches(1), TrainConfig(steps=2, lr=1e-2))
    weight = _projections(model, registry, 0)[0].weight.detach().clone()
    with pytest.raises(RuntimeError, match="boom"), block_gates(model, registry, [0]) as gates:
        with torch.no_grad():
            gates[0].fill_(0.5)
        raise RuntimeError("boom")
    assert torch.allclose(_projections(model, registry, 0)[0].weight, weight * 0.5)
    assert all(not p._forward_hooks for p in _projections(model, registry, 0))


def test_gated_training_trains_the_gates_and_reports_them() -> None:
    model, registry = _model()
    result = train_blocks(
        model, registry, [0, 1], _batches(), TrainConfig(steps=20, lr=1e-2, block_gate=True)
    )
    assert set(result.gates) == {0, 1}
    assert max(abs(g - 1.0) for g in result.gates.values()) > 1e-3, result.gates  # they moved
    for block_id in (0, 1):
        assert all(not p._forward_hooks for p in _projections(model, registry, block_id))
    assert not any(p.requires_grad for p in model.parameters())
    plain = train_blocks(*_model(), [0, 1], _batches(), TrainConfig(steps=2, lr=1e-2))
    assert plain.gates == {}


def test_a_gate_on_a_fresh_block_leaves_the_first_step_unchanged() -> None:
    # a fresh block adds zero, so its gate has no gradient at the first step: one step with gates
    # must move the block exactly as one step without (the gate is also outside the clipping)
    states = []
    for gate in (False, True):
        model, registry = _model()
        torch.manual_seed(3)
        config = TrainConfig(steps=1, lr=1e-2, distill_lambda=1.0, block_gate=gate, max_grad_norm=1e-3)
        result = train_blocks(model, registry, [0, 1], _batches(1), config)
        states.append(get_block_state(model, registry))
        if gate:
            assert result.gates == {0: 1.0, 1: 1.0}
    for block_id in (0, 1):
        for name, tensor in states[0][block_id].items():
            assert torch.equal(tensor, states[1][block_id][name]), (block_id, name)
