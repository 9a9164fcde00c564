"""One request must never fail another: bad ids are refused at admission, and a failure inside a step that
one request causes fails that request alone while the others run on exactly as they would have."""
from __future__ import annotations

import asyncio
import math
from pathlib import Path

import pytest

from ember import LLM, SamplingParams
from ember.engine.async_engine import AsyncEngine, RequestFailedError
from ember.engine.engine import LLMEngine
from ember.errors import InvalidParameterError, PromptTooLongError

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
PROMPTS = [[5, 17, 42, 99, 3], [7, 8, 9], [100, 200, 300, 12, 13, 14, 15], [21, 22]]


@pytest.fixture(scope="module")
def llm(tiny_llama3: Path) -> LLM:
    return LLM(tiny_llama3, kv_cache_memory=0.01, max_model_len=256)


@pytest.fixture(scope="module")
def solo(llm: LLM) -> list[list[int]]:
    """Each prompt's greedy tokens, run alone."""
    return [llm.generate({"prompt_token_ids": p}, GREEDY)[0].outputs[0].token_ids for p in PROMPTS]


def _run(engine: LLMEngine, requests: dict[str, tuple[list[int], SamplingParams]]) -> dict[str, object]:
    for rid, (ids, params) in requests.items():
        engine.add_request(rid, {"prompt_token_ids": ids}, params)
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    return done


def _requests() -> dict[str, tuple[list[int], SamplingParams]]:
    return {str(i): (p, GREEDY) for i, p in enumerate(PROMPTS)}


def _check_others(done: dict, solo: list[list[int]], bad: str, engine: LLMEngine) -> None:
    assert done[bad].error and done[bad].outputs[0].finish_reason == "error"
    for i, expected in enumerate(solo):
        if str(i) != bad:
            assert done[str(i)].error is None
            assert done[str(i)].outputs[0].token_ids == expected
    assert engine.blocks.num_used_blocks == 0 and not engine.scheduler.running and not engine.scheduler.waiting


@pytest.mark.parametrize("params", [
    dict(stop_token_ids=[1_000_000], min_tokens=1), dict(stop_token_ids=[2 ** 70], min_tokens=1),
    dict(logit_bias={1_000_000: 5.0}), dict(logit_bias={2 ** 70: -100.0})])
def test_out_of_vocabulary_ids_are_refused_at_admission(llm: LLM, params: dict) -> None:
    engine = llm.engine
    with pytest.raises(InvalidParameterError, match="outside the vocabulary"):
        engine.add_request("x", [1, 2, 3], SamplingParams(max_tokens=2, **params))
    assert not engine.has_unfinished_requests()


