"""Every operation of the contract, fuzzed by Schemathesis against the real app on the real
model, over HTTP, with a valid key: no 5xx, and every response as the contract says (status
declared, content type, body schema, auth enforced), event streams included.

Deterministic (derandomised), and sized to run in about a minute on two cores: answers are
at most 8 tokens and messages at most 200 characters.

Then strings and numbers of our own on both APIs (lone surrogates, control characters, numbers
out of every range, NaN): always a 4xx with a JSON error or a whole answer, never a 5xx and
never a stream that starts and then dies.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import jsonschema_rs
import pytest
import schemathesis
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import Case, CheckContext, GenerationMode, Response
from schemathesis.core.result import Err

from tests.conftest import ALICE_KEY, LiveServer, Servers
from tests.sse import parse_events

CONTRACT = (
    Path(__file__).parents[3] / "specs" / "001-lmcache-chatbot" / "contracts" / "openapi.yaml"
)
EXAMPLES_PER_OPERATION = 12
MAX_TOKENS_LIMIT = 8
MAX_MESSAGE_CHARS = 200
AUTH = {"Authorization": f"Bearer {ALICE_KEY}"}
# What valid data may still be refused with, and why: limits of the server's configuration,
# which a static contract cannot state (an answer longer than CHATBOT_MAX_TOKENS_LIMIT, a
# prompt longer than the context, a message longer than CHATBOT_MAX_MESSAGE_CHARS), and a
# page cursor (`after`) naming no conversation of the caller's.
ACCEPTED_REFUSALS = {
    400: {"max_tokens_too_large", "context_length_exceeded"},
    404: {"conversation_not_found"},
    413: {"message_too_large"},
}

schema = schemathesis.openapi.from_path(
    CONTRACT,
    config=schemathesis.Config.from_dict(
        {
            "seed": 20261124,
            "generation": {
                "max-examples": EXAMPLES_PER_OPERATION,
                "deterministic": True,
                "database": "none",
            },
            "checks": {
                "positive_data_acceptance": {
                    "expected-statuses": ["2xx", *map(str, ACCEPTED_REFUSALS)]
                }
            },
        }
    ),
)

_CONTRACT = yaml.safe_load(CONTRACT.read_text())


def _validator(name: str) -> jsonschema_rs.Validator:
    """A validator for one of the contract's component schemas."""
    return jsonschema_rs.validator_for(
        {"$ref": f"#/components/schemas/{name}", "components": _CONTRACT["components"]}
    )


# The events of a native turn's stream, in the shapes the contract's description gives.
_NATIVE_EVENTS: dict[str, dict[str, Any]] = {
    "message.start": {
        "type": "object",
        "required": ["conversation_id", "message_id", "agent", "route_reason"],
        "properties": {
            "conversation_id": {"type": "string"},
            "message_id": {"type": "string"},
            "agent": {"$ref": "#/components/schemas/AgentName"},
            "route_reason": {"type": ["string", "null"]},
        },
    },
    "token": {
        "type": "object",
        "required": ["delta"],
        "properties": {"delta": {"type": "string"}},
        "additionalProperties": False,
    },
    "message.end": {
        "type": "object",
        "required": ["message_id", "status", "content", "usage", "timing", "agent"],
        "properties": {
            "message_id": {"type": "string"},
            "status": {"$ref": "#/components/schemas/MessageStatus"},
            "content": {"type": "string"},
            "usage": {"anyOf": [{"$ref": "#/components/schemas/Usage"}, {"type": "null"}]},
            "timing": {"anyOf": [{"$ref": "#/components/schemas/Timing"}, {"type": "null"}]},
            "agent": {"anyOf": [{"$ref": "#/components/schemas/AgentName"}, {"type": "null"}]},
            "route_reason": {"type": ["string", "null"]},
            "source": {"type": ["string", "null"]},
        },
    },
    "error": {"$ref": "#/components/schemas/ErrorResponse"},
}
_NATIVE = {
    name: jsonschema_rs.validator_for({**shape, "components": _CONTRACT["components"]})
    for name, shape in _NATIVE_EVENTS.items()
}
_CHUNK = jsonschema_rs.validator_for(
    {
        "type": "object",
        "required": ["id", "object", "created", "model", "choices"],
        "properties": {
            "object": {"const": "chat.completion.chunk"},
            "choices": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["index", "delta"],
                    "properties": {
                        "delta": {
                            "type": "object",
                            "properties": {
                                "role": {"const": "assistant"},
                                "content": {"type": "string"},
                            },
                        },
                        "finish_reason": {"enum": ["stop", "length"]},
                    },
                },
            },
            "usage": {"$ref": "#/components/schemas/CompletionUsage"},
        },
        "components": _CONTRACT["components"],
    }
)
_ERROR = _validator("ErrorResponse")


