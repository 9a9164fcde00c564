"""Speculative decoding: every proposer leaves outputs as they are without it (greedy token for token; sampling
seed for seed, so the target distribution is kept), in mixed batches, with chunked prompts, prefix hits,
preemption and aborts, and leaks no KV block in either model's cache."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from ember import LLM, SamplingParams
from ember.engine.engine import LLMEngine
from ember.engine.structured import StructuredOutputsParams as SO
from ember.errors import InvalidParameterError
from ember.spec import parse_speculative_config
from ember.spec.draft import DraftProposer
from ember.spec.ngram import ngram_propose
from tests.conftest import TEXT
from tests.engine.test_batching import assert_no_leaks

MAX_TOKENS = 24


def _configs(model: Path) -> dict[str, dict[str, Any]]:
    return {
        "ngram": {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3, "adaptive": False},
        "ngram-adaptive": {"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_max": 4},
        # The model drafting for itself: every draft accepted.
        "draft-self": {"method": "draft", "model": str(model), "num_speculative_tokens": 3, "adaptive": False},
        # Its int4 copy: most drafts accepted, some rejected (rolled back in both caches).
        "draft-int4": {"method": "draft", "model": str(model), "quantization": "int4", "num_speculative_tokens": 4,
                       "adaptive": False},
    }


def _llm(path: Path, spec: dict[str, Any] | None = None, **kw: Any) -> LLM:
    opts: dict[str, Any] = dict(block_size=4, kv_cache_memory=0.01, max_num_batched_tokens=64)
    opts.update(kw)
    return LLM(path, speculative_config=spec, **opts)


def _prompts(llm: LLM) -> list[list[int]]:
    """Prompts that repeat themselves (prompt lookup finds matches), of mixed lengths, two sharing a prefix."""
    ids = llm.get_tokenizer().encode(TEXT)
    return [ids[:40] + ids[:25], ids[100:130] * 3, ids[200:207], ids[:40] + ids[300:330], ids[400:560]]


def _run(llm: LLM, prompts: list[list[int]], params: SamplingParams) -> list[tuple[list[int], list[float]]]:
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    res = []
    for o in outs:
        for c in o.outputs:
            lps = [lp[t].logprob for lp, t in zip(c.logprobs or [], c.token_ids)]
            res.append((c.token_ids, lps))
    return res


def _check_same(ref: list[tuple[list[int], list[float]]], got: list[tuple[list[int], list[float]]]) -> None:
    assert [t for t, _ in got] == [t for t, _ in ref]
    for (_, a), (_, b) in zip(ref, got):  # logprobs of a verified row equal a one-token step's
        assert a == pytest.approx(b, abs=2e-4)


@pytest.fixture(scope="module")
def reference(tiny_llama3: Path) -> dict[str, Any]:
    llm = _llm(tiny_llama3)
    prompts = _prompts(llm)
    greedy = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True, logprobs=2)
    return {"prompts": prompts, "greedy": _run(llm, prompts, greedy)}


@pytest.mark.parametrize("name", ["ngram", "ngram-adaptive", "draft-self", "draft-int4"])
def test_greedy_outputs_are_identical_in_mixed_batches(tiny_llama3: Path, reference: dict[str, Any],
                                                       name: str) -> None:
    """Five prompts at once under a 64-token budget: some sequences speculate while others prefill in chunks
    or decode plainly; tokens and logprobs equal those without speculation, and no block is left held."""
    llm = _llm(tiny_llama3, _configs(tiny_llama3)[name])
    greedy = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True, logprobs=2)
    _check_same(reference["greedy"], _run(llm, reference["prompts"], greedy))
    stats = llm.engine.speculator.summary()
    assert stats["draft_tokens"] > 0
    if name == "draft-self":
        assert stats["acceptance_rate"] == 1.0
    if name == "draft-int4":
        assert 0 < stats["accepted_tokens"] < stats["draft_tokens"]
    assert_no_leaks(llm.engine)
    drafter = getattr(llm.engine.speculator.proposer, "drafter", None)
    if drafter is not None:  # the draft model's own cache is empty too
        assert not drafter.mirrors and drafter.blocks.num_free_blocks == drafter.blocks.num_blocks


@pytest.mark.parametrize("name", ["ngram", "draft-int4"])
def test_prefix_hits_and_a_second_round(tiny_llama3: Path, reference: dict[str, Any], name: str) -> None:
    """The same prompts again hit the prefix cache (blocks hashed only from accepted tokens) and give the same."""
    llm = _llm(tiny_llama3, _configs(tiny_llama3)[name])
    greedy = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True, logprobs=2)
    _run(llm, reference["prompts"], greedy)
    _check_same(reference["greedy"], _run(llm, reference["prompts"], greedy))
    assert llm.engine.blocks.prefix_hits > 0
    assert_no_leaks(llm.engine)


def test_preemption_with_drafts_in_flight(tiny_llama3: Path, reference: dict[str, Any]) -> None:
    """A cache too small for every sequence at once: sequences carrying drafts get preempted and recomputed."""
    llm = _llm(tiny_llama3, _configs(tiny_llama3)["draft-int4"], kv_cache_memory=0.00016, max_model_len=256)
    greedy = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True, logprobs=2)
    _check_same(reference["greedy"], _run(llm, reference["prompts"], greedy))
    assert llm.engine.scheduler.num_preemptions > 0
    assert_no_leaks(llm.engine)


@pytest.mark.parametrize("name", ["ngram", "draft-int4"])
def test_sampling_is_seed_for_seed_the_same(tiny_llama3: Path, reference: dict[str, Any], name: str) -> None:
    """Verification samples each row as a one-token step would (one draw of the request's generator per
    token), so seeded sampling, n > 1, stop strings and max_tokens give exactly what they give without drafts."""
    params = SamplingParams(n=2, max_tokens=MAX_TOKENS, temperature=0.8, top_p=0.95, seed=7, logprobs=1,
                            stop=["the"])
    ref = _run(_llm(tiny_llama3), reference["prompts"], params)
    llm = _llm(tiny_llama3, _configs(tiny_llama3)[name])
    _check_same(ref, _run(llm, reference["prompts"], params))
    assert_no_leaks(llm.engine)


@pytest.mark.parametrize("name", ["ngram", "draft-self", "draft-int4"])
def test_structured_outputs_with_drafts_are_exactly_the_same(tiny_llama3: Path, reference: dict[str, Any],
                                                             name: str) -> None:
    """A JSON schema and a regex under speculation: drafts the grammar forbids are cut before verification,
    each verified row is sampled under the mask its accepted predecessors leave, and the outputs (greedy and
    seeded, n > 1) are token for token those without drafts, valid, with nothing left held."""
    schema = {"type": "object", "additionalProperties": False, "required": ["name", "tags"],
              "properties": {"name": {"type": "string", "maxLength": 12},
                             "tags": {"type": "array", "items": {"enum": ["alpha", "beta"]}, "maxItems": 3}}}
    runs = [SamplingParams(max_tokens=200, temperature=0, logprobs=1, structured_outputs=SO(json=schema)),
            SamplingParams(n=2, max_tokens=40, temperature=0.9, seed=3, structured_outputs=SO(regex=r"(ab|ba|a){2,30}"))]
    base, llm = _llm(tiny_llama3), _llm(tiny_llama3, _configs(tiny_llama3)[name])
    for params in runs:
        _check_same(_run(base, reference["prompts"], params), _run(llm, reference["prompts"], params))
    done = [o.outputs[0] for o in llm.generate([{"prompt_token_ids": p} for p in reference["prompts"]], runs[0])
            if o.outputs[0].finish_reason == "stop"]  # (the others were cut by max_tokens)
    assert done
    for c in done:
        parsed = json.loads(c.text)
        assert set(parsed) == {"name", "tags"} and set(parsed["tags"]) <= {"alpha", "beta"}
    stats = llm.engine.speculator.summary()
    assert stats["accepted_tokens"] > 0
    assert_no_leaks(llm.engine)


def test_candidates_a_grammar_forbids_are_cut(tiny_llama3: Path) -> None:
    llm = _llm(tiny_llama3)
    tok = llm.get_tokenizer()
    llm.engine.add_request("r", "x", SamplingParams(max_tokens=40, temperature=0, structured_outputs=SO(regex="(ab)+")))
    seq = llm.engine.requests["r"].seqs[0]
    while not seq.output_ids:
        llm.engine.step()
    good = tok.encode(("b" if seq.text.endswith("a") else "") + "ababab", add_special_tokens=False)
    llm.engine.set_candidates("r", good + tok.encode("zz", add_special_tokens=False))
    assert seq.spec_tokens == good
    llm.engine.abort_request("r")


def test_rejection_keeps_the_target_distribution(tiny_llama3: Path) -> None:
    """Chi-square: the second token of 3000 samples at temperature 0.7, each verified against the int4 copy's
    greedy draft (accepted with the target's probability of the draft, else drawn from the rest), follows the
    model's own conditional distribution p(t2 | prompt, t1)."""
    llm = _llm(tiny_llama3, {**_configs(tiny_llama3)["draft-int4"], "num_speculative_tokens": 1},
               max_num_seqs=64, kv_cache_memory=0.05)
    prompt = llm.get_tokenizer().encode(TEXT)[:12]
    temp, n = 0.7, 3000
    outs = llm.generate([{"prompt_token_ids": prompt}] * n,
                        [SamplingParams(max_tokens=3, temperature=temp, seed=i, ignore_eos=True) for i in range(n)])
    pairs = [tuple(o.outputs[0].token_ids[:2]) for o in outs]
    stats = llm.engine.speculator.summary()
    assert stats["verifications"] > n / 2 and 0 < stats["accepted_tokens"] < stats["draft_tokens"]
    model = llm.engine.runner.model
    firsts = sorted({t1 for t1, _ in pairs})
    with torch.inference_mode():
        logits = torch.stack([model.compute_logits(model.forward_dense(torch.tensor(prompt + [t1])))[-1]
                              for t1 in firsts])
    cond = dict(zip(firsts, torch.softmax(logits / temp, dim=-1).double()))
    expected = sum(cond[t1] for t1, _ in pairs)
    observed = torch.bincount(torch.tensor([t2 for _, t2 in pairs]), minlength=len(expected)).double()
    chi2, dof = _chi_square(observed, expected)
    assert chi2 < dof + 4 * math.sqrt(2 * dof), (chi2, dof)  # about p > 0.001


def _chi_square(observed: torch.Tensor, expected: torch.Tensor, least: float = 5.0) -> tuple[float, int]:
    """Pearson's statistic over cells expecting at least `least` counts (the rest pooled into one)."""
    big = expected >= least
    obs = torch.cat([observed[big], observed[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    keep = exp > 0
    return float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum()), int(keep.sum()) - 1


def test_abort_mid_verification_frees_both_caches(tiny_llama3: Path) -> None:
    llm = _llm(tiny_llama3, _configs(tiny_llama3)["draft-int4"])
    engine: LLMEngine = llm.engine
    ids = llm.get_tokenizer().encode(TEXT)
    for i in range(3):
        engine.add_request(f"r{i}", {"prompt_token_ids": ids[i * 50:i * 50 + 30]},
                           SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))
    while not any(s.spec_tokens for s in engine.scheduler.running):
        engine.step()
        engine._propose()  # what the next step starts with: drafts now sit on the sequences
    victim = next(s for s in engine.scheduler.running if s.spec_tokens)
    engine.abort_request(victim.request_id)
    while engine.has_unfinished_requests():
        engine.step()
    assert_no_leaks(engine)
    drafter = engine.speculator.proposer.drafter  # type: ignore[attr-defined]
    assert not drafter.mirrors and drafter.blocks.num_free_blocks == drafter.blocks.num_blocks


def test_the_draft_mirror_rolls_back_to_what_the_target_kept(tiny_llama3: Path) -> None:
    llm = _llm(tiny_llama3, _configs(tiny_llama3)["draft-int4"])
    proposer = llm.engine.speculator.proposer
    assert isinstance(proposer, DraftProposer)
    drafter = proposer.drafter
    engine = llm.engine
    engine.add_request("r", {"prompt_token_ids": llm.get_tokenizer().encode(TEXT)[:30]},
                       SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))
    engine.step()
    seq = engine.requests["r"].seqs[0]
    drafts = drafter.draft({seq: 4})[seq]
    mirror = drafter.mirrors[seq]
    assert mirror.token_ids == seq.token_ids + drafts and mirror.num_computed == len(seq) + 3
    seq.output_ids.append((drafts[0] + 1) % engine.config.vocab_size)  # the target disagreed with draft 1
    drafter.sync(seq)
    assert mirror.num_computed == len(seq) - 1 and mirror.token_ids == seq.token_ids
    assert len(mirror.block_table) == -(-mirror.num_computed // drafter.blocks.block_size)


# -- the n-gram rules --------------------------------------------------------------------------------------

@pytest.mark.parametrize("tokens, k, lo, hi, want", [
    ([1, 2, 3, 4, 1, 2], 3, 1, 4, [3, 4, 1]),  # suffix [1, 2] seen at the start
    ([1, 2, 3, 1, 2, 5, 1, 2], 3, 1, 4, [3, 1, 2]),  # earliest of two occurrences
    ([9, 2, 3, 7, 2, 3, 8, 9, 2, 3], 2, 1, 3, [7, 2]),  # the longest suffix [9, 2, 3] wins over [2, 3]
    ([1, 2, 3, 4, 5], 3, 1, 4, []),  # nothing repeats
    ([5, 1, 9, 2, 1], 3, 2, 4, []),  # [1] repeats, but shorter than prompt_lookup_min
    ([4, 4, 4, 4], 3, 1, 2, [4, 4]),  # what follows runs to the end of the sequence
    ([1, 2, 3, 1, 2], 0, 1, 4, []),
])
def test_ngram_matching_rules(tokens: list[int], k: int, lo: int, hi: int, want: list[int]) -> None:
    assert ngram_propose(tokens, k, lo, hi) == want


def test_ngram_cap_on_the_suffix_length() -> None:
    """With prompt_lookup_max 1 only the last token is matched: its first occurrence, whatever came before."""
    assert ngram_propose([7, 3, 8, 5, 3], 2, 1, 1) == [8, 5]
    assert ngram_propose([7, 3, 8, 5, 3], 2, 2, 2) == []


# -- configuration -----------------------------------------------------------------------------------------

def test_config_in_vllm_shape() -> None:
    c = parse_speculative_config('{"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_max": 4}')
    assert (c.method, c.num_speculative_tokens, c.prompt_lookup_min, c.prompt_lookup_max) == ("ngram", 5, 1, 4)
    assert parse_speculative_config({"model": "x.gguf", "num_speculative_tokens": 3}).method == "draft"
    assert parse_speculative_config({"method": "draft_model", "model": "x.gguf"}).method == "draft"
    assert parse_speculative_config(None) is None


@pytest.mark.parametrize("value, words", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "JSON object"),
    ({"method": "medusa"}, "method must be one of"),
    ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens"),
    ({"method": "ngram", "prompt_lookup_min": 3, "prompt_lookup_max": 2}, "prompt_lookup_max"),
    ({"method": "draft"}, "names the draft model"),
    ({"method": "ngram", "lookahead": 3}, "unknown key(s) lookahead"),
    ({"method": "swift", "skip_ratio": 1.5}, "skip_ratio"),
])
def test_bad_configs_say_what_is_wrong(value: Any, words: str) -> None:
    with pytest.raises(InvalidParameterError, match="speculative_config") as e:
        parse_speculative_config(value)
    assert words in str(e.value)


