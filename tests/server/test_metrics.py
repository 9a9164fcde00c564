"""/metrics renders an engine snapshot taken on the engine thread, never the live engine from the event loop."""
from __future__ import annotations

import asyncio
import threading
from pathlib import Path

from ember import SamplingParams
from ember.engine.async_engine import AsyncEngine
from ember.engine.engine import LLMEngine
from ember.engine.outputs import EngineState
from ember.server.metrics import Metrics


def _value(text: str, name: str) -> float:
    return float(next(line.split()[1] for line in text.splitlines() if line.startswith(name + " ")))


def test_render_reads_only_the_snapshot() -> None:
    state = EngineState(running=2, waiting=1, used_blocks=3, num_blocks=4, prefix_queries=10, prefix_hits=5,
                        preemptions=7, stats={"prompt_tokens": 11, "generation_tokens": 13, "steps": 17})
    text = Metrics().render(state)
    assert _value(text, "ember_num_requests_running") == 2 and _value(text, "ember_num_requests_waiting") == 1
    assert _value(text, "ember_kv_cache_usage_perc") == 0.75 and _value(text, "ember_prefix_cache_hit_rate") == 0.5
    assert _value(text, "ember_num_preemptions_total") == 7 and _value(text, "ember_generation_tokens_total") == 13


def test_the_engine_thread_publishes_snapshots(tiny_llama3: Path) -> None:
    engine = LLMEngine(model=tiny_llama3, kv_cache_memory=0.01)
    served = AsyncEngine(engine)
    takers: set[str] = set()
    state = engine.state

    def recorded() -> EngineState:
        takers.add(threading.current_thread().name)
        return state()

    engine.state = recorded
    served.start()

    async def run() -> None:
        async for _ in served.generate("a", {"prompt_token_ids": [5, 6, 7]},
                                       SamplingParams(max_tokens=4, ignore_eos=True)):
            pass

    try:
        asyncio.run(run())
    finally:
        served.stop()
    assert takers == {"ember-engine"}
    assert served.state.stats["generation_tokens"] == 4 and served.state.used_blocks == 0
