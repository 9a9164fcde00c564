"""ember: an LLM inference engine for Llama-family models. Public API: LLM, SamplingParams, PoolingParams, load_model."""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Imported on first use, so `import ember.loading.registry` (or `ember pull`) does not pay for torch.
_EXPORTS = {
    "LLM": "ember.llm",
    "SamplingParams": "ember.engine.sampling_params",
    "PoolingParams": "ember.engine.pooling_params",
    "load_model": "ember.models.loader",
    "LLMEngine": "ember.engine.engine",
    "EngineArgs": "ember.engine.engine",
    "RequestOutput": "ember.engine.outputs",
    "CompletionOutput": "ember.engine.outputs",
    "Logprob": "ember.engine.outputs",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'ember' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
