"""Benchmarks: offline throughput, llama-bench-style latency, and serving load against any OpenAI server."""
