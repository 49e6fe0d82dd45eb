"""fedbe: federated fine-tuning by block expansion over a frozen (quantized) base model.

The shared package holds what the edge service and the coordinator both need: model sources,
block expansion, the frozen quantized base, block state, update compression and the wire codec.
"""

__version__ = "0.1.0"
