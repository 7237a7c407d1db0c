from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from chatbot.config import Settings


def settings(**values: Any) -> Settings:
    """Settings from these values and the environment, never from a .env file (pydantic
    validates the values: any type may come in)."""
    return Settings(_env_file=None, **values)


def test_api_keys_map_bearer_keys_to_users() -> None:
    s = settings(api_keys="k-0123456789abcdef=alice, k-fedcba9876543210=bob")
    assert s.api_keys == {"k-0123456789abcdef": "alice", "k-fedcba9876543210": "bob"}


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("justakey", "CHATBOT_API_KEYS must look like 'key1=alice,key2=bob'"),
        ("k-0123456789abcdef=", "CHATBOT_API_KEYS must look like 'key1=alice,key2=bob'"),
        ("short=alice", "the API key of user 'alice' is shorter than 16 characters"),
        (
            "k-0123456789abcdef=a,k-0123456789abcdef=b",
            r"an API key is given twice \(users 'a', 'b'\)",
        ),
    ],
)
def test_malformed_or_weak_keys_refuse_to_start(value: str, reason: str) -> None:
    with pytest.raises(ValidationError, match=reason):
        settings(api_keys=value)


def test_keyless_mode_binds_to_loopback_only() -> None:
    assert settings(host="127.0.0.1").api_keys == {}
    settings(host="::1")
    with pytest.raises(ValidationError, match="loopback"):
        settings(host="0.0.0.0")
    settings(host="0.0.0.0", api_keys="k-0123456789abcdef=alice")


def test_keys_are_not_shown_in_the_settings_repr() -> None:
    assert "k-0123456789abcdef" not in repr(settings(api_keys="k-0123456789abcdef=alice"))


def test_environment_variables_use_the_chatbot_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHATBOT_PORT", "9123")
    monkeypatch.setenv("CHATBOT_MAX_TOKENS", "64")
    s = settings()
    assert (s.port, s.max_tokens) == (9123, 64)


def test_inconsistent_values_refuse_to_start() -> None:
    with pytest.raises(
        ValidationError, match="CHATBOT_MAX_TOKENS exceeds CHATBOT_MAX_TOKENS_LIMIT"
    ):
        settings(max_tokens=4096, max_tokens_limit=1024)
    with pytest.raises(
        ValidationError, match="Input should be 'embedded', 'openai' or 'simulated'"
    ):
        settings(engine="quantum")


def test_the_openai_engine_needs_a_server(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValidationError, match="CHATBOT_OPENAI_BASE_URL"):
        settings(engine="openai")
    with pytest.raises(ValidationError, match="http"):
        settings(engine="openai", openai_base_url="vllm:8000/v1")
    monkeypatch.setenv("CHATBOT_ENGINE", "openai")
    monkeypatch.setenv("CHATBOT_OPENAI_BASE_URL", "http://vllm:8000/v1")
    monkeypatch.setenv("CHATBOT_OPENAI_API_KEY", "sk-secret-0123456789")
    s = settings()
    assert (s.engine, s.openai_base_url) == ("openai", "http://vllm:8000/v1")
    assert "sk-secret" not in repr(s)
