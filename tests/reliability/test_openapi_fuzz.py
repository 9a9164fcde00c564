"""Schemathesis from the server's own OpenAPI schema: requests valid and invalid by that schema never get a
5xx, every error is OpenAI-shaped, and the schema tells the truth about statuses, content types and bodies.

CI runs a fixed, short budget. For a longer run against any `ember serve`:
    st run http://127.0.0.1:8000/openapi.json --checks all --exclude-checks positive_data_acceptance \\
        --max-response-time 120 --request-timeout 120 --max-time 1800
(positive_data_acceptance is left out: whether a prompt fits the context or the work budget depends on
its tokens, which a schema cannot say.)
"""
from __future__ import annotations

from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import checks

from tests.server.conftest import start_server, stop_server

CHECKS = [checks.not_a_server_error, checks.status_code_conformance, checks.content_type_conformance,
          checks.response_schema_conformance, checks.negative_data_rejection]
EXAMPLES = 30  # per operation and generation mode


@pytest.fixture(scope="module")
def url(tiny_llama3: Path, tmp_path_factory: pytest.TempPathFactory):
    srv = start_server(tiny_llama3, tmp_path_factory.mktemp("openapi"), "--max-model-len", "256")
    yield srv.url
    stop_server(srv)


@pytest.mark.parametrize("mode", list(schemathesis.GenerationMode), ids=lambda m: m.value)
def test_the_schema_holds_for_generated_requests(url: str, mode: schemathesis.GenerationMode) -> None:
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/chat/completions", "/v1/completions", "/tokenize"}
    if mode is schemathesis.GenerationMode.NEGATIVE:  # a GET without parameters has no invalid form
        operations = [op for op in operations if op.method.upper() == "POST"]
    for operation in operations:
        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def call(case: schemathesis.Case) -> None:
            response = case.call(timeout=120)
            case.validate_response(response, checks=CHECKS)
            if response.status_code >= 400:
                body = response.json()
                assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}

        call()