def test_a_request_that_breaks_the_forward_fails_alone(llm: LLM, solo: list[list[int]],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    engine = llm.engine
    run = engine.runner.run

    def run_unless_bad(batch):  # noqa: ANN001, ANN202
        if any(s.request_id == "2" for s in batch) and any(len(s.output_ids) >= 3 for s in batch):
            raise RuntimeError("kernel fault")
        return run(batch)

    monkeypatch.setattr(engine.runner, "run", run_unless_bad)
    _check_others(_run(engine, _requests()), solo, "2", engine)


def test_a_transient_forward_failure_fails_nobody(llm: LLM, solo: list[list[int]],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    engine = llm.engine
    run, calls = engine.runner.run, []

    def flaky(batch):  # noqa: ANN001, ANN202
        calls.append(len(batch))
        if len(calls) == 3:
            raise MemoryError("transient")
        return run(batch)

    monkeypatch.setattr(engine.runner, "run", flaky)
    done = _run(engine, _requests())
    assert [done[str(i)].outputs[0].token_ids for i in range(len(PROMPTS))] == solo
    assert all(d.error is None for d in done.values())


def test_a_request_that_breaks_its_own_bookkeeping_fails_alone(llm: LLM, solo: list[list[int]],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    engine = llm.engine
    prepare = engine.prepare

    def prepare_with_broken_detokenizer(rid, prompt, params):  # noqa: ANN001, ANN202
        req = prepare(rid, prompt, params)
        if rid == "1":
            for detok in req.detoks.values():
                detok.add = lambda token: (_ for _ in ()).throw(UnicodeError("detokenizer bug"))
        return req

    monkeypatch.setattr(engine, "prepare", prepare_with_broken_detokenizer)
    _check_others(_run(engine, _requests()), solo, "1", engine)


def test_a_row_that_breaks_batched_sampling_fails_alone(llm: LLM, solo: list[list[int]],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    engine = llm.engine
    sample = engine.sampler.sample

    def sample_but_not_marked(logits, rows):  # noqa: ANN001, ANN202
        if any(r.params.top_k == 7 for r in rows):
            raise IndexError("a sampler bug on this row")
        return sample(logits, rows)

    monkeypatch.setattr(engine.sampler, "sample", sample_but_not_marked)
    reqs = _requests()
    reqs["3"] = (PROMPTS[3], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, top_k=7))
    _check_others(_run(engine, reqs), solo, "3", engine)


def test_a_seeded_row_samples_the_same_when_another_row_breaks_sampling_late(llm: LLM,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The failure comes after the batched draw took its uniforms: the retry must not draw the seeded row twice."""
    import ember.engine.sampler as sampler

    seeded = SamplingParams(max_tokens=12, temperature=1.0, seed=123, ignore_eos=True)
    alone = llm.generate({"prompt_token_ids": PROMPTS[0]}, seeded)[0].outputs[0].token_ids
    row_logprobs = sampler._row_logprobs

    def broken_for_top_k_7(raw, rows, ids):  # noqa: ANN001, ANN202
        if any(r.params.top_k == 7 for r in rows):
            raise IndexError("a sampler bug on this row")
        return row_logprobs(raw, rows, ids)

    monkeypatch.setattr(sampler, "_row_logprobs", broken_for_top_k_7)
    reqs = {"a": (PROMPTS[0], seeded),
            "b": (PROMPTS[1], SamplingParams(max_tokens=12, temperature=1.0, top_k=7, ignore_eos=True))}
    done = _run(llm.engine, reqs)
    assert done["b"].error and done["a"].error is None
    assert done["a"].outputs[0].token_ids == alone
    assert llm.engine.blocks.num_used_blocks == 0


def test_a_scheduler_failure_sheds_the_newest_request(llm: LLM, solo: list[list[int]],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    engine = llm.engine
    schedule, calls = engine.scheduler.schedule, []

    def once_broken():  # noqa: ANN202
        calls.append(1)
        if len(calls) == 2:
            raise KeyError("scheduler bug")
        return schedule()

    monkeypatch.setattr(engine.scheduler, "schedule", once_broken)
    _check_others(_run(engine, _requests()), solo, str(len(PROMPTS) - 1), engine)


def test_a_scheduler_that_keeps_failing_on_an_old_request_sheds_it_at_the_third_try(
        llm: LLM, solo: list[list[int]], monkeypatch: pytest.MonkeyPatch) -> None:
    engine = llm.engine
    schedule = engine.scheduler.schedule

    def broken_while_0_runs():  # noqa: ANN202
        if "0" in engine.requests:
            raise KeyError("scheduler bug on request 0")
        return schedule()

    monkeypatch.setattr(engine.scheduler, "schedule", broken_while_0_runs)
    done = _run(engine, _requests())
    assert [bool(done[r].error) for r in "0123"] == [True, False, True, True]  # 3 and 2 shed first, then 0
    assert done["1"].outputs[0].token_ids == solo[1]
    assert engine.blocks.num_used_blocks == 0 and not engine.scheduler.running and not engine.scheduler.waiting


def test_async_engine_fails_the_one_request(tiny_llama3: Path, solo: list[list[int]]) -> None:
    engine = LLMEngine(model=tiny_llama3, kv_cache_memory=0.01, max_model_len=256)
    run = engine.runner.run
    engine.runner.run = lambda batch: (_ for _ in ()).throw(RuntimeError("boom")) \
        if any(s.request_id == "0" for s in batch) else run(batch)
    served = AsyncEngine(engine)
    served.start()

    async def one(rid: str, ids: list[int]) -> object:
        out = None
        async for out in served.generate(rid, {"prompt_token_ids": ids}, GREEDY):
            pass
        return out.outputs[0].token_ids

    async def everyone() -> list[object]:
        return await asyncio.gather(*[one(str(i), p) for i, p in enumerate(PROMPTS)], return_exceptions=True)

    try:
        results = asyncio.run(everyone())
    finally:
        served.stop()
    assert isinstance(results[0], RequestFailedError) and "boom" in str(results[0])
    assert results[1:] == solo[1:]
    assert engine.blocks.num_used_blocks == 0


@pytest.mark.parametrize("field,value", [
    ("temperature", math.nan), ("temperature", math.inf), ("top_p", math.nan), ("min_p", math.nan),
    ("repetition_penalty", math.inf), ("repetition_penalty", math.nan), ("presence_penalty", math.nan),
    ("seed", 2 ** 64), ("seed", -(2 ** 63) - 1), ("stop", ["x"] * 33), ("stop", ["x" * 513]),
    ("stop", ["hi \ud800"]), ("stop_token_ids", list(range(257))), ("stop_token_ids", [-1]),
    ("logit_bias", {5: 101.0}), ("logit_bias", {5: math.nan}), ("logit_bias", {-3: 1.0}),
    ("min_tokens", 20)])
def test_sampling_values_are_validated(field: str, value: object) -> None:
    with pytest.raises(InvalidParameterError) as e:
        SamplingParams(max_tokens=10, **{field: value})
    assert e.value.param == field


def test_seeds_at_the_edges_of_64_bits(llm: LLM) -> None:
    for seed in (2 ** 64 - 1, -(2 ** 63)):
        out = llm.generate([1, 2, 3], SamplingParams(max_tokens=3, n=2, seed=seed, ignore_eos=True))[0]
        assert [len(c.token_ids) for c in out.outputs] == [3, 3]


def test_logit_bias_forces_and_bans(llm: LLM, solo: list[list[int]]) -> None:
    prompt = {"prompt_token_ids": PROMPTS[0]}
    forced = llm.generate(prompt, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True,
                                                 logit_bias={77: 100.0}))[0].outputs[0].token_ids
    assert forced == [77] * 4
    first = solo[0][0]
    banned = llm.generate(prompt, SamplingParams(max_tokens=1, temperature=0, ignore_eos=True,
                                                 logit_bias={first: -100.0}))[0].outputs[0].token_ids
    assert banned != [first]


def test_text_checks_come_before_tokenizing(llm: LLM, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = llm.engine
    with pytest.raises(InvalidParameterError, match="surrogate"):
        engine.add_request("s", "hi \ud800 there", GREEDY)
    monkeypatch.setattr(engine.tokenizer, "encode", lambda *a, **k: pytest.fail("tokenized a hopeless prompt"))
    with pytest.raises(PromptTooLongError, match="characters"):
        engine.add_request("long", "word " * (engine.max_model_len * engine.max_text_chars_per_token), GREEDY)
    with pytest.raises(InvalidParameterError, match="list of integers"):
        engine.add_request("ids", {"prompt_token_ids": [1, "2"]}, GREEDY)
    assert not engine.has_unfinished_requests()


def test_an_error_after_a_finished_output_leaves_the_result_to_its_reader() -> None:
    """A shutdown cut (or a failure of all) racing a request that just finished must not turn it into an error."""
    import asyncio

    from ember.engine.async_engine import _Stream
    from ember.engine.outputs import RequestOutput

    stream = _Stream(asyncio.new_event_loop())
    running, done = RequestOutput("r", None, [1], [], False), RequestOutput("r", None, [1], [], True)
    stream.put(running)
    stream.put(done)
    stream.put(RuntimeError("the server shut down"))
    assert stream.latest is done and stream.ended
    unfinished = _Stream(asyncio.new_event_loop())
    unfinished.put(running)
    unfinished.put(RuntimeError("the server shut down"))
    assert isinstance(unfinished.latest, RuntimeError)