def test_a_draft_with_another_vocabulary_is_refused(tiny_llama3: Path, default_gguf: Path) -> None:
    with pytest.raises(InvalidParameterError, match="different tokenizer"):
        _llm(tiny_llama3, {"method": "draft", "model": str(default_gguf)})


def test_default_model_repeats_a_passage_exactly_with_prompt_lookup(default_gguf: Path) -> None:
    """On the real model (quantized weights, whose kernels quantize activations, so one rounding difference
    grows): a single stream's verified rows attend as its one-token steps would, so greedy output is the same
    token for token, while most of it is drafted from the prompt."""
    from ember.llm import load_for

    loaded = load_for(default_gguf, "auto", "none")
    kw: dict[str, Any] = dict(loaded=loaded, max_num_seqs=1, max_model_len=1024)
    base, spec = LLM(default_gguf, **kw), LLM(default_gguf, speculative_config=_configs(default_gguf)["ngram"], **kw)
    passage = " ".join(TEXT.split()[40:130])
    messages = [{"role": "user", "content": f"Repeat the following passage exactly:\n\n{passage}"}]
    params = SamplingParams(max_tokens=96, temperature=0, logprobs=1)
    want = _run_chat(base, messages, params)
    assert _run_chat(spec, messages, params) == want
    stats = spec.engine.speculator.summary()
    assert stats["accepted_tokens"] > len(want[0]) / 3
    assert_no_leaks(spec.engine)


