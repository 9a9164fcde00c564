"""ember: an LLM inference engine for Llama-family models. Public API: LLM, SamplingParams, load_model."""
from ember.engine.engine import EngineArgs, LLMEngine
from ember.engine.outputs import CompletionOutput, Logprob, RequestOutput
from ember.engine.sampling_params import SamplingParams
from ember.llm import LLM
from ember.models.loader import load_model

__all__ = ["LLM", "SamplingParams", "load_model", "LLMEngine", "EngineArgs", "RequestOutput",
           "CompletionOutput", "Logprob"]
__version__ = "0.1.0"
