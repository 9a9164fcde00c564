"""Re-ranking: ICR against a transformers eager-attention reference of the same algorithm (prompt assembly,
spans, calibration, masking), the N/A pass served from the prefix cache, the layer cut, and every baseline's
plan (windows, malformed output, pairs, sorting) on tiny random models."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ember import LLM, PoolingParams
from ember.apps.plan import drive
from ember.apps.rerank import (ICR_INSTRUCTION, ICR_OPENING, NA_QUERY, PAIRWISE_ALL_PAIRS_MAX, Reranker,
                               RerankOptions, default_icr_layers, icr_layers, icr_scores,
                               parse_permutation)
from ember.errors import InvalidParameterError, PromptTooLongError
from tests.conftest import TEXT
from tests.engine.test_batching import assert_no_leaks

QUERY = "Who is the new tenant of Netherfield Park?"
DOCS = [TEXT[0:260], TEXT[900:1000], TEXT[2000:2400], TEXT[3100:3180], TEXT[4000:4300]]


@pytest.fixture(scope="module")
def llm(tiny_llama3: Path) -> LLM:
    return LLM(tiny_llama3, max_model_len=1024)


def _reference_prompt(tok, query: str, docs: list[str]) -> tuple[list[int], list[tuple[int, int]], int]:
    """The ICR prompt built with transformers' tokenizer, each piece tokenised alone (tiny models use ChatML);
    the first-stage best document goes last. Returns ids, spans of "[i] doc" by input index, span start."""
    def enc(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"]

    ids = enc("<|im_start|>user\n") + enc(ICR_OPENING)
    spans: dict[int, tuple[int, int]] = {}
    for slot, i in enumerate(reversed(range(len(docs)))):
        ids += enc("\n\n")
        start = len(ids)
        ids += enc(f"[{slot + 1}]") + enc(" " + docs[i].strip())
        spans[i] = (start, len(ids))
    ids += enc("\n\n")
    q_start = len(ids)
    ids += enc(ICR_INSTRUCTION) + enc("\n\n") + enc("Query:") + enc(" " + query) + \
        enc("<|im_end|>\n<|im_start|>assistant\n")
    return ids, [spans[i] for i in range(len(docs))], q_start


def _reference_scores(folder: Path, query: str, docs: list[str], layers: list[int], calibrate: bool
                      ) -> list[float]:
    """ICR as the reference implementation computes it, from eager attention weights, every pass from scratch."""
    import transformers as tf

    tok = tf.AutoTokenizer.from_pretrained(folder)
    model = tf.AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32, attn_implementation="eager")

    def token_scores(q: str) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        ids, spans, q_start = _reference_prompt(tok, q, docs)
        with torch.no_grad():
            att = model(torch.tensor([ids]), output_attentions=True).attentions
        per_layer = [att[i][0, :, q_start:, :].mean(1) for i in layers]  # [heads, keys]: mean over query tokens
        return torch.stack(per_layer).sum(0).sum(0), spans

    real, spans = token_scores(query)
    scores = []
    if not calibrate:
        return [float(real[a:b].sum()) for a, b in spans]
    na, _ = token_scores(NA_QUERY)
    for a, b in spans:
        c = real[a:b] - na[a:b]
        keep = c > c.mean() - 2 * c.std()
        scores.append(float((real[a:b] * keep - na[a:b] * keep).sum()))
    return scores


@pytest.mark.parametrize("layers,scored,calibration", [("all", [0, 1], True), ("all", [0, 1], False),
                                                      ([1], [1], True), (None, [0], True)])
def test_icr_scores_equal_the_eager_reference(llm: LLM, tiny_llama3: Path, layers, scored, calibration) -> None:
    out = llm.rerank(QUERY, DOCS, layers=layers, calibration=calibration)
    want = _reference_scores(tiny_llama3, QUERY, DOCS, scored, calibration)
    assert out.ranking.scores == pytest.approx(want, rel=1e-4, abs=1e-5)
    assert [r.index for r in out.results] == sorted(range(len(DOCS)), key=lambda i: -want[i])
    assert out.usage.forward_passes == (2 if calibration else 1)
    assert_no_leaks(llm.engine)


def test_the_na_pass_computes_only_the_query_span(llm: LLM) -> None:
    llm.engine.blocks.reset_prefix_cache()
    reranker = llm._reranker()
    outs, spans = [], []

    def run(jobs):
        spans.extend(j.params.attention_span for j in jobs)
        got = llm._run_jobs(jobs)
        outs.extend(got)
        return got

    drive(reranker.plan(QUERY, DOCS, RerankOptions()), run)
    real, na = outs
    span_start = spans[1][0]
    assert spans[0][0] == span_start and span_start < len(na.prompt_token_ids) - 10
    assert real.num_cached_tokens == 0
    bs = llm.engine.blocks.block_size
    assert na.num_cached_tokens == span_start // bs * bs  # every full block before the span is reused
    assert len(na.prompt_token_ids) - na.num_cached_tokens < (len(na.prompt_token_ids) - span_start) + bs


def test_the_layer_cut_stops_the_forward_and_keeps_the_prefix_cache_honest(tiny_llama3: Path) -> None:
    llm = LLM(tiny_llama3, max_model_len=1024)
    calls = []
    last = llm.engine.runner.model.layers[1]
    hook = last.register_forward_hook(lambda *a: calls.append(1))
    out = llm.rerank(QUERY, DOCS, layers=[0])
    assert out.usage.forward_passes == 2 and not calls  # layer 1 never ran
    hook.remove()
    # The same prompt's blocks (layer 1 never written) must not serve a request that needs every layer.
    reranker = llm._reranker()
    context, _, _ = reranker.icr_prompt(QUERY, [reranker._documents(DOCS, None)[0][i] for i in (4, 3, 2, 1, 0)])
    prompt = context + reranker.icr_tail(QUERY)
    got = llm.encode({"prompt_token_ids": prompt}, PoolingParams("last"))[0]
    fresh = LLM(tiny_llama3, max_model_len=1024).encode({"prompt_token_ids": prompt}, PoolingParams("last"))[0]
    assert got.num_cached_tokens == 0
    torch.testing.assert_close(got.pooled.data, fresh.pooled.data, rtol=1e-4, atol=1e-5)


def test_icr_masks_outlier_tokens_within_each_document() -> None:
    real = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 5.0])
    na = torch.zeros(11)
    na[9] = 3.0  # c = -3: far below mean - 2 std of its document: dropped
    assert icr_scores(real, na, [(0, 10), (10, 11)]) == pytest.approx([9.0, 5.0])
    assert icr_scores(real, None, [(0, 10)]) == pytest.approx([9.0])


@pytest.mark.parametrize("text,order,ok", [
    ("[2] > [1] > [3]", [1, 0, 2], True),
    ("[2] > [2] > [3]", [1, 2, 0], False),  # duplicate: dropped, the missing one appended in input order
    ("[3] > [1]", [2, 0, 1], False),  # too short
    ("1, 2, 3]", [0, 1, 2], False),  # not the format
    ("[9] > [1] > [2] > [3]", [0, 1, 2], False),  # unknown id
    ("[3] > [1] > [2] and then some words [1]", [2, 0, 1], True),  # text after the list is ignored
])
def test_listwise_output_parsing(text: str, order: list[int], ok: bool) -> None:
    assert parse_permutation(text, 3) == (order, ok)


def _is_permutation(out, n: int) -> bool:
    return sorted(r.index for r in out.results) == list(range(n))


@pytest.mark.parametrize("method", ["listwise", "pairwise", "pointwise", "embedding"])
def test_each_baseline_ranks_every_document(llm: LLM, method: str) -> None:
    out = llm.rerank(QUERY, DOCS, method=method, top_n=3)
    full = llm.rerank(QUERY, DOCS, method=method)
    assert _is_permutation(full, len(DOCS)) and [r.index for r in out.results] == [r.index for r in full.results][:3]
    n = len(DOCS)
    passes = {"pairwise": n * (n - 1), "pointwise": n, "embedding": n + 1}
    if method in passes:
        assert full.usage.requests == passes[method]
    else:
        assert full.ranking.generations == full.ranking.windows >= 1
        assert 0 <= full.ranking.malformed <= full.ranking.generations
    assert_no_leaks(llm.engine)


def test_embedding_scores_are_cosines_of_embed_vectors(llm: LLM) -> None:
    out = llm.rerank(QUERY, DOCS, method="embedding")
    vecs = torch.tensor(llm.embed([QUERY] + DOCS))
    assert out.ranking.scores == pytest.approx((vecs[1:] @ vecs[0]).tolist(), abs=1e-5)


def test_pairwise_sorts_beyond_all_pairs(llm: LLM) -> None:
    docs = [f"Passage number {i} about {w}." for i, w in enumerate(TEXT.split()[:PAIRWISE_ALL_PAIRS_MAX + 3])]
    out = llm.rerank("Mr. Bingley", docs, method="pairwise")
    assert _is_permutation(out, len(docs))
    assert out.usage.requests < len(docs) * (len(docs) - 1)  # sorting, not all pairs


def test_a_list_that_does_not_fit_is_ranked_in_windows(tiny_llama3: Path) -> None:
    llm = LLM(tiny_llama3, max_model_len=1024)
    docs = [TEXT[i * 300:(i + 1) * 300] for i in range(8)]
    for method in ("icr", "listwise"):
        out = llm.rerank(QUERY, docs, method=method)
        assert out.ranking.windows > 1 and _is_permutation(out, len(docs))
    cut = llm.rerank(QUERY, docs, max_tokens_per_doc=5)
    assert cut.ranking.windows == 1 and cut.ranking.truncated == list(range(8))
    assert_no_leaks(llm.engine)


def test_the_default_layers_are_a_band_a_fifth_to_a_third_deep() -> None:
    assert default_icr_layers(30) == [6, 7, 8, 9]
    assert default_icr_layers(16) == [3, 4]
    assert default_icr_layers(2) == [0] and default_icr_layers(1) == [0]
    assert icr_layers("all", 3) == [0, 1, 2] and icr_layers([2, 0], 3) == [2, 0]


def test_bad_input_is_refused_clearly(tiny_llama3: Path, llm: LLM) -> None:
    with pytest.raises(InvalidParameterError, match="query"):
        llm.rerank("  ", DOCS)
    with pytest.raises(InvalidParameterError, match="documents"):
        llm.rerank(QUERY, [])
    with pytest.raises(InvalidParameterError, match="document 1 is empty"):
        llm.rerank(QUERY, ["a", ""])
    with pytest.raises(InvalidParameterError, match="method must be one of"):
        llm.rerank(QUERY, DOCS, method="magic")
    with pytest.raises(InvalidParameterError, match="attention_layers"):
        llm.rerank(QUERY, DOCS, layers=[7])
    with pytest.raises(InvalidParameterError, match='"all"'):
        llm.rerank(QUERY, DOCS, layers="some")
    small = LLM(tiny_llama3, max_model_len=100)
    with pytest.raises(PromptTooLongError, match="max_tokens_per_doc"):
        small.rerank(QUERY, [TEXT[:2000]])
    assert_no_leaks(small.engine) and assert_no_leaks(llm.engine)


def test_reranker_needs_a_template_that_shows_the_message(llm: LLM) -> None:
    tok = llm.get_tokenizer()
    saved = tok.chat_template
    try:
        tok.chat_template = "{{ 'fixed' }}"
        with pytest.raises(InvalidParameterError, match="chat template"):
            Reranker(tok, 100, 2)
    finally:
        tok.chat_template = saved