def _run_chat(llm: LLM, messages: list[dict[str, str]], params: SamplingParams) -> tuple[list[int], list[float]]:
    c = llm.chat(messages, params)[0].outputs[0]
    return c.token_ids, [lp[t].logprob for lp, t in zip(c.logprobs, c.token_ids)]


# -- SWIFT ---------------------------------------------------------------------------------------------------

SWIFT = {"method": "swift", "num_speculative_tokens": 4, "context_window": 16, "draft_confidence": 0.0,
         "max_optimization_steps": 40, "adaptive": False, "max_tuning_share": 1.0}


def test_swift_greedy_outputs_are_identical_and_its_tuner_runs(tiny_llama_deep: Path) -> None:
    """SWIFT drafts on the model's own cache (blocks taken for drafts are the sequence's, verification
    overwrites their KV): outputs as without it, no block left held, and the skip set tuned meanwhile."""
    base = _llm(tiny_llama_deep)
    prompts = _prompts(base)
    greedy = SamplingParams(max_tokens=48, temperature=0, ignore_eos=True, logprobs=2)
    ref = _run(base, prompts, greedy)
    llm = _llm(tiny_llama_deep, SWIFT)
    _check_same(ref, _run(llm, prompts, greedy))
    tuner = llm.engine.speculator.proposer.tuner  # type: ignore[attr-defined]
    assert tuner.tries > 0 and len(tuner.best) == int(8 * 0.45)  # 4 inner layers x 2 sub-layers, 45% skipped
    assert llm.engine.speculator.summary()["draft_tokens"] > 0
    assert_no_leaks(llm.engine)