def _valid(validator: jsonschema_rs.Validator, data: Any, what: str) -> None:
    errors = [str(error) for error in validator.iter_errors(data)]
    assert not errors, f"{what} breaks its schema: {errors[:3]} in {json.dumps(data)[:500]}"


def event_stream_conformance(ctx: CheckContext, response: Response, case: Case[Any]) -> bool | None:
    """The contract gives no schema for ``text/event-stream``; its description does. Each
    event must have the shape described, and the stream must be complete."""
    if not response.headers.get("content-type", [""])[0].startswith("text/event-stream"):
        return None
    lines = response.content.decode("utf-8").splitlines()
    events = list(parse_events([*lines, ""]))
    assert events, "an empty event stream"
    if case.operation.path == "/v1/chat/completions":
        assert events[-1] == ("message", "[DONE]"), "the stream must end with [DONE]"
        for name, data in events[:-1]:
            assert name == "message"
            _valid(_ERROR if "error" in data else _CHUNK, data, "a chunk")
        finishes = [c for _, d in events[:-1] for c in d.get("choices", []) if "finish_reason" in c]
        assert len(finishes) == 1 or "error" in events[-2][1], "one finish_reason per answer"
        return True
    names = [name for name, _ in events]
    assert names[0] == "message.start", names
    assert names[-1] in ("message.end", "error"), names
    assert set(names[1:-1]) <= {"token"}, names
    for name, data in events:
        _valid(_NATIVE[name], data, f"the {name} event")
    if names[-1] == "message.end":
        end = events[-1][1]
        assert end["message_id"] == events[0][1]["message_id"]
        assert end["content"].startswith("".join(d["delta"] for n, d in events if n == "token"))
    return True


def refusals_of_valid_data_are_the_accepted_ones(
    ctx: CheckContext, response: Response, case: Case[Any]
) -> bool | None:
    """Valid data refused with 400, 404 or 413 (which `positive_data_acceptance` lets
    through) is refused for one of the reasons above, and no other."""
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive:
        return None
    status = response.status_code
    if status not in ACCEPTED_REFUSALS:
        return None
    code = response.json()["error"]["code"]
    assert code in ACCEPTED_REFUSALS[status], f"valid data refused: {response.text}"
    if status == 404:
        # Every conversation id the fuzzer sends exists: only a page cursor can be unknown.
        assert case.operation.path == "/v1/conversations", response.text
        assert (case.query or {}).get("after") is not None, response.text
    return True


@pytest.fixture(scope="module")
def fuzz_server(model_path: Path, module_server: Servers) -> LiveServer:
    return module_server(
        model_path,
        max_tokens=MAX_TOKENS_LIMIT,
        max_tokens_limit=MAX_TOKENS_LIMIT,
        max_message_chars=MAX_MESSAGE_CHARS,
        context_tokens=2048,
        queue_size=4,
        requests_per_minute=1_000_000,
    )


