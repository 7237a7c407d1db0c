"""The production model-server stack, started for real: LMCache's multi-process server and
vLLM's CPU build serving the bundled model (converted once to bf16), on loopback with
telemetry off, from the virtual environment ``make vllm`` builds. Servers are shared per
module, since a vLLM start costs about a minute on two cores."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from testbed import vllm_stack
from testbed.vllm_stack import LMCacheServer, VllmServer

from tests.conftest import Servers

# Equals vLLM's --max-model-len: the chatbot lays out prompts for the window vLLM serves.
CONTEXT_TOKENS = 2048
AFFINITY_HEADER = "x-session-id"  # the header vllm-router's consistent_hash reads first


@pytest.fixture(scope="session")
def vllm_model(model_path: Path) -> Path:
    """The bundled GGUF as the bf16 folder vLLM loads (converted on the first run)."""
    try:
        return vllm_stack.converted_model(model_path)
    except vllm_stack.StackMissing as exc:
        pytest.fail(str(exc))


@pytest.fixture(scope="session")
def chat_template() -> Path:
    """The template the project ships for vLLM: it renders the embedded engine's layout."""
    assert vllm_stack.SHIPPED_TEMPLATE.exists(), vllm_stack.SHIPPED_TEMPLATE
    return vllm_stack.SHIPPED_TEMPLATE


@pytest.fixture(scope="module")
def docs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("docs")
    (folder / "widgets.md").write_text("# Widgets\n\nA widget is a small part of a machine.\n")
    return folder


@dataclass
class Stack:
    cache: LMCacheServer
    vllm: VllmServer


@pytest.fixture(scope="module")
def stack(
    vllm_model: Path, chat_template: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """One LMCache server (L1 in RAM, ``fs`` L2 in a folder of the module's) and one vLLM
    storing to and loading from it. Tests may restart either; the ports stay."""
    work = tmp_path_factory.mktemp("vllm-stack")
    cache = LMCacheServer(l2_dir=work / "l2", log_dir=work)
    server = VllmServer(vllm_model, chat_template, work, cache)
    try:
        cache.start()
        server.start()
        yield Stack(cache, server)
    finally:
        server.stop()
        cache.stop()


def chatbot_front(servers: Servers, base_url: str, docs_dir: Path, **overrides: object) -> str:
    """A chatbot on its ``openai`` engine in front of ``base_url``, served in this process."""
    return servers(
        engine="openai",
        openai_base_url=base_url,
        openai_model=vllm_stack.SERVED_MODEL,
        openai_affinity_header=AFFINITY_HEADER,
        context_tokens=CONTEXT_TOKENS,
        docs_dir=docs_dir,
        **overrides,
    ).url
