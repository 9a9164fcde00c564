"""Structured outputs on a tiny random model: whatever the model prefers, the output follows the constraint
(a random model is the hard case: unconstrained, it never writes JSON)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest

from ember import LLM, SamplingParams
from ember.engine.structured import StructuredOutputsParams as SO
from ember.errors import InvalidParameterError

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age", "tags"],
          "properties": {"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer", "minimum": 0, "maximum": 999},
                         "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}}}


@pytest.fixture(scope="module")
def llm(tiny_llama3: Path) -> LLM:
    return LLM(str(tiny_llama3), max_model_len=512, kv_cache_memory=0.02)


def complete(llm: LLM, so: SO, n: int = 4, **kw) -> list:
    params = SamplingParams(n=n, temperature=1.0, seed=3, max_tokens=300, structured_outputs=so, **kw)
    return llm.generate("Once upon a time", params)[0].outputs


def test_unconstrained_random_model_writes_no_json(llm: LLM) -> None:
    out = llm.generate("Once upon a time", SamplingParams(temperature=0, max_tokens=40))[0].outputs[0].text
    with pytest.raises(ValueError):
        json.loads(out)


def test_json_schema_always_validates(llm: LLM) -> None:
    for c in complete(llm, SO(json=SCHEMA), n=6):
        assert c.finish_reason == "stop"
        jsonschema.validate(json.loads(c.text), SCHEMA)


def test_json_object_regex_choice_and_grammars(llm: LLM) -> None:
    for c in complete(llm, SO(json_object=True)):  # keys unbounded: a random model may run to max_tokens
        assert c.text.startswith("{") and (c.finish_reason == "length" or isinstance(json.loads(c.text), dict))
    for c in complete(llm, SO(regex=r"[0-9]{3}-[a-z]{2,4}")):
        assert re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", c.text), c.text
    for c in complete(llm, SO(choice=["red", "green", "blue"])):
        assert c.text in ("red", "green", "blue")
    for c in complete(llm, SO(grammar='start: "(" NUMBER ("," NUMBER)* ")"\nNUMBER: /[0-9]{1,3}/')):
        assert re.fullmatch(r"\(\d{1,3}(,\d{1,3})*\)", c.text), c.text
    for c in complete(llm, SO(grammar='root ::= "yes" | "no" | "maybe"')):  # GBNF, llama.cpp's
        assert c.text in ("yes", "no", "maybe")


def test_greedy_is_deterministic_and_batched_rows_keep_their_own_state(llm: LLM) -> None:
    greedy = SamplingParams(temperature=0, max_tokens=200, structured_outputs=SO(json=SCHEMA))
    alone = llm.generate("Once upon a time", greedy)[0].outputs[0].text
    mixed = llm.generate(["Once upon a time", "The end"], [greedy, SamplingParams(
        temperature=0, max_tokens=20, structured_outputs=SO(choice=["x", "y"]))])
    assert mixed[0].outputs[0].text == alone and mixed[1].outputs[0].text in ("x", "y")
    assert llm.engine.stats["grammar_masks"] > 0


def test_ignore_eos_still_stops_when_the_constraint_is_complete(llm: LLM) -> None:
    for c in complete(llm, SO(choice=["stop here"]), ignore_eos=True):
        assert c.text == "stop here" and c.finish_reason == "stop"


def test_bad_constraints_are_refused_before_any_work(llm: LLM) -> None:
    blocks = llm.engine.blocks.num_free_blocks
    for so, says in [(SO(json={"type": "nonsense"}), "Invalid type"), (SO(regex="("), "invalid"),
                     (SO(json='{"type": '), "invalid"),
                     (SO(json={"type": "string", "format": "no-such-format"}), "Unknown format"),
                     (SO(grammar="start: undefined_rule"), "invalid")]:
        with pytest.raises(InvalidParameterError, match=says):
            llm.generate("x", SamplingParams(structured_outputs=so))
    assert llm.engine.blocks.num_free_blocks == blocks and not llm.engine.requests
    with pytest.raises(InvalidParameterError, match="exactly one"):
        SO(json=SCHEMA, regex="a")
    with pytest.raises(InvalidParameterError, match="non-empty"):
        SO(choice=[])
