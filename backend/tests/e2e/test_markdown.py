"""How the page shows an answer's text: Markdown with code blocks, sanitised, or plain text
when the libraries are not installed.

The answer here must hold Markdown and hostile HTML, which no model can be relied on to
write: the page talks to a scripted stand-in of the API that streams a fixed answer in the
real API's events. Everything about real answers is in test_chat_page.py.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from selenium import webdriver

from chatbot.web import install_page
from tests.conftest import serve_in_thread
from tests.e2e.chat_page import UI_TIMEOUT, ChatPage

ANSWER = (
    "Here is **bold** text, a list and some code:\n\n"
    "- one\n- two\n\n"
    "```python\nprint('hello')\n```\n\n"
    "<img src=x onerror=\"document.title='img ran'\">"
    "<script>document.title='script ran'</script>"
    "[a link](javascript:void(document.title='link ran'))\n"
)
TITLE = "Chatbot"  # the page's own title: anything else means injected code ran


def _sse(event: str, data: dict[str, Any]) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


def scripted_api(node_modules: Path | None) -> FastAPI:
    """The page, and just enough of the API for one conversation and one answer."""
    app = FastAPI()
    now = datetime.now(UTC).isoformat()
    conversation = {
        "id": "conv_1",
        "title": "Formatting",
        "agent": "auto",
        "created_at": now,
        "updated_at": now,
    }

    @app.get("/v1/conversations")
    async def conversations() -> dict[str, Any]:
        return {"data": [conversation], "has_more": False}

    @app.get("/v1/conversations/conv_1/messages")
    async def messages() -> dict[str, Any]:
        return {"data": []}

    @app.post("/v1/conversations/conv_1/messages")
    async def answer() -> StreamingResponse:
        async def events() -> AsyncIterator[str]:
            yield _sse("message.start", {"conversation_id": "conv_1", "message_id": "msg_1"})
            for start in range(0, len(ANSWER), 7):
                yield _sse("token", {"delta": ANSWER[start : start + 7]})
            usage = {"prompt_tokens": 200, "cached_tokens": 150, "completion_tokens": 60}
            end: dict[str, Any] = {"message_id": "msg_1", "status": "complete"}
            end |= {"content": ANSWER}
            end |= {"usage": usage, "timing": {"ttft_ms": 12.4}, "agent": "assistant"}
            yield _sse("message.end", end)

        return StreamingResponse(events(), media_type="text/event-stream")

    install_page(app, node_modules=node_modules)
    return app


def answer_in(browser: webdriver.Chrome, url: str) -> tuple[ChatPage, Any]:
    """Opens the page (no key: the stand-in asks for none) and sends one message."""
    page = ChatPage(browser, url)
    page.open()
    page.wait().until(lambda _: page.current_id == "conv_1")
    assert not page.key_dialog_open()
    answer = page.send("Show me some formatting.")
    assert page.wait_until_ended(answer, timeout=UI_TIMEOUT) == "complete"
    return page, answer


@pytest.fixture
def page_with_libraries() -> Iterator[str]:
    yield from serve_in_thread(scripted_api(None))


@pytest.fixture
def page_without_libraries(tmp_path: Path) -> Iterator[str]:
    yield from serve_in_thread(scripted_api(tmp_path / "node_modules"))


def test_answers_are_rendered_as_sanitised_markdown(
    browser: webdriver.Chrome, page_with_libraries: str
) -> None:
    page, answer = answer_in(browser, page_with_libraries)
    body = answer.find_element("css selector", ".message-body")
    assert body.find_element("css selector", "strong").text == "bold"
    assert len(body.find_elements("css selector", "ul li")) == 2
    code = body.find_element("css selector", "pre code")
    assert code.text == "print('hello')"
    assert "language-python" in (code.get_attribute("class") or "")

    assert not body.find_elements("css selector", "script, [onerror]")
    for link in body.find_elements("css selector", "a"):
        assert not (link.get_attribute("href") or "").startswith("javascript:")
    assert browser.title == TITLE

    badge = page.badge(answer)
    assert (badge.ttft_ms, badge.cached_percent, badge.agent) == (12, 75.0, "assistant")
    # Chrome reports the hostile onerror as blocked already when the sanitiser parses the
    # answer (in a document of its own, before removing the attribute): the policy is the
    # second line of defence. The page's own files cause no report.
    violations = page.policy_violations()
    assert all("purify.es.mjs" in v and "inline event handler" in v for v in violations)


def test_without_the_libraries_answers_are_plain_text(
    browser: webdriver.Chrome, page_without_libraries: str
) -> None:
    page, answer = answer_in(browser, page_without_libraries)
    body = answer.find_element("css selector", ".message-body")
    assert "plain" in (body.get_attribute("class") or "")
    assert page.text(answer) == ANSWER
    assert not body.find_elements("css selector", "*"), "text only, no elements"
    assert browser.title == TITLE
    assert not page.policy_violations()
