"""The official ``openai`` client against our OpenAI-compatible endpoint, on the real model."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from chatbot.engines.embedded import EmbeddedEngine
from tests.conftest import ALICE_KEY, LiveServer


@pytest.fixture
def client(live_server: LiveServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(
        base_url=f"{live_server.url}/v1", api_key=ALICE_KEY, max_retries=0
    ) as client:
        yield client


def model_id(client: openai.OpenAI) -> str:
    models = client.models.list().data
    assert len(models) == 1
    return models[0].id


def stream_answer(
    client: openai.OpenAI, messages: list[ChatCompletionMessageParam]
) -> tuple[str, int, int, int]:
    """(content, prompt tokens, cached tokens, completion tokens) of a streamed answer."""
    stream = client.chat.completions.create(
        model=model_id(client),
        messages=messages,
        stream=True,
        temperature=0,
        max_tokens=32,
        stream_options={"include_usage": True},
    )
    parts: list[str] = []
    usage = None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            usage = chunk.usage
    assert usage is not None
    assert usage.prompt_tokens_details is not None
    cached = usage.prompt_tokens_details.cached_tokens or 0
    return "".join(parts), usage.prompt_tokens, cached, usage.completion_tokens


def test_streamed_answer_then_a_cached_second_turn(
    client: openai.OpenAI, live_server: LiveServer
) -> None:
    engine = live_server.state.engine
    assert isinstance(engine, EmbeddedEngine)
    messages: list[ChatCompletionMessageParam] = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What colour is the sky on a clear day?"},
    ]
    answer, prompt1, _, completion1 = stream_answer(client, messages)
    assert answer.strip()
    assert len(answer.split()) >= 2

    messages += [
        {"role": "assistant", "content": answer},
        {"role": "user", "content": "And at sunset?"},
    ]
    before = engine.context.evaluated_tokens()
    _, prompt2, cached2, _ = stream_answer(client, messages)
    after = engine.context.evaluated_tokens()

    assert prompt1 <= cached2 <= prompt1 + completion1
    # What llama.cpp itself evaluated before sampling is exactly what we say was not cached.
    assert after[0] - before[0] == prompt2 - cached2


def test_non_streamed_completion(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model=model_id(client),
        temperature=0,
        max_tokens=16,
        messages=[{"role": "user", "content": "Say hello."}],
    )
    assert completion.object == "chat.completion"
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].message.content
    assert completion.choices[0].finish_reason in ("stop", "length")
    usage = completion.usage
    assert usage is not None
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_stop_sequences_and_length_limit(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model=model_id(client),
        temperature=0,
        max_tokens=3,
        messages=[{"role": "user", "content": "Tell me a long story about a dragon."}],
    )
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 3


def test_client_errors_map_to_openai_exceptions(
    live_server: LiveServer, client: openai.OpenAI
) -> None:
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(
            model="no-such-model", messages=[{"role": "user", "content": "hi"}]
        )
    with (
        openai.OpenAI(
            base_url=f"{live_server.url}/v1", api_key="wrong-key-0123456789", max_retries=0
        ) as stranger,
        pytest.raises(openai.AuthenticationError),
    ):
        stranger.models.list()
