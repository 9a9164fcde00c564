"""LLM: the offline Python API in vLLM's shape (generate, encode, embed, rerank, chat, get_tokenizer)."""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from ember.apps.plan import Job, Usage, drive
from ember.apps.rerank import Ranking, Reranker, RerankOptions, RerankResult, top_results
from ember.engine.engine import EngineArgs, LLMEngine, Prompt
from ember.engine.engine import load_for as engine_load_for
from ember.engine.outputs import RequestOutput
from ember.engine.pooling_params import PoolingParams
from ember.engine.sampling_params import SamplingParams
from ember.loading.tokenizer import Tokenizer
from ember.models.loader import LoadedModel


def load_for(model: str | Path | None = None, dtype: str = "auto", quantization: str = "none") -> LoadedModel:
    """Load a model as LLM(model, dtype=..., quantization=...) would, e.g. to size the engine from its tokenizer
    before building it."""
    return engine_load_for(EngineArgs(model=model, dtype=dtype, quantization=quantization))


class LLM:
    """Load a model once, then generate for many prompts at a time with continuous batching."""

    def __init__(self, model: str | Path | None = None, loaded: LoadedModel | None = None, **kwargs: Any) -> None:
        """kwargs are EngineArgs; `loaded`: a model already loaded (see load_for) to run instead of loading one."""
        self.engine = LLMEngine(EngineArgs(model=model, **kwargs), loaded=loaded)
        self._ids = itertools.count()
        self._reranker_obj: Reranker | None = None

    def get_tokenizer(self) -> Tokenizer:
        return self.engine.tokenizer

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 on_output: Callable[[RequestOutput], None] | None = None) -> list[RequestOutput]:
        """Run every prompt to completion; outputs come back in the order of the prompts."""
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts
                                                 and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        params_list = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(f"{len(params_list)} sampling params for {len(prompts)} prompts")
        ids = [str(next(self._ids)) for _ in prompts]
        try:
            for rid, prompt, p in zip(ids, prompts, params_list):
                self.engine.add_request(rid, prompt, p)
            return self._run(ids, on_output)
        except BaseException:
            for rid in ids:  # leave nothing behind if a prompt was rejected or we were interrupted
                self.engine.abort_request(rid)
            raise

    def encode(self, prompts: Prompt | Sequence[Prompt],
               pooling_params: PoolingParams | Sequence[PoolingParams] | None = None) -> list[RequestOutput]:
        """Read what the model computes over each prompt instead of generating (vLLM's `LLM.encode`): each
        output's `pooled.data` is the pooled hidden state, `pooled.attention` the captured span's attention."""
        return self.generate(prompts, pooling_params or PoolingParams())  # type: ignore[arg-type]

    def embed(self, prompts: Prompt | Sequence[Prompt], pooling: str = "last", normalize: bool = True
              ) -> list[list[float]]:
        """One vector per prompt: the hidden state of the last token ("last", vLLM's default for decoder
        models) or the mean over its tokens ("mean"), L2-normalised unless normalize=False."""
        outs = self.encode(prompts, PoolingParams(pooling=pooling, normalize=normalize))
        return [o.pooled.data.tolist() for o in outs]  # type: ignore[union-attr]

    def rerank(self, query: str, documents: Sequence[str], method: str = "icr", top_n: int | None = None,
               return_documents: bool = True, **options: Any) -> "RerankOutput":
        """Rank documents (first-stage order, best first) for query: `results` best first, as the rerank
        APIs answer. method: icr (default) | listwise | pairwise | pointwise | embedding; options are
        RerankOptions (max_tokens_per_doc, layers, calibration, pooling)."""
        opts = RerankOptions(method=method, **options)
        reranker = self._reranker()
        usage = Usage()
        ranking = drive(reranker.plan(query, documents, opts), self._run_jobs, usage)
        return RerankOutput(top_results(ranking, documents, top_n, return_documents), ranking, usage)

    def _reranker(self) -> Reranker:
        if self._reranker_obj is None:
            e = self.engine
            self._reranker_obj = Reranker(e.tokenizer, e.max_model_len, e.config.num_layers)
        return self._reranker_obj

    def _run_jobs(self, jobs: list[Job]) -> list[RequestOutput]:
        return self.generate([{"prompt_token_ids": j.prompt_ids} for j in jobs],
                             [j.params for j in jobs])  # type: ignore[misc]

    def _run(self, ids: list[str], on_output: Callable[[RequestOutput], None] | None) -> list[RequestOutput]:
        done: dict[str, RequestOutput] = {}
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                if on_output:
                    on_output(out)
                if out.finished:
                    done[out.request_id] = out
        return [done[rid] for rid in ids]

    def chat(self, messages: list[dict[str, str]] | list[list[dict[str, str]]],
             sampling_params: SamplingParams | None = None, add_generation_prompt: bool = True,
             **kwargs: Any) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation (or a list of them) and generate."""
        conversations: Iterable[list[dict[str, str]]] = (
            [messages] if messages and isinstance(messages[0], dict) else messages)  # type: ignore[list-item]
        tok = self.get_tokenizer()
        prompts: list[Prompt] = [
            {"prompt_token_ids": tok.apply_chat_template(c, add_generation_prompt=add_generation_prompt,
                                                         tokenize=True)}
            for c in conversations]
        return self.generate(prompts, sampling_params, **kwargs)


@dataclass
class RerankOutput:
    """LLM.rerank's answer: `results` best first (index, relevance_score, document), the full `ranking`
    and what it cost (`usage`)."""

    results: list[RerankResult]
    ranking: Ranking
    usage: Usage
