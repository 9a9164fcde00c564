"""Ember's request router for Ray Serve: the engine deployment's handle picks replicas with PrefixRouter, fed
the token-block hashes of each request (imported by Ray by name, only when Ray is installed)."""
from __future__ import annotations

import random
from typing import Any

from ray.serve.request_router import FIFOMixin, PendingRequest, ReplicaID, RequestRouter, RunningReplica

from ember.server.ray_serve import Forwarded
from ember.server.routing import PrefixRouter


class EmberPrefixRouter(FIFOMixin, RequestRouter):
    """PrefixRouter over the live replicas; `mode` "random" picks uniformly (the baseline it is measured against).

    It lives in the ingress process, inside the engine deployment's handle: its view of each replica's cache is
    what this ingress routed there (one ingress replica, as `ember serve` runs, sees every request)."""

    def initialize_state(self, block_size: int = 16, imbalance: int = 16, mode: str = "prefix") -> None:
        self.policy = PrefixRouter(block_size=block_size, imbalance=imbalance)
        self.mode = mode

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        req = _forwarded(pending_request)
        if self.mode == "random" or req is None:
            return [[random.choice(candidate_replicas)]] if candidate_replicas else []
        by_id = {r.replica_id: r for r in candidate_replicas}
        choice = self.policy.choose(req.hashes(self.policy.block_size), list(by_id))
        req.route_reason = choice.reason
        return [[by_id[i] for i in rank] for rank in choice.ranks if rank]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        req = _forwarded(pending_request)
        self.policy.routed(replica_id, req.hashes(self.policy.block_size) if req is not None else [])

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        self.policy.completed(replica_id)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        self.policy.keep_only([r.replica_id for r in replicas])


def _forwarded(pending_request: PendingRequest | None) -> Forwarded | None:
    args = getattr(pending_request, "args", None) or ()
    return args[0] if args and isinstance(args[0], Forwarded) else None