@pytest.fixture(scope="module")
def conversation_with_history(fuzz_server: LiveServer) -> str:
    """A conversation with one answered turn, for the operations that read or rename."""
    with fuzz_server.client() as client:
        conversation_id: str = client.post("/v1/conversations", json={"title": "fuzz"}).json()["id"]
        turn = client.post(
            f"/v1/conversations/{conversation_id}/messages",
            json={"content": "What is the capital of Italy?", "stream": False},
        )
        assert turn.status_code == 200, turn.text
    return conversation_id


def _prepare(case: Case[Any], server: LiveServer, conversation_with_history: str) -> None:
    """Points generated cases at things that exist, so that the fuzzer reaches past the
    404s (which the integration tests cover) into real turns."""
    if case.path_parameters and "conversation_id" in case.path_parameters:
        consumes = case.method.upper() in ("DELETE", "POST")  # deletes it, or adds a turn
        if consumes:
            with server.client() as client:
                created = client.post("/v1/conversations", json={})
                case.path_parameters["conversation_id"] = created.json()["id"]
        else:
            case.path_parameters["conversation_id"] = conversation_with_history
    body = case.body
    if case.operation.path == "/v1/chat/completions" and isinstance(body, dict):
        meta = case.meta
        if meta is not None and meta.generation.mode is GenerationMode.POSITIVE:
            body["model"] = server.state.engine.model_id


@schema.parametrize()
def test_every_operation_keeps_the_contract(
    case: Case[Any], fuzz_server: LiveServer, conversation_with_history: str
) -> None:
    _prepare(case, fuzz_server, conversation_with_history)
    case.call_and_validate(
        base_url=fuzz_server.url,
        headers=AUTH,
        timeout=60,
        additional_checks=[event_stream_conformance, refusals_of_valid_data_are_the_accepted_ones],
    )


def test_the_fuzzer_covers_every_operation_of_the_contract() -> None:
    operations = {
        (method.upper(), path)
        for path, item in _CONTRACT["paths"].items()
        for method in item
        if method in ("get", "post", "put", "patch", "delete")
    }
    fuzzed = set()
    for result in schema.get_all_operations():
        if isinstance(result, Err):
            pytest.fail(f"the fuzzer cannot read an operation of the contract: {result.err()}")
        fuzzed.add((result.ok().method.upper(), result.ok().path))
    assert fuzzed == operations


# --- the strings and numbers an attacker or a careless client sends, on both APIs. The
# contract's own generation never makes them (its patterns exclude control characters, and
# JSON Schema cannot describe a lone surrogate), so they are drawn here.

_SURROGATES = st.characters(categories=["Cs"])
_CONTROLS = st.characters(categories=["Cc"], exclude_characters="\t\n\r")
_BAD_TEXT = st.tuples(st.text(max_size=8), st.one_of(_SURROGATES, _CONTROLS), st.text(max_size=8))
BAD_TEXT = _BAD_TEXT.map("".join)
"""Text with at least one lone surrogate or control character: always refused, 422."""
HUGE_NUMBERS = st.one_of(
    st.integers(min_value=2**31),
    st.integers(max_value=-(2**31)),
    st.sampled_from([0, -1, 2**63, 2**64, 10**40]),
    st.floats(allow_nan=True, allow_infinity=True),
)
"""Numbers out of every range, NaN and infinities (which Python writes as bare NaN, not
JSON: 400 invalid_json)."""
NATIVE_NUMBER_FIELDS = ["max_tokens", "temperature"]
OPENAI_NUMBER_FIELDS = ["max_tokens", "max_completion_tokens", "temperature", "top_p", "n", "seed"]
OPENAI_TEXT_FIELDS = ["content", "parts", "model", "stop", "stop_list", "user", "system"]


