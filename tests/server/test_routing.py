"""Prefix-aware replica choice (the policy, without Ray) and the merged /metrics of many replicas."""
from __future__ import annotations

import random

import pytest

from ember.server.routing import PrefixRouter, block_hashes, session_hashes


def prompt(prefix: int, question: int, prefix_len: int = 200) -> list[int]:
    rng = random.Random(prefix)
    head = [rng.randrange(1000) for _ in range(prefix_len)]
    return head + [question, question + 1, question + 2]


def route(router: PrefixRouter, ids: list[int], replicas: list[str]) -> str:
    hashes = block_hashes(ids, router.block_size)
    choice = router.choose(hashes, replicas)
    chosen = choice.ranks[0][0]
    router.routed(chosen, hashes)
    return chosen


def test_block_hashes_chain_full_blocks_only() -> None:
    a, b = list(range(40)), list(range(32)) + [99] * 8
    assert len(block_hashes(a, 16)) == 2  # the last 8 tokens are not a full block
    assert block_hashes(a, 16) == block_hashes(b, 16)  # same full blocks
    assert block_hashes([7] + a[1:], 16)[1] != block_hashes(a, 16)[1]  # a block's hash depends on its parent


def test_shared_prefixes_stick_and_spread() -> None:
    router, replicas = PrefixRouter(), ["r0", "r1"]
    homes: dict[int, set[str]] = {}
    for q in range(12):
        for p in range(4):
            homes.setdefault(p, set()).add(route(router, prompt(p, q), replicas))
            router.completed(next(iter(homes[p])))
    assert all(len(h) == 1 for h in homes.values())  # every prefix lives on one replica
    assert {next(iter(h)) for h in homes.values()} == set(replicas)  # and the prefixes use both


def test_imbalance_overrides_the_prefix() -> None:
    router, replicas = PrefixRouter(imbalance=3), ["r0", "r1"]
    first = route(router, prompt(0, 0), replicas)
    for q in range(1, 4):  # in flight, never completed: the owner's load grows
        assert route(router, prompt(0, q), replicas) == first
    choice = router.choose(block_hashes(prompt(0, 9), 16), replicas)
    assert choice.reason == "imbalanced" and choice.ranks[0] == [r for r in replicas if r != first]


def test_no_prefix_goes_to_least_loaded_and_gone_replicas_are_forgotten() -> None:
    router = PrefixRouter()
    router.routed("r0", block_hashes(prompt(0, 0), 16))
    assert router.choose([], ["r0", "r1"]).ranks[0][0] == "r1"
    assert router.choose(session_hashes("s"), ["r0", "r1"]).reason == "new-prefix"
    router.keep_only(["r1"])
    assert router.matched("r0", block_hashes(prompt(0, 0), 16)) == 0 and "r0" not in router.in_flight


def test_lru_capacity_bounds_memory() -> None:
    router = PrefixRouter(capacity_blocks=8)
    for p in range(5):
        router.routed("r0", block_hashes(prompt(p, 0), 16))
    assert len(router.held["r0"]) == 8
    assert router.matched("r0", block_hashes(prompt(4, 0), 16)) == 8  # the newest blocks stay


def test_merged_metrics_label_every_replica() -> None:
    pytest.importorskip("prometheus_client")
    from prometheus_client.parser import text_string_to_metric_families

    from ember.server.metrics import Metrics
    from ember.engine.outputs import EngineState
    from ember.server.ray_serve import merge_metrics

    state = EngineState(running=1, waiting=0, used_blocks=3, num_blocks=10)
    a, b = Metrics(), Metrics()
    a.on_first_token(0.2)
    b.on_first_token(0.3)
    b.on_first_token(0.4)
    text = merge_metrics({"EmberEngine#a": a.render(state), "EmberEngine#b": b.render(state)},
                         {("EmberEngine#a", "prefix"): 3})
    families = {f.name: f for f in text_string_to_metric_families(text)}
    counts = {s.labels["replica"]: s.value for s in families["ember_time_to_first_token_seconds"].samples
              if s.name.endswith("_count")}
    assert counts == {"EmberEngine#a": 1, "EmberEngine#b": 2}
    assert families["ember_replicas"].samples[0].value == 2
    assert families["ember_routed_requests"].samples[0].labels == {"replica": "EmberEngine#a", "reason": "prefix"}
    assert text.count("# TYPE ember_num_requests_running gauge") == 1


def test_replicas_share_the_cores() -> None:
    from ember.server.ray_serve import plan_cpus

    assert plan_cpus(2, None, 2) == (1, 1.0)  # 2 x 1 thread on 2 cores
    assert plan_cpus(1, None, 2) == (2, 2.0)
    assert plan_cpus(4, None, 2) == (1, 0.5)  # more replicas than cores: fractional reservations
    assert plan_cpus(2, 2, 2) == (2, 1.0)  # asked for more threads: still fits


def test_replica_flags_need_replicas(tiny_llama3, capsys: pytest.CaptureFixture) -> None:
    from ember.cli import main

    with pytest.raises(SystemExit) as stopped:
        main(["serve", str(tiny_llama3), "--router", "random"])
    assert stopped.value.code == 2 and "apply to --replicas" in capsys.readouterr().err
