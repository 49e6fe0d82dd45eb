"""A fingerprint of a base model: architecture, config and a digest of the weights as loaded.

Averaging blocks trained on different bases silently ruins the model, so every client announces
this and the coordinator refuses a client whose fingerprint differs. Compute it on the base model
before expansion and quantization (float32 as loaded from the source).
"""

from __future__ import annotations

import hashlib
import json

import torch
from transformers import PreTrainedModel

# Config keys that do not change what the model computes.
_VOLATILE = {"_name_or_path", "transformers_version", "dtype", "torch_dtype", "use_cache", "fedbe_expansion"}


def base_fingerprint(model: PreTrainedModel) -> str:
    """``<model_type>-<layers>L-<16 hex digits>`` from the config and every parameter's bytes."""
    config = {k: v for k, v in model.config.to_dict().items() if k not in _VOLATILE}
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
        tensor = param.detach().to("cpu", torch.float32).contiguous()
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.numpy().tobytes())
    layers = model.config.num_hidden_layers
    return f"{model.config.model_type}-{layers}L-{digest.hexdigest()[:16]}"
