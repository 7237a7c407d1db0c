"""The chat page sends what the user is writing as drafts, in a real browser against the real
model: while they type, and at once when they attach a file, whose text then goes in with the
message; the answer's badge says how much of its prompt the drafts had read."""

from __future__ import annotations

from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.common.keys import Keys

from chatbot.models.domain import DraftStats
from tests.conftest import ALICE_KEY, LiveServer
from tests.e2e.chat_page import ChatPage
from tests.e2e.test_chat_page import api, open_with_key
from tests.waiting import wait_until

NOTES = (
    "# My vegetable garden\n\n"
    "The beds by the fence get sun all afternoon: tomatoes, courgettes and two rows of "
    "runner beans grow there. The shady bed under the pear tree holds lettuce, spinach and "
    "a clump of mint that spreads every year. Carrots and beetroot share the raised bed by "
    "the shed, and the onions went into the old bathtub. Last spring the slugs ate half of "
    "the lettuce, so this year there is a ring of crushed eggshells round each plant.\n"
)
TYPED = "Which of these"
REST = " vegetables would you pick first for a summer salad?"


def prefilled(live_server: LiveServer) -> int:
    stats = live_server.state.engine.draft_stats()
    assert isinstance(stats, DraftStats)
    return stats.prefilled


@pytest.mark.timeout(900)
def test_drafts_go_while_typing_and_attaching_and_the_badge_shows_what_they_read(
    browser: webdriver.Chrome, idle_live_server: LiveServer, tmp_path: Path
) -> None:
    page: ChatPage = open_with_key(browser, idle_live_server.url, ALICE_KEY)
    conversation = page.new_conversation()
    # A first turn: the conversation then holds the engine's sequence, where drafts are read.
    first = page.send("Hello! I keep a small garden.")
    assert page.wait_until_ended(first) == "complete"

    field = page.find("#message-input")
    read = prefilled(idle_live_server)
    field.send_keys(TYPED)  # three words, then a pause: a draft
    wait_until(lambda: prefilled(idle_live_server) > read, timeout=60)

    notes = tmp_path / "notes.md"
    notes.write_text(NOTES)
    read = prefilled(idle_live_server)
    page.attach(notes)  # a draft at once, the file's text and what is typed
    wait_until(lambda: prefilled(idle_live_server) > read, timeout=120)

    count = len(page.answers())
    field.send_keys(REST, Keys.ENTER)
    page.wait().until(lambda _: len(page.answers()) == count + 1)
    answer = page.answers()[-1]
    assert page.wait_until_ended(answer) == "complete"
    assert page.attachment_names() == [], "the files went with the message"

    with api(idle_live_server.url, ALICE_KEY) as client:
        stored = client.get(f"/v1/conversations/{conversation}/messages").json()["data"]
    question, reply = stored[-2:]
    assert question["content"] == f"Attached file notes.md:\n\n{NOTES.strip()}\n\n{TYPED}{REST}"
    usage = reply["usage"]
    # The drafts read the file and the start of the question before Enter: the badge says
    # how much of the prompt that was, as the server counted it.
    assert usage["draft_tokens"] > len(NOTES) // 8, usage
    badge = page.badge(answer)
    share = 100 * usage["draft_tokens"] / usage["prompt_tokens"]
    assert abs(badge.draft_percent - share) <= 0.051, (badge, usage)
    assert badge.draft_percent <= badge.cached_percent
    assert not page.policy_violations()
