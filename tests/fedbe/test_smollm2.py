"""The packaged SmolLM2-135M: real weights through the whole expansion path.

The first run dequantizes the GGUF into $FEDBE_CACHE (default ~/.cache/fedbe, kept between runs).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from fedbe.expansion import BlockRegistry, decoder_layers, expand_model, plan_expansion, registry_of
from fedbe.sources import load_model, load_tokenizer

pytestmark = pytest.mark.slow

TEXT = (
    "The river rises in the hills above the town and flows slowly to the sea. "
    "In spring the farmers plant wheat along its banks, and in autumn they bring the harvest to market. "
    "Children swim in the shallow water on warm summer afternoons."
)
NEW_TOKENS = 5


@dataclass
class Expanded:
    tokenizer: Any
    ids: torch.Tensor
    base_loss: float
    base_logits: torch.Tensor
    base_generation: torch.Tensor
    model: PreTrainedModel
    registry: BlockRegistry


def greedy(model: PreTrainedModel, ids: torch.Tensor, tokenizer: Any) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
            pad_token_id=tokenizer.eos_token_id,
        )


@pytest.fixture(scope="module")
def smollm2() -> Expanded:
    """SmolLM2 loaded once; the base's outputs are recorded, then the same model is expanded in place."""
    tokenizer = load_tokenizer("smollm2-135m")
    model = load_model("smollm2-135m")
    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model(ids, labels=ids)
    generation = greedy(model, ids, tokenizer)
    registry = expand_model(model, plan_expansion(model.config.num_hidden_layers, 6, "interleave"))
    return Expanded(tokenizer, ids, float(out.loss), out.logits, generation, model, registry)


def test_real_weights_and_tokenizer(smollm2: Expanded) -> None:
    assert 30 < smollm2.ids.shape[1] < 80  # ~50 tokens of English: a real BPE, not bytes or words
    assert smollm2.tokenizer.decode(smollm2.ids[0], skip_special_tokens=True).strip() == TEXT
    # A random 49k-vocabulary model scores ~ln(49152) = 10.8 nats a token; the trained model far better.
    assert smollm2.base_loss < 5.0


def test_expansion_is_exact_on_real_weights(smollm2: Expanded) -> None:
    model, registry = smollm2.model, smollm2.registry
    assert model.config.num_hidden_layers == 36
    assert len(decoder_layers(model)) == 36
    assert registry.new_layer_indices == (5, 11, 17, 23, 29, 35)
    assert tuple(b.source_layer for b in registry.blocks) == (4, 9, 14, 19, 24, 29)
    with torch.no_grad():
        logits = model(smollm2.ids).logits
    assert (logits - smollm2.base_logits).abs().max().item() == 0.0


def test_saved_expansion_reloads_with_plain_transformers(smollm2: Expanded, tmp_path: Path) -> None:
    smollm2.model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert reloaded.config.num_hidden_layers == 36
    assert len(decoder_layers(reloaded)) == 36
    assert registry_of(reloaded) == smollm2.registry
    with torch.no_grad():
        logits = reloaded(smollm2.ids).logits
    assert torch.equal(logits, smollm2.base_logits)


def test_generation_matches_the_base(smollm2: Expanded) -> None:
    generated = greedy(smollm2.model, smollm2.ids, smollm2.tokenizer)
    assert generated.shape == (1, smollm2.ids.shape[1] + NEW_TOKENS)
    assert torch.equal(generated, smollm2.base_generation)
    assert smollm2.tokenizer.decode(generated[0, -NEW_TOKENS:]).strip()
