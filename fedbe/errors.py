"""One error hierarchy for everything fedbe raises on purpose.

Every message says what was wrong and what to do about it. Library errors (torch, msgpack,
transformers, bitsandbytes, paho) are translated into these at the module that calls the library.
"""

from __future__ import annotations


class FedbeError(Exception):
    """Root of every error fedbe raises deliberately."""


class ConfigError(FedbeError, ValueError):
    """A file, field or command-line value is invalid."""


class ModelSourceError(FedbeError):
    """A model source can not be resolved or loaded."""


class ExpansionError(FedbeError, ValueError):
    """A block expansion request is invalid for this model."""


class UnsupportedArchitectureError(ExpansionError):
    """The model's architecture has no expansion adapter."""


class QuantizationError(FedbeError):
    """The requested base precision can not run on this device."""


class BaseModelMismatchError(FedbeError):
    """A base model is not the one the federation, state directory or snapshot was built on.

    New blocks are trained on top of one exact frozen base, identified by
    :func:`fedbe.fingerprint.base_fingerprint`; blocks trained on another base can not be averaged
    with them or applied to it. ``found`` is the fingerprint of the model at hand, ``expected`` the
    one it had to match.
    """

    def __init__(self, message: str, *, found: str, expected: str) -> None:
        super().__init__(message)
        self.found = found
        self.expected = expected


class BlockStateError(FedbeError, ValueError):
    """Block state does not match the expected block layout."""


CODEC_REASONS = (
    "malformed", "oversized", "corrupt", "version", "non_finite", "dtype_mismatch", "shape_mismatch",
    "unassigned_block",
)  # fmt: skip


class CodecError(FedbeError, ValueError):
    """A frame on the wire is malformed, corrupted, oversized or does not match the expected layout.

    ``reason`` is a short code from :data:`CODEC_REASONS`, for counting rejections by kind.
    """

    def __init__(self, message: str, reason: str = "malformed") -> None:
        super().__init__(message)
        self.reason = reason


class DataError(FedbeError, ValueError):
    """Training or evaluation data is unusable."""
