"""Prefix-aware replica choice: which replica most likely holds a request's prompt prefix in its prefix cache,
kept as the engine keys it (hash chains over full blocks of token ids); no Ray in here."""
from __future__ import annotations

import random
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Hashable, Sequence

Replica = Hashable
ROUTERS = ("prefix", "ray-prefix", "pow2", "random")  # `ember serve --router`
ROUTING_IMBALANCE = 16  # requests in flight between the busiest and the idlest replica before load beats affinity


def block_hashes(ids: Sequence[int], block_size: int) -> list[int]:
    """One hash per full block of `ids`, each chained on the one before (as the engine's prefix cache)."""
    out, parent = [], 0
    for start in range(0, len(ids) - block_size + 1, block_size):
        parent = hash((parent, tuple(ids[start:start + block_size])))
        out.append(parent)
    return out


def session_hashes(session: str) -> list[int]:
    """A memory session's requests share no visible prefix (memory builds the prompt on the replica), so the
    session itself stands for one: its requests stick to one replica, where its turns were last recalled."""
    return [hash(("session", session))]


@dataclass
class Choice:
    """The replicas to try, in preference order (groups of equals), and why."""

    ranks: list[list[Replica]]
    reason: str  # "prefix", "new-prefix", "imbalanced", "no-prefix"
    matched_blocks: int = 0


@dataclass
class PrefixRouter:
    """The blocks routed to each replica (LRU, at most `capacity_blocks` each) and the requests in flight on it.

    Policy (SGLang's cache-aware router and Ray's PrefixCacheAffinityRouter share its shape): when in-flight
    counts differ by more than `imbalance`, least loaded first; otherwise the replica whose routed blocks match
    the longest leading run of the prompt's blocks (at least `min_match_blocks`), least loaded among equals; a
    prompt matching nowhere goes to the least loaded replica, then the one holding fewest blocks, so that
    distinct prefixes spread over the replicas."""

    block_size: int = 16
    imbalance: int = ROUTING_IMBALANCE
    min_match_blocks: int = 1
    capacity_blocks: int = 1 << 16
    held: dict[Replica, OrderedDict[int, None]] = field(default_factory=dict)
    in_flight: dict[Replica, int] = field(default_factory=dict)

    def choose(self, hashes: Sequence[int], candidates: Sequence[Replica]) -> Choice:
        if not candidates:
            return Choice([], "no-replica")
        load = {r: self.in_flight.get(r, 0) for r in candidates}
        by_load = sorted(candidates, key=lambda r: (load[r], len(self.held.get(r, ())), random.random()))
        if not hashes:
            return Choice([by_load], "no-prefix")
        if max(load.values()) - min(load.values()) > self.imbalance:
            return Choice([by_load[:1], by_load[1:]], "imbalanced")
        matched = {r: self.matched(r, hashes) for r in candidates}
        best = max(matched.values())
        if best < self.min_match_blocks:
            return Choice([by_load[:1], by_load[1:]], "new-prefix")
        first = [r for r in by_load if matched[r] == best]
        return Choice([first, [r for r in by_load if matched[r] != best]], "prefix", best)

    def matched(self, replica: Replica, hashes: Sequence[int]) -> int:
        """How many of the leading blocks were routed to `replica`."""
        held = self.held.get(replica)
        n = 0
        while held is not None and n < len(hashes) and hashes[n] in held:
            n += 1
        return n

    def routed(self, replica: Replica, hashes: Sequence[int]) -> None:
        held = self.held.setdefault(replica, OrderedDict())
        for h in reversed(hashes):  # the head most recent: eviction takes a prompt's tail first (as vLLM frees)
            held[h] = None
            held.move_to_end(h)
        while len(held) > self.capacity_blocks:
            held.popitem(last=False)
        self.in_flight[replica] = self.in_flight.get(replica, 0) + 1

    def completed(self, replica: Replica) -> None:
        if self.in_flight.get(replica, 0) > 0:
            self.in_flight[replica] -= 1

    def keep_only(self, replicas: Sequence[Replica]) -> None:
        """Forget replicas that are gone (a replacement starts with an empty cache)."""
        for table in (self.held, self.in_flight):
            for r in [r for r in table if r not in replicas]:
                del table[r]