def test_a_skipped_sublayer_is_left_out_of_the_forward(tiny_llama_deep: Path) -> None:
    """Skipping attention and MLP sub-layers equals running the model with those sub-layers' output
    projections zeroed (the residual passes through), through the fused kernel and the module path alike."""
    from ember.engine.sequence import Sequence, Status
    from ember.models.llama import LlamaModel

    skip = frozenset({2, 5, 8})  # attention of layer 1, MLP of layer 2, attention of layer 4
    ids = LLM(tiny_llama_deep).get_tokenizer().encode(TEXT)[:20]

    def last_logits(llm: LLM, skip_set: frozenset[int] | None) -> torch.Tensor:
        engine = llm.engine
        seq = Sequence("x", 0, ids, SamplingParams(), 0.0)
        seq.status = Status.RUNNING
        engine.blocks.allocate(seq, len(ids))
        r = engine.runner.run({seq: len(ids)}, skip=skip_set)
        return engine.runner.model.compute_logits(r.hidden[: r.num_logit_rows])[-1]

    skipped = last_logits(_llm(tiny_llama_deep), skip)
    zeroed = _llm(tiny_llama_deep)
    layers = zeroed.engine.runner.model.layers
    with torch.no_grad():
        for j in skip:
            proj = layers[j // 2].self_attn.o_proj if j % 2 == 0 else layers[j // 2].mlp.down_proj
            proj.weight.zero_()
    assert torch.allclose(skipped, last_logits(zeroed, None), atol=1e-4)
    decode = _llm(tiny_llama_deep)  # one-row steps take the fused C++ decoder: the same skips there
    engine = decode.engine
    seq = Sequence("y", 0, ids, SamplingParams(), 0.0)
    seq.status = Status.RUNNING
    engine.blocks.allocate(seq, len(ids))
    engine.runner.run({seq: len(ids) - 1}, skip=skip)
    seq.num_computed = len(ids) - 1
    r = engine.runner.run({seq: 1}, skip=skip)
    assert LlamaModel._fused_decoder(engine.runner.model, r.hidden) is not None
    assert torch.allclose(engine.runner.model.compute_logits(r.hidden[: r.num_logit_rows])[-1], skipped, atol=1e-4)


def test_the_tuner_improves_on_its_first_set_on_a_repetitive_input(tiny_llama_deep: Path) -> None:
    """On a sequence that repeats itself, SWIFT's tuning (random search with Bayesian suggestions) finds a
    skip set that predicts more of the model's own tokens than the every-other-layer set it starts from."""
    llm = _llm(tiny_llama_deep, {**SWIFT, "max_optimization_steps": 60, "max_score": 1.0})
    ids = llm.get_tokenizer().encode(TEXT)
    llm.generate([{"prompt_token_ids": ids[50:60] * 4}], SamplingParams(max_tokens=160, temperature=0,
                                                                         ignore_eos=True))
    tuner = llm.engine.speculator.proposer.tuner  # type: ignore[attr-defined]
    assert tuner.tries == 60
    first = tuner.history[0]
    assert tuner.best_score > first


def test_tuning_keeps_to_its_share_of_the_time(tiny_llama_deep: Path) -> None:
    """With max_tuning_share 0.01 a try waits until the others took at most 1% of the time generating: far
    fewer tries than steps (each try costs about a prompt chunk's forward)."""
    llm = _llm(tiny_llama_deep, {**SWIFT, "max_optimization_steps": 1000, "max_tuning_share": 0.01})
    ids = llm.get_tokenizer().encode(TEXT)
    llm.generate([{"prompt_token_ids": ids[50:60] * 4}], SamplingParams(max_tokens=160, temperature=0,
                                                                         ignore_eos=True))
    tuner = llm.engine.speculator.proposer.tuner  # type: ignore[attr-defined]
    assert 0 < tuner.tries < 30


def test_swift_refuses_a_quantized_kv_cache_and_a_too_shallow_model(tiny_llama_deep: Path, tiny_llama3: Path) -> None:
    with pytest.raises(InvalidParameterError, match="quantized KV cache"):
        _llm(tiny_llama_deep, SWIFT, kv_cache_dtype="int8")
    with pytest.raises(InvalidParameterError, match="at least 4 layers"):
        _llm(tiny_llama3, SWIFT)


def test_a_missing_draft_model_is_named_as_the_draft(tiny_llama3: Path, tmp_path: Path) -> None:
    from ember.errors import EmberError

    with pytest.raises(EmberError, match="speculative_config: the draft model: .*nope"):
        _llm(tiny_llama3, {"method": "draft", "model": str(tmp_path / "nope.gguf")})
