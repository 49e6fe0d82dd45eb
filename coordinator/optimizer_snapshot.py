"""The server optimizer's state as a snapshot stores it, and back.

:mod:`coordinator.aggregation` keeps a FedAvgM or FedAdam state as a frozen dataclass of block
states; :class:`~coordinator.checkpoint.ServerOptimizerState` stores named tensor slots and scalars.
The slots are the dataclass's fields (``momentum``; ``m`` and ``v``) and the scalar ``kind`` says
which optimizer wrote them, so a resumed run goes on with the buffers it had.
"""

from __future__ import annotations

from coordinator.aggregation import FedAdamState, FedAvgMState, OptimizerState
from coordinator.checkpoint import ServerOptimizerState

_KINDS: dict[int, type[FedAvgMState] | type[FedAdamState]] = {1: FedAvgMState, 2: FedAdamState}


def optimizer_state_to_snapshot(state: OptimizerState | None) -> ServerOptimizerState:
    """``state`` as the snapshot stores it (no optimizer, or none yet: an empty one)."""
    if state is None:
        return ServerOptimizerState()
    kind = {v: k for k, v in _KINDS.items()}[type(state)]
    return ServerOptimizerState(tensors=dict(vars(state)), scalars={"kind": kind})


def optimizer_state_from_snapshot(data: ServerOptimizerState | None) -> OptimizerState | None:
    """The inverse of :func:`optimizer_state_to_snapshot` (an empty or missing one: None)."""
    if data is None or not getattr(data, "scalars", None):
        return None
    return _KINDS[int(data.scalars["kind"])](**data.tensors)
