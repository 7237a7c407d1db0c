"""The adversarial probes, re-run against a live server on the real model: input both APIs
refuse alike (lone surrogates, control characters, blank content), parameters refused by
name instead of silently ignored, and what one user may see of the others (cache totals,
/metrics)."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from tests.conftest import BOB_KEY, CAROL_KEY, LiveServer, Servers
from tests.integration.test_conversation_api import new_conversation, stream_turn

# Raw JSON text: a lone surrogate cannot be put in a Python str sent by httpx's json=.
BAD_TEXT = {
    "a lone surrogate": r'"x\udfff"',
    "NUL": r'"a\u0000b"',
    "an escape character": r'"\u001b[31mred"',
    "a C1 control": r'"a\u0085b"',
}
REFUSED_PARAMETERS = {
    "logit_bias": {"1": 5},
    "logprobs": True,
    "top_logprobs": 2,
    "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
    "tool_choice": "auto",
    "functions": [{"name": "f"}],
    "function_call": "auto",
    "response_format": {"type": "json_object"},
}


def post_raw(client: httpx.Client, path: str, body: str) -> httpx.Response:
    return client.post(path, content=body, headers={"Content-Type": "application/json"})


def completion_body(server: LiveServer, content: str, stream: bool, **extra: Any) -> str:
    fields = {"model": server.state.engine.model_id, "stream": stream, **extra}
    head = json.dumps(fields)[:-1]
    return f'{head}, "messages": [{{"role": "user", "content": {content}}}]}}'


@pytest.mark.parametrize("what", BAD_TEXT)
def test_bad_text_gets_the_same_422_on_both_apis_streamed_or_not(
    live_server: LiveServer, what: str
) -> None:
    content = BAD_TEXT[what]
    with live_server.client() as client:
        conversation = new_conversation(client)
        native = post_raw(
            client, f"/v1/conversations/{conversation}/messages", f'{{"content": {content}}}'
        )
        answers = [
            post_raw(client, "/v1/chat/completions", completion_body(live_server, content, s))
            for s in (False, True)
        ]
        parts = post_raw(
            client,
            "/v1/chat/completions",
            completion_body(live_server, f'[{{"type": "text", "text": {content}}}]', True),
        )
        # Nothing was stored for the refused turn.
        assert client.get(f"/v1/conversations/{conversation}/messages").json()["data"] == []
    for response in (native, *answers, parts):
        assert response.status_code == 422, response.text
        assert response.headers["content-type"] == "application/json"
        error = response.json()["error"]
        assert error["code"] == "validation_error"
        assert ("surrogate" if what == "a lone surrogate" else "control character") in error[
            "message"
        ]
    assert native.json()["error"]["message"].startswith("content: ")
    assert answers[0].json()["error"]["message"].startswith("messages.0.content: ")


@pytest.mark.parametrize(
    ("field", "value"),
    [("model", r'"m\udfff"'), ("user", r'"u\u0007"'), ("stop", r'["\ud800"]')],
)
def test_every_text_field_of_the_openai_request_is_checked(
    live_server: LiveServer, field: str, value: str
) -> None:
    body = json.loads(completion_body(live_server, '"hi"', False))
    text = (
        json.dumps({k: v for k, v in body.items() if k != field})[:-1] + f', "{field}": {value}}}'
    )
    with live_server.client() as client:
        response = post_raw(client, "/v1/chat/completions", text)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["message"].startswith(f"{field}")


def test_blank_content_is_refused_with_the_contracts_own_words(live_server: LiveServer) -> None:
    with live_server.client() as client:
        conversation = new_conversation(client)
        for blank in (" \n\t", "\u3000\ufeff"):
            response = client.post(
                f"/v1/conversations/{conversation}/messages", json={"content": blank}
            )
            assert response.status_code == 422
            assert response.json()["error"]["message"] == "content: Value error, must not be blank"
        contract = client.get("/openapi.json").json()
    content = contract["components"]["schemas"]["MessageCreate"]["properties"]["content"]
    assert "Not blank" in content["description"]
    assert content["pattern"].startswith("^[^")


@pytest.mark.parametrize("parameter", REFUSED_PARAMETERS)
def test_parameters_that_would_change_the_answer_are_refused_by_name(
    live_server: LiveServer, parameter: str
) -> None:
    body = json.loads(completion_body(live_server, '"hi"', True))
    with live_server.client() as client:
        response = client.post(
            "/v1/chat/completions", json={**body, parameter: REFUSED_PARAMETERS[parameter]}
        )
    assert response.status_code == 400
    assert response.json()["error"] == {
        "type": "invalid_request_error",
        "message": f"{parameter!r} is not supported by this server; send the request without it",
        "code": "unsupported_parameter",
    }


def test_their_neutral_values_are_accepted(live_server: LiveServer) -> None:
    body = json.loads(completion_body(live_server, '"Say hi."', False))
    neutral = {
        "logit_bias": {},
        "logprobs": False,
        "tools": [],
        "tool_choice": "none",
        "response_format": {"type": "text"},
        "max_tokens": 2,
    }
    with live_server.client() as client:
        response = client.post("/v1/chat/completions", json={**body, **neutral})
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    ("stop", "message"),
    [
        ("", "stop: String should have at least 1 character"),
        ([""], "stop.0: String should have at least 1 character"),
        (["x"] * 11, "stop: List should have at most 10 items after validation, not 11"),
        (["y" * 201], "stop.0: String should have at most 200 characters"),
    ],
)
def test_the_stop_list_is_bounded(live_server: LiveServer, stop: Any, message: str) -> None:
    body = json.loads(completion_body(live_server, '"hi"', False))
    with live_server.client() as client:
        response = client.post("/v1/chat/completions", json={**body, "stop": stop})
    assert response.status_code == 422
    assert response.json()["error"]["message"] == message


def test_the_served_schema_states_this_servers_max_tokens_limit(live_server: LiveServer) -> None:
    limit = live_server.state.settings.max_tokens_limit
    schemas = httpx.get(f"{live_server.url}/openapi.json").json()["components"]["schemas"]
    for name, field in [
        ("MessageCreate", "max_tokens"),
        ("ChatCompletionRequest", "max_tokens"),
        ("ChatCompletionRequest", "max_completion_tokens"),
    ]:
        branches = schemas[name]["properties"][field]["anyOf"]
        assert {"type": "integer", "minimum": 1, "maximum": limit} in branches
    body = json.loads(completion_body(live_server, '"hi"', False))
    with live_server.client() as client:
        over = client.post("/v1/chat/completions", json={**body, "max_tokens": limit + 1})
    assert over.status_code == 400
    assert over.json()["error"]["code"] == "max_tokens_too_large"


def test_models_carry_max_model_len(live_server: LiveServer) -> None:
    with live_server.client() as client:
        card = client.get("/v1/models").json()["data"][0]
    assert card["max_model_len"] == live_server.state.engine.context_tokens == 4096


def test_cache_totals_are_an_operators_only(live_server: LiveServer) -> None:
    with live_server.client(BOB_KEY) as bob, live_server.client(CAROL_KEY) as carol:
        operator_before = carol.get("/v1/cache/stats").json()
        stream_turn(bob, new_conversation(bob), "Name a colour.", max_tokens=2)
        mine = bob.get("/v1/cache/stats").json()
        operator_after = carol.get("/v1/cache/stats").json()
    assert mine["cache"] is None
    assert mine["user"]["lookups"] >= 1
    assert operator_after["cache"]["lookups"] == operator_before["cache"]["lookups"] + 1


def test_metrics_answer_loopback_only_without_a_token(live_server: LiveServer) -> None:
    assert httpx.get(f"{live_server.url}/metrics").status_code == 200
    # A remote client behind a proxy on this host: uvicorn takes the client's address from
    # X-Forwarded-For when the proxy is on loopback (its default FORWARDED_ALLOW_IPS).
    remote = httpx.get(f"{live_server.url}/metrics", headers={"X-Forwarded-For": "203.0.113.9"})
    assert remote.status_code == 403
    assert remote.json()["error"]["code"] == "metrics_loopback_only"
    assert "chatbot_" not in remote.text


METRICS_TOKEN = "metrics-token-0123456789abcdef"


@pytest.fixture(scope="module")
def token_server(module_server: Servers) -> LiveServer:
    """/metrics behind a token. The simulated engine (a timing model, a fake named as such)
    serves it: what is tested is the route's guard, and no answer is generated."""
    return module_server(engine="simulated", metrics_token=METRICS_TOKEN)


@pytest.mark.parametrize("offered", [None, "wrong-token-0123456789", "Bearer"])
def test_metrics_need_the_token_when_one_is_set(token_server: LiveServer, offered: str) -> None:
    headers = {"Authorization": f"Bearer {offered}"} if offered else {}
    refused = httpx.get(f"{token_server.url}/metrics", headers=headers)
    assert refused.status_code == 401
    assert refused.json()["error"]["code"] == "invalid_metrics_token"
    assert refused.headers["www-authenticate"] == "Bearer"
    allowed = httpx.get(
        f"{token_server.url}/metrics",
        headers={"Authorization": f"Bearer {METRICS_TOKEN}", "X-Forwarded-For": "203.0.113.9"},
    )
    assert allowed.status_code == 200
    assert "chatbot_requests_total" in allowed.text
