"""The serving engine: sequences, paged KV cache, scheduler, runner, sampler, step loop."""
