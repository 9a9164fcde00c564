"""Re-ranking documents for a query with one decoder model: ICR (the attention the query pays to each document,
calibrated by a content-free query; two forward passes), and the generative baselines with the same model:
listwise (RankGPT), pairwise (PRP), pointwise (P("Yes")), embedding cosine. Each method is a plan (apps/plan.py)."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable, Literal, Sequence

import torch

from ember.apps.plan import Job, Plan
from ember.engine.outputs import RequestOutput
from ember.engine.pooling_params import PoolingParams
from ember.engine.sampling_params import SamplingParams
from ember.errors import InvalidParameterError, PromptTooLongError
from ember.loading.tokenizer import Tokenizer

METHODS = ("icr", "listwise", "pairwise", "pointwise", "embedding")
SEP = "\n\n"
NA_QUERY = "N/A"
# ICR's prompt (the reference implementation's "IE" type).
ICR_OPENING = "Here are some paragraphs:"
ICR_INSTRUCTION = "Please find information that are relevant to the following query in the paragraphs above."
LISTWISE_WINDOW, LISTWISE_STRIDE = 20, 10  # RankGPT's sliding window, back to front
PAIRWISE_ALL_PAIRS_MAX = 20  # all pairs up to this many documents, else sorting
CHOICE_LOGPROBS = 20  # top logprobs read for the answer tokens of pairwise and pointwise prompts
_SENTINEL = "\x00ember-content\x00"

Ids = list[int]


def default_icr_layers(num_layers: int) -> list[int]:
    """ICR's default scored layers: the band from a fifth to a third of the depth (layers 6-9 of 30). Relevance
    is not spread over all layers but peaks in a band (Selective-ICR); this band is where it peaks for the
    default model in ember's layer sweep (BENCHMARKS.md), and the forward stops after its last layer."""
    lo = round(num_layers / 5)
    return list(range(lo, max(lo + 1, round(num_layers / 3))))


def icr_layers(layers: list[int] | Literal["all"] | None, num_layers: int) -> list[int]:
    """The layers ICR scores for RerankOptions.layers."""
    if layers == "all":
        return list(range(num_layers))
    return default_icr_layers(num_layers) if layers is None else list(layers)


@dataclass
class RerankOptions:
    """`layers`: ICR's scored layers (None: default_icr_layers; "all": every layer, as the ICR paper);
    `calibration`: ICR's N/A pass; `max_tokens_per_doc`: each
    document is cut to this many tokens (None: not cut); `pooling`: the embedding method's pooling."""

    method: str = "icr"
    max_tokens_per_doc: int | None = None
    layers: list[int] | Literal["all"] | None = None
    calibration: bool = True
    pooling: str = "last"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise InvalidParameterError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}",
                                        "method")
        if self.max_tokens_per_doc is not None and self.max_tokens_per_doc < 1:
            raise InvalidParameterError(f"max_tokens_per_doc must be >= 1, got {self.max_tokens_per_doc}",
                                        "max_tokens_per_doc")
        if isinstance(self.layers, str) and self.layers != "all":
            raise InvalidParameterError(f'layers must be a list of layer indices or "all", got {self.layers!r}',
                                        "layers")


@dataclass
class Ranking:
    """Scores per input document (higher is more relevant) and the order best first. `windows`: prompts the
    list was ranked in (several when it did not fit in one); `malformed`: generations that were not a
    well-formed answer (listwise), of `generations`; `truncated`: documents cut to max_tokens_per_doc."""

    scores: list[float]
    order: list[int]
    windows: int = 1
    generations: int = 0
    malformed: int = 0
    truncated: list[int] = field(default_factory=list)


@dataclass
class RerankResult:
    """One document's place in the answer (the shape of the rerank APIs' results)."""

    index: int
    relevance_score: float
    document: str | None = None


def top_results(ranking: Ranking, documents: Sequence[str], top_n: int | None = None,
                return_documents: bool = True) -> list[RerankResult]:
    """The best `top_n` (None or 0: all) documents, best first."""
    order = ranking.order[:top_n] if top_n else ranking.order
    return [RerankResult(i, ranking.scores[i], documents[i] if return_documents else None) for i in order]


def ranking_from_scores(scores: Sequence[float]) -> Ranking:
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return Ranking([float(s) for s in scores], order)