def _post(server: LiveServer, path: str, body: dict[str, Any]) -> httpx.Response:
    # ensure_ascii: a lone surrogate travels as its \\u escape, as a client's JSON would
    # carry it; allow_nan: NaN and Infinity go out as the bare words some encoders write.
    text = json.dumps(body, ensure_ascii=True, allow_nan=True)
    with server.client() as client:
        return client.post(path, content=text, headers={"Content-Type": "application/json"})


def _refused_cleanly(response: httpx.Response, expected: set[int]) -> None:
    assert response.status_code in expected, response.text
    assert response.headers["content-type"] == "application/json", response.text
    _valid(_ERROR, response.json(), "an error")


def _ended_cleanly(response: httpx.Response, path: str) -> None:
    """A 200 is a whole answer: a stream that started ends as the contract says."""
    assert response.status_code == 200, response.text
    if not response.headers["content-type"].startswith("text/event-stream"):
        return
    events = list(parse_events([*response.text.splitlines(), ""]))
    if path == "/v1/chat/completions":
        assert events[-1] == ("message", "[DONE]")
    else:
        assert events[-1][0] in ("message.end", "error")


_FUZZ = settings(
    max_examples=30,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@_FUZZ
@given(content=BAD_TEXT, stream=st.booleans())
def test_bad_text_is_422_on_the_native_api(
    fuzz_server: LiveServer, content: str, stream: bool
) -> None:
    with fuzz_server.client() as client:
        conversation = client.post("/v1/conversations", json={}).json()["id"]
    path = f"/v1/conversations/{conversation}/messages"
    _refused_cleanly(_post(fuzz_server, path, {"content": content, "stream": stream}), {422})
    _refused_cleanly(_post(fuzz_server, "/v1/conversations", {"title": content}), {422})


@_FUZZ
@given(field=st.sampled_from(OPENAI_TEXT_FIELDS), text=BAD_TEXT, stream=st.booleans())
def test_bad_text_in_any_field_is_422_on_the_openai_api(
    fuzz_server: LiveServer, field: str, text: str, stream: bool
) -> None:
    body: dict[str, Any] = {
        "model": fuzz_server.state.engine.model_id,
        "stream": stream,
        "messages": [{"role": "user", "content": "Hi"}],
    }
    if field == "content":
        body["messages"][0]["content"] = text
    elif field == "parts":
        body["messages"][0]["content"] = [{"type": "text", "text": text}]
    elif field == "system":
        body["messages"].insert(0, {"role": "system", "content": text})
    elif field == "stop_list":
        body["stop"] = ["ok", text]
    else:
        body[field] = text
    _refused_cleanly(_post(fuzz_server, "/v1/chat/completions", body), {422})


@_FUZZ
@given(field=st.sampled_from(NATIVE_NUMBER_FIELDS), number=HUGE_NUMBERS)
def test_huge_numbers_never_5xx_on_the_native_api(
    fuzz_server: LiveServer, field: str, number: float
) -> None:
    with fuzz_server.client() as client:
        conversation = client.post("/v1/conversations", json={}).json()["id"]
    path = f"/v1/conversations/{conversation}/messages"
    response = _post(fuzz_server, path, {"content": "Hi", "stream": True, field: number})
    if response.status_code == 200:
        _ended_cleanly(response, path)
    else:
        _refused_cleanly(response, {400, 422})


@_FUZZ
@given(field=st.sampled_from(OPENAI_NUMBER_FIELDS), number=HUGE_NUMBERS, stream=st.booleans())
def test_huge_numbers_never_5xx_on_the_openai_api(
    fuzz_server: LiveServer, field: str, number: float, stream: bool
) -> None:
    body = {
        "model": fuzz_server.state.engine.model_id,
        "stream": stream,
        "max_tokens": 2,
        "messages": [{"role": "user", "content": "Hi"}],
        field: number,
    }
    response = _post(fuzz_server, "/v1/chat/completions", body)
    if response.status_code == 200:
        _ended_cleanly(response, "/v1/chat/completions")
    else:
        _refused_cleanly(response, {400, 422})
