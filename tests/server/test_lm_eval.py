"""lm-eval's local-completions against a live `ember serve`: the offline LLM's log-likelihoods, choices and accuracy."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import pytest

from ember import LLM, SamplingParams
from tests.server.conftest import Server, start_server, stop_server

lm_eval = pytest.importorskip("lm_eval")

REPO = Path(__file__).resolve().parents[2]
TASKS = REPO / "tests" / "data" / "lm_eval"
TASK = "ember_tiny_mc"
ITEMS = [json.loads(line) for line in (TASKS / f"{TASK}.jsonl").read_text().splitlines() if line.strip()]
Scores = list[list[tuple[float, bool]]]  # per item, per choice: (log-likelihood, is_greedy)


def context(item: dict[str, Any]) -> str:
    return f"Question: {item['question']}\nAnswer:"  # the task's doc_to_text


def continuation(choice: str) -> str:
    return f" {choice}"  # the task's target_delimiter, then the choice


@pytest.fixture(scope="module")
def server(tiny_llama3: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start_server(tiny_llama3, tmp_path_factory.mktemp("lm_eval"))
    yield srv
    stop_server(srv)


@pytest.fixture(scope="module", params=[1, 4], ids=["batch1", "batch4"])
def evaluated(request: pytest.FixtureRequest, server: Server, tiny_llama3: Path) -> dict[str, Any]:
    """lm-eval's results with samples; batch_size 4 sends four token-id prompts in one request."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.chdir(REPO)  # the task's data_files path is relative to the repository root
        from lm_eval.tasks import TaskManager

        return lm_eval.simple_evaluate(
            model="local-completions",
            model_args={"model": server.model, "base_url": f"{server.url}/v1/completions",
                        "tokenizer": str(tiny_llama3), "tokenizer_backend": "huggingface",
                        "max_length": 512, "max_retries": 1, "batch_size": request.param},
            tasks=[TASK], task_manager=TaskManager(include_path=str(TASKS), include_defaults=False),
            log_samples=True, bootstrap_iters=0)


def split(llm: LLM, ctx: str, cont: str) -> tuple[list[int], list[int]]:
    """lm-eval's split (TemplateLM._encode_pair): trailing spaces move to the continuation; the whole text
    is encoded and the context's tokens cut off its front."""
    n = len(ctx) - len(ctx.rstrip())
    if n:
        ctx, cont = ctx[:-n], ctx[-n:] + cont
    tok = llm.get_tokenizer()
    whole, head = tok.encode(ctx + cont, add_special_tokens=False), tok.encode(ctx, add_special_tokens=False)
    return head, whole[len(head):]


@pytest.fixture(scope="module")
def offline(tiny_llama3: Path) -> Scores:
    """Each choice's log-likelihood given its context, and whether greedy decoding would produce it, from
    the prompt logprobs of LLM.generate."""
    llm = LLM(tiny_llama3, kv_cache_memory=0.02, max_model_len=512)
    pairs = [split(llm, context(item), continuation(c)) for item in ITEMS for c in item["choices"]]
    outs = llm.generate([{"prompt_token_ids": head + cont} for head, cont in pairs],
                        SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=1))
    flat = []
    for (head, cont), out in zip(pairs, outs):
        rows = out.prompt_logprobs[len(head):]
        flat.append((sum(row[t].logprob for row, t in zip(rows, cont)),
                     all(row[t].rank == 1 for row, t in zip(rows, cont))))
    it = iter(flat)
    return [[next(it) for _ in item["choices"]] for item in ITEMS]


def samples(evaluated: dict[str, Any]) -> list[dict[str, Any]]:
    return sorted(evaluated["samples"][TASK], key=lambda s: s["doc_id"])


def argmax(xs: list[float]) -> int:
    return max(range(len(xs)), key=xs.__getitem__)


def test_lm_eval_sends_the_tasks_prompts(evaluated: dict[str, Any]) -> None:
    got = samples(evaluated)
    assert [s["doc_id"] for s in got] == list(range(len(ITEMS)))
    for s, item in zip(got, ITEMS):
        assert [tuple(a) for a in s["arguments"]] == [(context(item), continuation(c)) for c in item["choices"]]


def test_log_likelihoods_match_the_offline_api(evaluated: dict[str, Any], offline: Scores) -> None:
    for s, expected in zip(samples(evaluated), offline, strict=True):
        served = [tuple(r) for r in s["filtered_resps"]]
        assert [lp for lp, _ in served] == pytest.approx([lp for lp, _ in expected], abs=1e-3), s["doc_id"]
        assert [g for _, g in served] == [g for _, g in expected], s["doc_id"]


def test_choices_and_accuracy_match_the_offline_api(evaluated: dict[str, Any], offline: Scores) -> None:
    got = samples(evaluated)
    served = [argmax([lp for lp, _ in s["filtered_resps"]]) for s in got]
    expected = [argmax([lp for lp, _ in scores]) for scores in offline]
    assert served == expected
    correct = [float(p == item["answer"]) for p, item in zip(expected, ITEMS)]
    assert [s["acc"] for s in got] == correct
    assert evaluated["results"][TASK]["acc,none"] == pytest.approx(sum(correct) / len(ITEMS))
