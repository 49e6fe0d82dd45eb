"""fedbe's simulations and the ``fedbe`` command.

Built on top of the shared core (:mod:`fedbe`), the coordinator and the edge client, never imported by
them: ``fedbe bench`` runs FedBE and its baselines on one emulated federation in one process, calling
the coordinator's round and the edge client's trainer; ``fedbe simulate`` runs a whole federation as
real processes over a real broker.
"""
