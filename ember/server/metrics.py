"""Prometheus text-format metrics: request/token counters, cache gauges, latency histograms."""
from __future__ import annotations

import os
import threading
from typing import Any

from ember.engine.outputs import EngineState

TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5)
E2E_BUCKETS = (0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)


def resident_bytes() -> int | None:
    """This process's resident set size (Linux /proc), or None where it cannot be read."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class Histogram:
    def __init__(self, name: str, help_: str, buckets: tuple[float, ...]) -> None:
        self.name, self.help, self.buckets = name, help_, buckets
        self.counts = [0] * len(buckets)
        self.total = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        for i, edge in enumerate(self.buckets):
            if value <= edge:
                self.counts[i] += 1
        self.total += 1
        self.sum += value

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        lines += [f'{self.name}_bucket{{le="{edge}"}} {n}' for edge, n in zip(self.buckets, self.counts)]
        lines += [f'{self.name}_bucket{{le="+Inf"}} {self.total}', f"{self.name}_sum {self.sum:.6f}",
                  f"{self.name}_count {self.total}"]
        return lines


class Metrics:
    """Observer of the AsyncEngine (called from the engine thread) and renderer for /metrics."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.ttft = Histogram("ember_time_to_first_token_seconds", "Time to first token.", TTFT_BUCKETS)
        self.itl = Histogram("ember_inter_token_latency_seconds", "Time between output tokens.", ITL_BUCKETS)
        self.e2e = Histogram("ember_e2e_request_latency_seconds", "Request latency.", E2E_BUCKETS)
        self.finished: dict[str, int] = {}
        self.aborted = 0

    def on_first_token(self, seconds: float) -> None:
        with self._lock:
            self.ttft.observe(seconds)

    def on_token(self, seconds: float) -> None:
        with self._lock:
            self.itl.observe(seconds)

    def on_finish(self, out: Any, seconds: float, ttft: float | None) -> None:
        with self._lock:
            self.e2e.observe(seconds)
            reason = "error" if out.error else out.outputs[0].finish_reason or "unknown"
            self.finished[reason] = self.finished.get(reason, 0) + 1

    def on_abort(self) -> None:
        with self._lock:
            self.aborted += 1

    def render(self, state: EngineState) -> str:
        used = state.used_blocks / max(1, state.num_blocks)
        hit = state.prefix_hits / state.prefix_queries if state.prefix_queries else 0.0
        gauges = [
            ("ember_num_requests_running", "Requests in the running batch.", state.running),
            ("ember_num_requests_waiting", "Requests waiting to be scheduled.", state.waiting),
            ("ember_kv_cache_usage_perc", "Fraction of KV-cache blocks held by requests (0-1).", round(used, 6)),
            ("ember_prefix_cache_hit_rate", "Prompt tokens served from the prefix cache / looked up.", round(hit, 6)),
        ]
        rss = resident_bytes()
        if rss is not None:
            gauges.append(("process_resident_memory_bytes", "Resident memory size in bytes.", rss))
        lines: list[str] = []
        for name, help_, value in gauges:
            lines += [f"# HELP {name} {help_}", f"# TYPE {name} gauge", f"{name} {value}"]
        stats = state.stats
        counters = [("ember_prompt_tokens_total", "Prompt tokens received.", stats.get("prompt_tokens", 0)),
                    ("ember_generation_tokens_total", "Tokens generated.", stats.get("generation_tokens", 0)),
                    ("ember_num_preemptions_total", "Sequences preempted.", state.preemptions),
                    # As vLLM's prefix_cache_queries / prefix_cache_hits: summable over replicas (a rate is not).
                    ("ember_prefix_cache_queries_total", "Prompt tokens looked up in the prefix cache.",
                     state.prefix_queries),
                    ("ember_prefix_cache_hits_total", "Prompt tokens found in the prefix cache.", state.prefix_hits),
                    ("ember_engine_steps_total", "Engine steps.", stats.get("steps", 0)),
                    ("ember_engine_step_seconds_total", "Wall time inside engine steps.",
                     round(stats.get("step_s", 0.0), 6)),
                    ("ember_model_forward_seconds_total", "Wall time of the model forward within steps.",
                     round(stats.get("forward_s", 0.0), 6)),
                    # Speculative decoding, as vLLM's spec_decode counters: acceptance rate = accepted / draft
                    # tokens, mean acceptance length = 1 + accepted / drafts.
                    ("ember_spec_decode_num_drafts_total", "Verification steps of sequences carrying drafts.",
                     stats.get("spec_verifications", 0)),
                    ("ember_spec_decode_num_draft_tokens_total", "Draft tokens verified.",
                     stats.get("spec_draft_tokens", 0)),
                    ("ember_spec_decode_num_accepted_tokens_total", "Draft tokens accepted.",
                     stats.get("spec_accepted_tokens", 0))]
        for name, help_, value in counters:
            lines += [f"# HELP {name} {help_}", f"# TYPE {name} counter", f"{name} {value}"]
        with self._lock:
            lines += ["# HELP ember_request_success_total Finished requests by finish reason.",
                      "# TYPE ember_request_success_total counter"]
            lines += [f'ember_request_success_total{{finished_reason="{r}"}} {n}' for r, n in sorted(self.finished.items())]
            lines += ["# HELP ember_request_aborted_total Requests aborted (client gone).",
                      "# TYPE ember_request_aborted_total counter", f"ember_request_aborted_total {self.aborted}"]
            for h in (self.ttft, self.itl, self.e2e):
                lines += h.render()
        return "\n".join(lines) + "\n"