def ranking_from_order(order: list[int]) -> Ranking:
    """A permutation's scores: 1 for the first, falling linearly (the method gives no scores of its own)."""
    n = len(order)
    scores = [0.0] * n
    for rank, i in enumerate(order):
        scores[i] = 1.0 - rank / n
    return Ranking(scores, list(order))


class Reranker:
    """Builds each method's prompts from separately tokenised pieces, in the model's chat template."""

    def __init__(self, tokenizer: Tokenizer, max_model_len: int, num_layers: int) -> None:
        self.tok, self.max_model_len, self.num_layers = tokenizer, max_model_len, num_layers
        self._encode = lru_cache(maxsize=4096)(self._encode_uncached)
        prefix, suffix = _template_pieces(tokenizer)
        self.user_prefix, self.turn_suffix = prefix, self._encode(suffix)

    def _encode_uncached(self, text: str) -> tuple[int, ...]:
        return tuple(self.tok.encode(text, add_special_tokens=False))

    def ids(self, *pieces: str | Sequence[int]) -> Ids:
        out: Ids = []
        for p in pieces:
            out += self._encode(p) if isinstance(p, str) else p
        return out

    def user_turn(self, *pieces: str | Sequence[int]) -> Ids:
        """The pieces as one user message, then the assistant header (prefix and suffix of the chat template)."""
        return self.ids(*self.user_prefix, *pieces, self.turn_suffix)

    # -- entry point ------------------------------------------------------------------------

    def plan(self, query: str, documents: Sequence[str], options: RerankOptions) -> Plan[Ranking]:
        """The plan that ranks `documents` for `query` (first-stage order: best first)."""
        if not query or not query.strip():
            raise InvalidParameterError("query must be a non-empty string", "query")
        if not documents:
            raise InvalidParameterError("documents must be a non-empty list", "documents")
        empty = [i for i, d in enumerate(documents) if not isinstance(d, str) or not d.strip()]
        if empty:
            raise InvalidParameterError(f"documents must be non-empty strings; document {empty[0]} is empty",
                                        "documents")
        docs, truncated = self._documents(documents, options.max_tokens_per_doc)
        method: Callable[..., Plan[Ranking]] = getattr(self, f"_{options.method}")
        ranking = yield from method(query.strip(), docs, documents, options)
        ranking.truncated = truncated
        return ranking

    def _documents(self, documents: Sequence[str], limit: int | None) -> tuple[list[Ids], list[int]]:
        """Each document's tokens (with the leading space it has after a label), cut to `limit`."""
        docs, truncated = [], []
        for i, d in enumerate(documents):
            ids = list(self._encode_uncached(" " + d.strip()))
            if limit is not None and len(ids) > limit:
                ids, _ = ids[:limit], truncated.append(i)
            docs.append(ids)
        return docs, truncated

    # -- ICR --------------------------------------------------------------------------------

    def icr_prompt(self, query: str, docs: Sequence[Ids]) -> tuple[Ids, list[tuple[int, int]], int]:
        """ICR's prompt for docs in the order given, the [start, end) of each "[i] doc" and where the query
        span (instruction, query, assistant header) starts."""
        ids = self.ids(*self.user_prefix, ICR_OPENING)
        spans = []
        for i, doc in enumerate(docs):
            ids += self.ids(SEP)
            start = len(ids)
            ids += self.ids(f"[{i + 1}]", doc)
            spans.append((start, len(ids)))
        ids += self.ids(SEP)
        return ids, spans, len(ids)

    def icr_tail(self, query: str) -> Ids:
        return self.ids(ICR_INSTRUCTION, SEP, "Query:", " " + query, self.turn_suffix)

    def _icr(self, query: str, docs: list[Ids], _texts: Sequence[str], opts: RerankOptions) -> Plan[Ranking]:
        window = self._fitting(docs, lambda ds: len(self.icr_prompt(query, ds)[0]) + len(self.icr_tail(query)))
        if window < len(docs):
            return (yield from self._sliding(docs, window, max(1, window // 2),
                                             lambda idx: self._icr_window(query, [docs[i] for i in idx], opts)))
        return (yield from self._icr_window(query, docs, opts))

    def _icr_window(self, query: str, docs: list[Ids], opts: RerankOptions) -> Plan[Ranking]:
        """Scores for docs given best first: placed in reverse (the best nearest the query), as the paper."""
        placed = list(reversed(range(len(docs))))
        context, spans, q_start = self.icr_prompt(query, [docs[i] for i in placed])
        layers = icr_layers(opts.layers, self.num_layers)

        def job(q: str) -> Job:
            ids = context + self.icr_tail(q)
            return Job(ids, PoolingParams(None, False, (q_start, len(ids)), layers))

        (real,) = yield [job(query)]
        base = _span_attention(real)
        calib = None
        if opts.calibration:
            (na,) = yield [job(NA_QUERY)]  # the documents' KV comes from the prefix cache
            calib = _span_attention(na)
        placed_scores = icr_scores(base, calib, spans)
        scores = [0.0] * len(docs)
        for slot, i in enumerate(placed):
            scores[i] = placed_scores[slot]
        return ranking_from_scores(scores)

    # -- listwise (RankGPT) -----------------------------------------------------------------

    def listwise_prompt(self, query: str, docs: Sequence[Ids]) -> Ids:
        n = len(docs)
        pieces: list[str | Sequence[int]] = [
            "This is an intelligent assistant that can rank passages based on their relevancy to the query."
            f"{SEP}The following are {n} passages, each indicated by number identifier []. I can rank them "
            f"based on their relevance to query: \"{query}\"{SEP}"]
        for i, doc in enumerate(docs):
            pieces += [("\n" if i else "") + f"[{i + 1}]", doc]
        pieces.append(f"{SEP}The search query is: \"{query}\". I will rank the {n} passages above based on "
                      "their relevance to the search query. The passages will be listed in descending order "
                      "using identifiers, the most relevant passages should be listed first and the output "
                      "format should be [] > [] > etc, e.g., [1] > [2] > etc. Be sure to list all "
                      f"{n} ranked passages and do not explain your ranking until after the list is done.")
        return self.user_turn(*pieces) + self.ids("Ranked Passages: [")

    def _listwise(self, query: str, docs: list[Ids], _texts: Sequence[str], opts: RerankOptions
                  ) -> Plan[Ranking]:
        size = min(LISTWISE_WINDOW, self._fitting(docs, lambda ds: len(self.listwise_prompt(query, ds))
                                                   + _listwise_max_tokens(len(ds)), least=2))
        stride = LISTWISE_STRIDE if size == LISTWISE_WINDOW else max(1, size // 2)
        return (yield from self._sliding(docs, size, stride, lambda idx: self._listwise_window(query, docs, idx)))

    def _listwise_window(self, query: str, docs: list[Ids], idx: list[int]) -> Plan[Ranking]:
        prompt = self.listwise_prompt(query, [docs[i] for i in idx])
        params = SamplingParams(temperature=0.0, max_tokens=_listwise_max_tokens(len(idx)))
        (out,) = yield [Job(prompt, params)]
        order, ok = parse_permutation("[" + out.outputs[0].text, len(idx))
        ranking = ranking_from_order(order)
        ranking.generations, ranking.malformed = 1, int(not ok)
        return ranking

    # -- pairwise (PRP) ---------------------------------------------------------------------

    def pairwise_prompt(self, query: str, a: Ids, b: Ids) -> Ids:
        return self.user_turn(f"Given a query \"{query}\", which of the following two passages is more relevant "
                              f"to the query?{SEP}Passage A:", a, f"{SEP}Passage B:", b,
                              f"{SEP}Output Passage A or Passage B:") + self.ids("Passage")

    def _pairwise(self, query: str, docs: list[Ids], _texts: Sequence[str], opts: RerankOptions
                  ) -> Plan[Ranking]:
        choices = (self._first_token(" A"), self._first_token(" B"))
        n = len(docs)
        if n == 1:
            return ranking_from_scores([0.0])
        longest = sorted(len(d) for d in docs)[-2:]
        if len(self.pairwise_prompt(query, [0] * longest[0], [0] * longest[1])) + 1 > self.max_model_len:
            raise PromptTooLongError(f"two documents of {longest[0]} and {longest[-1]} tokens do not fit in one "
                                     f"pairwise prompt (context {self.max_model_len}); set max_tokens_per_doc",
                                     "documents")

        def compare(pairs: list[tuple[int, int]]) -> Plan[list[float]]:
            """P(first beats second) per pair, averaged over both orders (cancels the position bias)."""
            jobs = [Job(self.pairwise_prompt(query, docs[i], docs[j]), choice_params())
                    for i, j in pairs] + [Job(self.pairwise_prompt(query, docs[j], docs[i]), choice_params())
                                          for i, j in pairs]
            outs = yield jobs
            n = len(pairs)
            ab = [choice_probability(o, *choices) for o in outs]
            return [(ab[k] + (1.0 - ab[n + k])) / 2 for k in range(n)]

        if n <= PAIRWISE_ALL_PAIRS_MAX:
            pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
            wins = yield from compare(pairs)
            scores = [0.0] * n
            for (i, j), w in zip(pairs, wins):
                scores[i] += w
                scores[j] += 1.0 - w
            return ranking_from_scores(scores)
        order = yield from _batched_quicksort(list(range(n)), compare)
        return ranking_from_order(order)

    # -- pointwise --------------------------------------------------------------------------

    def pointwise_prompt(self, query: str, doc: Ids) -> Ids:
        return self.user_turn("Passage:", doc, f"\nQuery: {query}\nDoes the passage answer the query? "
                                               "Answer 'Yes' or 'No'")

    def _pointwise(self, query: str, docs: list[Ids], _texts: Sequence[str], opts: RerankOptions
                   ) -> Plan[Ranking]:
        yes, no = self._first_token("Yes"), self._first_token("No")
        prompts = [self.pointwise_prompt(query, d) for d in docs]
        self._check_fits(max(prompts, key=len), 1)
        outs = yield [Job(p, choice_params()) for p in prompts]
        return ranking_from_scores([choice_probability(o, yes, no) for o in outs])

    # -- embedding --------------------------------------------------------------------------

    def _embedding(self, query: str, docs: list[Ids], texts: Sequence[str], opts: RerankOptions
                   ) -> Plan[Ranking]:
        params = PoolingParams(pooling=opts.pooling, normalize=True)
        limit = opts.max_tokens_per_doc
        prompts = [self.tok.encode(query)] + [self.tok.encode(t.strip())[:limit] for t in texts]
        self._check_fits(max(prompts, key=len), 0)
        outs = yield [Job(p, params) for p in prompts]
        vecs = torch.stack([o.pooled.data for o in outs])
        return ranking_from_scores((vecs[1:] @ vecs[0]).tolist())

    # -- shared -----------------------------------------------------------------------------

    def _first_token(self, text: str) -> int:
        return self._encode(text)[0]

    def _check_fits(self, prompt: Ids, generated: int) -> None:
        if len(prompt) + generated > self.max_model_len:
            raise PromptTooLongError(f"a prompt of {len(prompt)} tokens does not fit in the context of "
                                     f"{self.max_model_len} tokens; set max_tokens_per_doc", "documents")

    def _fitting(self, docs: list[Ids], length: Callable[[list[Ids]], int], least: int = 1) -> int:
        """How many documents one prompt can hold (counting the longest ones); a 400 if fewer than `least`."""
        longest = sorted(docs, key=len, reverse=True)
        k = len(docs)
        while k > 0 and length(longest[:k]) > self.max_model_len:
            k -= 1
        least = min(least, len(docs))
        if k < least:
            raise PromptTooLongError(
                f"{least} document(s) of up to {len(longest[0])} tokens do not fit in one prompt in the context "
                f"of {self.max_model_len} tokens; set max_tokens_per_doc", "documents")
        return k

    def _sliding(self, docs: list[Ids], size: int, stride: int,
                 rank: Callable[[list[int]], Plan[Ranking]]) -> Plan[Ranking]:
        """RankGPT's sliding window: rank the last `size` documents, move `stride` towards the front, repeat;
        the best of each window travel forward. A list that fits in one window is one prompt."""
        n = len(docs)
        order = list(range(n))
        end = n
        windows = generations = malformed = 0
        while True:
            start = max(0, end - size)
            idx = order[start:end]
            part = yield from rank(idx)
            order[start:end] = [idx[i] for i in part.order]
            windows, generations, malformed = (windows + 1, generations + part.generations,
                                               malformed + part.malformed)
            if start == 0:
                break
            end -= stride
        if windows == 1:  # one prompt: the method's own scores
            ranking = Ranking([0.0] * n, order)
            for k, i in enumerate(idx):
                ranking.scores[i] = part.scores[k]
        else:  # scores of different windows do not compare: the final order's
            ranking = ranking_from_order(order)
        ranking.windows, ranking.generations, ranking.malformed = windows, generations, malformed
        return ranking


def _template_pieces(tok: Tokenizer) -> tuple[list[str | Ids], str]:
    """The chat template's text before and after a user message's content (with the assistant header); the
    prefix carries BOS where the model adds it."""
    text = tok.apply_chat_template([{"role": "user", "content": _SENTINEL}], add_generation_prompt=True)
    assert isinstance(text, str)
    if text.count(_SENTINEL) != 1:
        raise InvalidParameterError("this model's chat template does not place the message once; re-ranking "
                                    "needs a template that shows the user's text", "model")
    prefix, suffix = text.split(_SENTINEL)
    bos = tok.bos_token_id
    has_bos = bos is not None and tok.add_bos and tok.encode(prefix, add_special_tokens=False)[:1] != [bos]
    return ([[bos]] if has_bos else []) + [prefix], suffix


def _span_attention(out: RequestOutput) -> torch.Tensor:
    """The attention the span paid to each key, averaged over the span's tokens."""
    assert out.pooled is not None and out.pooled.attention is not None
    return out.pooled.attention.float().mean(dim=0)


def icr_scores(real: torch.Tensor, calib: torch.Tensor | None, spans: list[tuple[int, int]]) -> list[float]:
    """Per document: the summed attention to its tokens; with calibration, c = real - N/A per token, tokens
    below mean(c) - 2 std(c) (within the document) dropped, the rest summed (the reference's
    `masked_NA_calibration`)."""
    scores = []
    for a, b in spans:
        c = real[a:b] if calib is None else real[a:b] - calib[a:b]
        if calib is not None and len(c) > 1:
            c = c[c > c.mean() - 2 * c.std()]
        scores.append(float(c.sum()))
    return scores


def parse_permutation(text: str, n: int) -> tuple[list[int], bool]:
    """RankGPT's output "[a] > [b] > ..." as 0-based indices: unknown and repeated ids dropped, the missing
    ones appended in input order. Well formed: the text up to the first other character names each of the
    n documents exactly once."""
    head = re.match(r"[\s\[\]>0-9]*", text).group(0)  # type: ignore[union-attr]
    found = [int(x) - 1 for x in re.findall(r"\[(\d+)\]", head)]
    seen: list[int] = []
    for i in found:
        if 0 <= i < n and i not in seen:
            seen.append(i)
    ok = len(found) >= n and sorted(found[:n]) == list(range(n))
    return seen + [i for i in range(n) if i not in seen], ok


def choice_probability(out: RequestOutput, first: int, second: int) -> float:
    """P(first) / (P(first) + P(second)) for the first generated token, from its top logprobs; a token not
    among them gets the smallest logprob listed (an upper bound)."""
    lps = out.outputs[0].logprobs
    assert lps, "choice prompts ask for logprobs"
    top = {t: lp.logprob for t, lp in lps[0].items()}
    floor = min(top.values())
    a, b = top.get(first, floor), top.get(second, floor)
    return float(torch.sigmoid(torch.tensor(a - b)))


def choice_params() -> SamplingParams:
    """One greedy token with the top logprobs a yes/no or A/B answer is read from (choice_probability)."""
    return SamplingParams(temperature=0.0, max_tokens=1, logprobs=CHOICE_LOGPROBS)


def _listwise_max_tokens(n: int) -> int:
    return 6 * n + 4  # "[12] > " is up to 6 tokens (the reference allows 100 per 20 documents)


def _batched_quicksort(items: list[int], compare: Callable[[list[tuple[int, int]]], Plan[list[float]]]
                       ) -> Plan[list[int]]:
    """Sort best first by pairwise comparisons, one batch per level: every unsorted part compares all its
    items with its first item (the pivot) at once."""
    parts: list[list[int]] = [items]
    while any(len(p) > 1 for p in parts):
        pairs = [(i, p[0]) for p in parts if len(p) > 1 for i in p[1:]]
        wins = iter((yield from compare(pairs)))
        nxt: list[list[int]] = []
        for p in parts:
            if len(p) <= 1:
                nxt.append(p)
                continue
            better, worse = [], []
            for i in p[1:]:
                (better if next(wins) > 0.5 else worse).append(i)
            nxt += [x for x in (better, [p[0]], worse) if x]
        parts = nxt
    return [p[0] for p in parts]
