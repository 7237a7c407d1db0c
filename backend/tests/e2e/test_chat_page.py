"""The chat page in a real browser against a real server: the key, conversations, streamed
answers with their cache badge, stopping an answer, errors in place, and the themes."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from selenium import webdriver

from tests.conftest import ALICE_KEY, BOB_KEY, CAROL_KEY, LiveServer
from tests.e2e.chat_page import UI_TIMEOUT, ChatPage
from tests.waiting import wait_until

# Words the rule router finds in no document: both turns go to the same agent, so the second
# prompt starts with the whole first one. The first message is long so that its own words,
# which nothing has cached yet, are a clear share of its prompt.
FIRST_MESSAGE = (
    "My grandmother owns a small garden behind her cottage. In spring she plants tomatoes, "
    "beans, lettuce, carrots and a row of sunflowers along the fence. In summer the bees "
    "visit the lavender each morning, and the neighbours' cat sleeps under the apple tree. "
    "In autumn she gathers the apples, dries the beans and makes jam from the blackberries "
    "that grow wild near the gate.\nWhich vegetable from her garden would you cook for dinner?"
)
SECOND_MESSAGE = "Thanks! And which fruit would you use for a pie?"


def api(url: str, key: str) -> httpx.Client:
    return httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60)


def open_with_key(browser: webdriver.Chrome, url: str, key: str) -> ChatPage:
    """Opens the page, which finds that the server wants a key and asks for one."""
    page = ChatPage(browser, url)
    page.open()
    page.enter_key(key)
    return page


@pytest.mark.timeout(900)
def test_a_conversation_streams_answers_and_reuses_the_cache(
    browser: webdriver.Chrome, idle_live_server: LiveServer, screenshots_dir: Path
) -> None:
    page = open_with_key(browser, idle_live_server.url, ALICE_KEY)
    conversation = page.new_conversation()
    page.watch_answers()

    shares: list[float] = []
    for number, message in enumerate((FIRST_MESSAGE, SECOND_MESSAGE), start=1):
        answer = page.send(message)
        assert page.find("#stop").is_displayed(), "Stop replaces Send while an answer streams"
        assert page.wait_until_ended(answer) == "complete"
        text = page.text(answer)
        assert text.strip()

        # Text was on the page while the answer was still being written, and it grew.
        snapshots = [(status, n) for count, status, n in page.answer_snapshots() if count == number]
        streaming = [n for status, n in snapshots if status == "streaming"]
        assert any(n > 0 for n in streaming), snapshots
        assert min(n for n in streaming if n > 0) < len(text), snapshots

        badge = page.badge(answer)
        assert badge.agent == "assistant"
        assert 0 < badge.ttft_ms < 60_000, badge
        shares.append(badge.cached_percent)
        assert page.find("#send").is_displayed()

    # The second prompt begins with the whole first turn, which the cache kept.
    assert shares[1] > shares[0], shares

    # The first message named the conversation, and Shift+Enter kept its line break.
    assert page.header_title.startswith("My grandmother owns a small garden")
    with api(idle_live_server.url, ALICE_KEY) as client:
        messages = client.get(f"/v1/conversations/{conversation}/messages").json()["data"]
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    assert messages[0]["content"] == FIRST_MESSAGE

    if page.theme != "light":
        page.toggle_theme()
    light = page.background()
    page.js("document.activeElement.blur()")  # no focus ring in the pictures
    assert browser.save_screenshot(str(screenshots_dir / "chat-light.png"))
    page.toggle_theme()
    assert page.theme == "dark"
    assert page.background() != light
    page.js("document.activeElement.blur()")
    assert browser.save_screenshot(str(screenshots_dir / "chat-dark.png"))

    # Switching away and back loads the stored messages, badges included.
    page.new_conversation()
    page.wait().until(lambda _: not page.answers())
    page.find(f"#conversation-list button[data-id='{conversation}']").click()
    page.wait().until(lambda _: len(page.answers()) == 2)
    assert [page.badge(a).cached_percent for a in page.answers()] == shares

    assert not page.policy_violations()


@pytest.mark.timeout(600)
def test_stop_ends_an_answer_as_cancelled(browser: webdriver.Chrome, slow_server: str) -> None:
    """On the simulated engine (see ``slow_server``): an answer of 20 s that is stopped."""
    page = open_with_key(browser, slow_server, ALICE_KEY)
    conversation = page.new_conversation()
    answer = page.send("Tell me a long story, please.")
    # A few words first (20 a second): what the page showed is then compared with what
    # the server stored, word for word.
    page.wait().until(
        lambda _: page.status(answer) == "streaming" and len(page.text(answer).split()) >= 4
    )

    page.find("#stop").click()
    assert page.wait_until_ended(answer, timeout=UI_TIMEOUT) == "cancelled"
    assert "Stopped" in answer.text
    shown = page.text(answer)
    assert shown
    assert page.find("#send").is_displayed()
    assert not page.find("#stop").is_displayed()

    # The server noticed the stream close and kept what had been written: at least what
    # the page showed (its last word may have been cut, the server may have had more).
    with api(slow_server, ALICE_KEY) as client:

        def stored() -> dict[str, str]:
            messages = client.get(f"/v1/conversations/{conversation}/messages").json()["data"]
            return messages[-1] if messages else {}

        wait_until(lambda: stored().get("status") == "cancelled", timeout=UI_TIMEOUT)
        words = shown.split()
        assert len(words) >= 4, shown
        assert stored()["content"].split()[: len(words) - 1] == words[:-1]

    assert not page.policy_violations()


@pytest.mark.timeout(300)
def test_an_error_is_shown_in_place_with_a_retry(
    browser: webdriver.Chrome, slow_server: str
) -> None:
    """A message over the server's limit (4,000 characters in the tests' settings) is
    refused before any answer starts; retrying sends it again."""
    page = open_with_key(browser, slow_server, BOB_KEY)
    page.new_conversation()
    field = page.find("#message-input")
    page.js("arguments[0].value = arguments[1]", field, "x" * 4001)
    answer = page.send("")
    assert page.wait_until_ended(answer, timeout=UI_TIMEOUT) == "failed"
    error = answer.find_element("css selector", ".message-error")
    assert "the limit is 4000" in error.text

    error.find_element("css selector", "button.retry").click()
    page.wait().until(lambda _: len(page.answers()) == 1 and page.answers()[0] != answer)
    retried = page.answers()[0]
    assert page.wait_until_ended(retried, timeout=UI_TIMEOUT) == "failed"
    assert retried.find_element("css selector", "button.retry").is_displayed()


@pytest.mark.timeout(300)
def test_conversations_are_created_renamed_and_deleted(
    browser: webdriver.Chrome, live_server: LiveServer
) -> None:
    page = open_with_key(browser, live_server.url, CAROL_KEY)
    first = page.new_conversation()
    second = page.new_conversation()
    assert page.conversation_ids()[:2] == [second, first], "newest first"

    page.rename("Holiday plans")
    page.wait().until(lambda _: page.conversation_titles()[0] == "Holiday plans")
    with api(live_server.url, CAROL_KEY) as client:
        assert client.get(f"/v1/conversations/{second}").json()["title"] == "Holiday plans"

        page.delete()
        page.wait().until(lambda _: second not in page.conversation_ids())
        assert first in page.conversation_ids()
        assert client.get(f"/v1/conversations/{second}").status_code == 404

    # The key was kept: a new visit goes straight to the list.
    page.open()
    page.wait().until(lambda _: first in page.conversation_ids())
    assert not page.key_dialog_open()
    assert not page.policy_violations()


@pytest.mark.timeout(300)
def test_the_theme_follows_the_system_until_toggled(
    browser: webdriver.Chrome, live_server: LiveServer
) -> None:
    browser.execute_cdp_cmd(
        "Emulation.setEmulatedMedia",
        {"features": [{"name": "prefers-color-scheme", "value": "dark"}]},
    )
    page = open_with_key(browser, live_server.url, CAROL_KEY)
    assert page.theme == "dark"
    dark = page.background()
    assert page.find("#theme-toggle").get_attribute("aria-pressed") == "true"

    page.toggle_theme()
    assert page.theme == "light"
    assert page.background() != dark
    # The choice outlives the visit, whatever the system prefers.
    page.open()
    assert page.theme == "light"
