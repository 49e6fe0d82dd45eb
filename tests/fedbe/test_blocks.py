"""Block state: reading and writing new blocks, deltas, weighted averages, files."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import PreTrainedModel

from fedbe.blocks import (
    BlockState,
    apply_delta,
    block_delta,
    flat_key,
    get_block_state,
    load_block_state,
    save_block_state,
    set_block_state,
    set_trainable,
    split_key,
    trainable_parameters,
    weighted_average,
)
from fedbe.errors import BlockStateError, ExpansionError
from fedbe.expansion import BlockRegistry, expand_model, new_block_module, plan_expansion
from fedbe.sources import build_tiny_model

LLAMA_BLOCK_PARAMS = {
    "self_attn.q_proj.weight": (64, 64),
    "self_attn.k_proj.weight": (32, 64),  # 2 key/value heads of 16
    "self_attn.v_proj.weight": (32, 64),
    "self_attn.o_proj.weight": (64, 64),
    "mlp.gate_proj.weight": (128, 64),
    "mlp.up_proj.weight": (128, 64),
    "mlp.down_proj.weight": (64, 128),
    "input_layernorm.weight": (64,),
    "post_attention_layernorm.weight": (64,),
}


def expanded(seed: int = 0) -> tuple[PreTrainedModel, BlockRegistry]:
    model = build_tiny_model("llama", seed=seed)
    return model, expand_model(model, plan_expansion(4, 2, "interleave"))


def perturbed(state: BlockState, seed: int = 5) -> BlockState:
    generator = torch.Generator().manual_seed(seed)
    return {
        block_id: {n: v + torch.randn(v.shape, generator=generator) for n, v in tensors.items()}
        for block_id, tensors in state.items()
    }


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def assert_states_equal(a: BlockState, b: BlockState) -> None:
    assert a.keys() == b.keys()
    for block_id in a:
        assert a[block_id].keys() == b[block_id].keys()
        for name in a[block_id]:
            assert torch.equal(a[block_id][name], b[block_id][name]), (block_id, name)


# --- reading and writing the model ---------------------------------------------------------------


def test_block_state_names_shapes_and_copies() -> None:
    model, registry = expanded()
    state = get_block_state(model, registry)
    assert sorted(state) == [0, 1]
    assert {n: tuple(v.shape) for n, v in state[0].items()} == LLAMA_BLOCK_PARAMS
    assert all(v.dtype == torch.float32 and not v.requires_grad for v in state[1].values())
    assert state[1]["self_attn.o_proj.weight"].eq(0).all()  # a fresh block: zero output projection
    state[0]["mlp.up_proj.weight"].add_(1.0)  # a copy: the model is not touched
    in_model = new_block_module(model, registry, 0).mlp.up_proj.weight
    assert not torch.equal(in_model, state[0]["mlp.up_proj.weight"])
    assert list(get_block_state(model, registry, [1])) == [1]
    with pytest.raises(ExpansionError, match="unknown block id 2"):
        get_block_state(model, registry, [2])


def test_set_then_get_round_trip_moves_a_block_between_models() -> None:
    source, registry = expanded(seed=0)
    target, _ = expanded(seed=0)
    trained = perturbed(get_block_state(source, registry, [1]))
    set_block_state(source, registry, trained)
    assert_states_equal(get_block_state(source, registry, [1]), trained)
    assert_states_equal(get_block_state(source, registry, [0]), get_block_state(target, registry, [0]))

    ids = torch.arange(3, 27).unsqueeze(0)
    with torch.no_grad():
        before = target(ids).logits
        set_block_state(target, registry, get_block_state(source, registry))
        after, expected = target(ids).logits, source(ids).logits
    assert torch.equal(after, expected)
    assert not torch.equal(before, expected)


def _bad_state(kind: str) -> tuple[BlockState, str]:
    model, registry = expanded()
    state = get_block_state(model, registry)
    if kind == "shape":
        state[1]["mlp.down_proj.weight"] = torch.zeros(128, 64)
        return state, (
            r"block 1 parameter mlp.down_proj.weight: shape \(128, 64\) does not match \(64, 128\)"
        )
    if kind == "missing":
        del state[0]["self_attn.k_proj.weight"]
        return state, r"block 0 parameters do not match: missing \['self_attn.k_proj.weight'\]"
    state[1]["self_attn.extra.weight"] = torch.zeros(2)
    return state, r"block 1 parameters do not match: missing \[\], unexpected \['self_attn.extra.weight'\]"


@pytest.mark.parametrize("kind", ["shape", "missing", "extra"])
def test_set_block_state_rejects_a_mismatched_state(kind: str) -> None:
    model, registry = expanded()
    state, message = _bad_state(kind)
    with pytest.raises(BlockStateError, match=message):
        set_block_state(model, registry, state)


def test_set_block_state_rejects_an_unknown_block() -> None:
    model, registry = expanded()
    state = get_block_state(model, registry, [0])
    with pytest.raises(ExpansionError, match="unknown block id 3"):
        set_block_state(model, registry, {3: state[0]})


def test_rejected_state_leaves_the_model_unchanged() -> None:
    model, registry = expanded()
    before = get_block_state(model, registry)
    bad = perturbed(before)
    bad[1]["mlp.down_proj.weight"] = torch.zeros(128, 64)  # block 0 and most of block 1 are fine
    with pytest.raises(BlockStateError):
        set_block_state(model, registry, bad)
    assert_states_equal(get_block_state(model, registry), before)


def test_set_trainable_returns_exactly_the_blocks_parameters() -> None:
    model, registry = expanded()
    params = set_trainable(model, registry, [1, 0])
    block_0, block_1 = (new_block_module(model, registry, b) for b in (0, 1))
    expected = [*block_0.parameters(), *block_1.parameters()]
    assert [id(p) for p in params] == [id(p) for p in expected]
    assert {id(p) for p in trainable_parameters(model)} == {id(p) for p in expected}
    set_trainable(model, registry, [1])  # re-assigning closes the previous block
    assert {id(p) for p in trainable_parameters(model)} == {id(p) for p in block_1.parameters()}
    with pytest.raises(ExpansionError, match="duplicate"):
        set_trainable(model, registry, [1, 1])
    new_block_module(model, registry, 0).to(torch.bfloat16)
    with pytest.raises(BlockStateError, match="block 0 holds a torch.bfloat16 parameter"):
        set_trainable(model, registry, [0])


# --- deltas and averages (pure) ------------------------------------------------------------------


def test_delta_and_apply_by_hand() -> None:
    reference = {0: {"w": t(1.0, 2.0), "b": t(0.5)}, 1: {"w": t(3.0, 3.0)}}
    new = {0: {"w": t(1.5, 1.0), "b": t(0.5)}}
    delta = block_delta(new, reference)
    assert_states_equal(delta, {0: {"w": t(0.5, -1.0), "b": t(0.0)}})
    assert_states_equal(apply_delta(reference, delta), {0: new[0], 1: reference[1]})
    assert_states_equal(
        apply_delta(reference, delta, scale=2.0), {0: {"w": t(2.0, 0.0), "b": t(0.5)}, 1: {"w": t(3.0, 3.0)}}
    )
    assert torch.equal(reference[0]["w"], t(1.0, 2.0))  # the reference itself is not modified


def test_delta_and_apply_are_inverse_on_model_state() -> None:
    model, registry = expanded()
    reference = get_block_state(model, registry)
    new = perturbed(reference)
    restored = apply_delta(reference, block_delta(new, reference))
    for block_id in new:
        for name in new[block_id]:
            torch.testing.assert_close(restored[block_id][name], new[block_id][name], rtol=0, atol=1e-6)


def test_delta_errors() -> None:
    reference = {0: {"w": t(1.0)}}
    with pytest.raises(BlockStateError, match="block 1 has no reference"):
        block_delta({1: {"w": t(1.0)}}, reference)
    mismatch = r"block 0 parameters do not match: missing \['w'\], unexpected \['v'\]"
    with pytest.raises(BlockStateError, match=mismatch):
        block_delta({0: {"v": t(1.0)}}, reference)
    with pytest.raises(BlockStateError, match="delta for block 2"):
        apply_delta(reference, {2: {"w": t(1.0)}})
    with pytest.raises(BlockStateError, match="block 0 parameters do not match"):
        apply_delta(reference, {0: {"w": t(1.0), "v": t(1.0)}})


def test_weighted_average_by_hand() -> None:
    client_a = {0: {"w": t(1.0, 2.0), "b": t(4.0)}, 1: {"w": t(4.0, -4.0)}}
    client_b = {0: {"w": t(5.0, 6.0), "b": t(0.0)}}
    client_c = {2: {"w": t(9.0, 9.0)}}  # weight 0: contributes nothing
    average = weighted_average([client_a, client_b, client_c], [1, 3, 0])
    # block 0: (1*[1,2] + 3*[5,6]) / 4 = [4, 5]; b: (1*4 + 3*0) / 4 = 1
    # block 1: only client a trained it, so its delta is the average, whatever its weight
    # block 2: nobody with a positive weight trained it, so it is absent
    assert_states_equal(average, {0: {"b": t(1.0), "w": t(4.0, 5.0)}, 1: {"w": t(4.0, -4.0)}})


def test_weighted_average_with_absent_blocks_as_zero() -> None:
    client_a = {0: {"w": t(1.0, 2.0)}, 1: {"w": t(4.0, -4.0)}}
    client_b = {0: {"w": t(5.0, 6.0)}}
    average = weighted_average([client_a, client_b], [1, 3], absent_as_zero=True)
    # block 0 as before, (1*[1,2] + 3*[5,6]) / 4; block 1: (1*[4,-4] + 3*0) / 4
    assert_states_equal(average, {0: {"w": t(4.0, 5.0)}, 1: {"w": t(1.0, -1.0)}})
    assert weighted_average([client_a], [0], absent_as_zero=True) == {}


def test_weighted_average_edge_cases() -> None:
    delta = {0: {"w": t(2.0)}}
    assert weighted_average([], []) == {}
    assert weighted_average([delta, delta], [0, 0.0]) == {}
    assert_states_equal(weighted_average([delta, {0: {"w": t(4.0)}}], [0.25, 0.25]), {0: {"w": t(3.0)}})
    for bad in (-1.0, math.nan, math.inf, "1"):
        with pytest.raises(BlockStateError, match="must be a finite number >= 0"):
            weighted_average([delta], [bad])  # type: ignore[list-item]
    with pytest.raises(BlockStateError, match="2 deltas but 1 weights"):
        weighted_average([delta, delta], [1.0])
    with pytest.raises(BlockStateError, match="block 0 parameters do not match"):
        weighted_average([delta, {0: {"v": t(2.0)}}], [1.0, 1.0])


@pytest.mark.parametrize("operation", ["weighted_average", "block_delta", "apply_delta"])
def test_mismatched_shapes_are_rejected(operation: str) -> None:
    a, b = {0: {"w": t(1.0, 2.0)}}, {0: {"w": t(5.0)}}
    with pytest.raises(BlockStateError, match="shape"):
        if operation == "weighted_average":
            weighted_average([a, b], [1, 3])
        elif operation == "block_delta":
            block_delta(a, b)
        else:
            apply_delta(a, b)


# --- files ---------------------------------------------------------------------------------------


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    model, registry = expanded()
    state = perturbed(get_block_state(model, registry))
    down = state[1]["mlp.down_proj.weight"]
    state[1]["mlp.down_proj.weight"] = down.t().contiguous().t()  # a non-contiguous view
    path = tmp_path / "blocks.safetensors"
    save_block_state(state, path)
    loaded = load_block_state(path)
    assert_states_equal(loaded, state)
    set_block_state(model, registry, loaded)
    assert_states_equal(get_block_state(model, registry), state)


def test_load_rejects_bad_files(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    with pytest.raises(BlockStateError, match="could not read block state"):
        load_block_state(garbage)
    with pytest.raises(BlockStateError, match="could not read block state"):
        load_block_state(tmp_path / "missing.safetensors")
    foreign = tmp_path / "foreign.safetensors"
    save_file({"model.layers.2.mlp.down_proj.weight": torch.zeros(2)}, str(foreign))
    with pytest.raises(BlockStateError, match="malformed block-state key 'model.layers.2.mlp"):
        load_block_state(foreign)


def test_flat_key_and_split_key() -> None:
    assert flat_key(3, "mlp.down_proj.weight") == "3/mlp.down_proj.weight"
    assert split_key("3/mlp.down_proj.weight") == (3, "mlp.down_proj.weight")
    assert split_key("12/a/b") == (12, "a/b")
    assert split_key(flat_key(0, "w")) == (0, "w")


@pytest.mark.parametrize("key", ["", "w", "0", "0/", "/w", "a/w", "-1/w", "1.5/w", " 1/w"])
def test_split_key_rejects_malformed_keys(key: str) -> None:
    with pytest.raises(BlockStateError, match="malformed block-state key"):
        split_key(key)
