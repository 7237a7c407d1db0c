"""Langfuse tracing: the real Langfuse SDK, pointed at a local HTTP endpoint that records the
OTLP payloads it receives, traces two turns of a conversation on the real model."""

from __future__ import annotations

import gzip
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

from chatbot.api.deps import AppState
from chatbot.observability.tracing import Tracer
from tests.conftest import ALICE_KEY, Servers
from tests.integration.test_conversation_api import new_conversation, stream_turn


@dataclass
class Recorder:
    """What a Langfuse server would have received."""

    url: str
    requests: list[tuple[str, bytes]] = field(default_factory=list)

    def spans(self) -> list[tuple[str, dict[str, Any]]]:
        spans = []
        for path, body in self.requests:
            if not path.endswith("/otel/v1/traces"):
                continue
            export = ExportTraceServiceRequest.FromString(body)
            for resource in export.resource_spans:
                for scope in resource.scope_spans:
                    for span in scope.spans:
                        attributes = {a.key: _value(a.value) for a in span.attributes}
                        spans.append((span.name, attributes))
        return spans


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_value(v) for v in value.array_value.values]
    return getattr(value, kind) if kind else None


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    received: list[tuple[str, bytes]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if self.headers.get("Content-Encoding") == "gzip":
                body = gzip.decompress(body)
            received.append((self.path, body))
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield Recorder(url=f"http://127.0.0.1:{server.server_port}", requests=received)
    finally:
        server.shutdown()
        server.server_close()


def test_each_turn_is_exported_with_session_user_agent_usage_and_first_token_time(
    recorder: Recorder, model_path: Path, server: Servers
) -> None:
    traced = server(
        model_path,
        LANGFUSE_PUBLIC_KEY="pk-lf-test",
        LANGFUSE_SECRET_KEY="sk-lf-test",
        LANGFUSE_BASE_URL=recorder.url,
    )
    with traced.client(ALICE_KEY) as alice:
        conversation = new_conversation(alice)
        stream_turn(alice, conversation, "Hello! Who are you?")
        second = dict(stream_turn(alice, conversation, "What is 3 plus 4?"))["message.end"]
    state: AppState = traced.app.state.chatbot
    state.tracer.flush()

    spans = recorder.spans()
    generations = [a for _, a in spans if a.get("langfuse.observation.type") == "generation"]
    assert len(generations) == 2
    last = generations[-1]
    usage = json.loads(last["langfuse.observation.usage_details"])
    cached = second["usage"]["cached_tokens"]
    assert cached > 0
    assert usage["input_cache_read"] == cached
    assert usage["input"] + usage["input_cache_read"] == second["usage"]["prompt_tokens"]
    assert usage["output"] == second["usage"]["completion_tokens"]
    assert "langfuse.observation.completion_start_time" in last
    assert json.loads(last["langfuse.observation.metadata.agent"]) == "assistant"
    assert last["langfuse.observation.model.name"] == state.engine.model_id
    assert {a.get("session.id") for _, a in spans} >= {conversation}
    assert {a.get("user.id") for _, a in spans} >= {"alice"}
    assert {"route", "assistant"} <= {name for name, _ in spans}


def test_without_keys_tracing_is_off_and_costs_nothing() -> None:
    tracer = Tracer()
    assert not tracer.enabled
    config = tracer.run_config(user_id="alice", session_id="conv_1")
    assert "callbacks" not in config
