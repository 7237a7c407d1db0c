"""The chat page as a test drives it: what a user clicks and types, and what they see."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
from selenium.webdriver.chrome.webdriver import WebDriver
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.wait import WebDriverWait

# Generous: the real model shares two cores with everything else a test run does.
UI_TIMEOUT = 30.0
ANSWER_TIMEOUT = 240.0

_SHARE = re.compile(r"cached (\d+(?:\.\d+)?)%")
_DRAFT = re.compile(r"draft (\d+(?:\.\d+)?)%")
_TTFT = re.compile(r"TTFT (\d+) ms")

# Records, at every change of the message list, the status and the text length of the last
# answer: the test reads them after the answer ended to tell whether text was shown while it
# was still being written, however fast that went.
_WATCH_ANSWERS = """
window.answerSnapshots = [];
new MutationObserver(() => {
  const answers = document.querySelectorAll("#messages .message.assistant");
  const last = answers[answers.length - 1];
  if (!last) return;
  const length = last.querySelector(".message-body").textContent.length;
  window.answerSnapshots.push([answers.length, last.dataset.status, length]);
}).observe(document.getElementById("messages"),
  {subtree: true, childList: true, characterData: true, attributes: true});
"""


@dataclass(frozen=True)
class Badge:
    ttft_ms: int
    cached_percent: float
    agent: str
    draft_percent: float = 0.0
    """The share of the prompt read while the user was writing; 0 when none was."""


class ChatPage:
    def __init__(self, driver: WebDriver, url: str) -> None:
        self.driver = driver
        self.url = url

    def wait(self, timeout: float = UI_TIMEOUT) -> WebDriverWait[WebDriver]:
        return WebDriverWait(
            self.driver,
            timeout,
            poll_frequency=0.1,
            ignored_exceptions=(NoSuchElementException, StaleElementReferenceException),
        )

    def find(self, css: str) -> WebElement:
        return self.driver.find_element(By.CSS_SELECTOR, css)

    def find_all(self, css: str) -> list[WebElement]:
        return self.driver.find_elements(By.CSS_SELECTOR, css)

    def js(self, script: str, *args: object) -> Any:
        return self.driver.execute_script(script, *args)

    # --- opening, and the key

    def open(self) -> None:
        self.driver.get(f"{self.url}/")
        # The module has run once the theme is set on <html>.
        self.wait().until(lambda _: self.theme in ("light", "dark"))

    def enter_key(self, key: str) -> None:
        """Answers the key dialog that a 401 opened."""
        dialog = self.wait().until(ec.visibility_of_element_located((By.ID, "key-dialog")))
        field = dialog.find_element(By.ID, "key-input")
        field.send_keys(key)
        dialog.find_element(By.ID, "key-save").click()
        self.wait().until(ec.invisibility_of_element_located((By.ID, "key-dialog")))

    def key_dialog_open(self) -> bool:
        return bool(self.js("return document.getElementById('key-dialog').open"))

    # --- conversations

    # The list is drawn anew after each change: read it in one go, not element by element.
    def conversation_ids(self) -> list[str]:
        script = "return [...document.querySelectorAll('#conversation-list button')]"
        return [str(i) for i in self.js(f"{script}.map((b) => b.dataset.id)")]

    def conversation_titles(self) -> list[str]:
        script = "return [...document.querySelectorAll('#conversation-list button')]"
        return [str(t) for t in self.js(f"{script}.map((b) => b.textContent)")]

    @property
    def current_id(self) -> str | None:
        selected = self.js(
            "const b = document.querySelector(\"#conversation-list button[aria-current='true']\");"
            "return b ? b.dataset.id : null;"
        )
        return str(selected) if selected is not None else None

    @property
    def header_title(self) -> str:
        return self.find("#conversation-title").text

    def new_conversation(self) -> str:
        """Clicks "New conversation"; returns its id once it is listed, first, and open."""
        before = set(self.conversation_ids())
        self.find("#new-conversation").click()
        self.wait().until(lambda _: self.current_id is not None and self.current_id not in before)
        conversation = self.current_id
        assert conversation is not None
        assert self.conversation_ids()[0] == conversation, "the newest is listed first"
        return conversation

    def rename(self, title: str) -> None:
        self.find("#rename-conversation").click()
        dialog = self.wait().until(ec.visibility_of_element_located((By.ID, "rename-dialog")))
        field = dialog.find_element(By.ID, "rename-input")
        field.clear()
        field.send_keys(title)
        dialog.find_element(By.ID, "rename-save").click()
        self.wait().until(lambda _: self.header_title == title)

    def delete(self) -> None:
        self.find("#delete-conversation").click()
        dialog = self.wait().until(ec.visibility_of_element_located((By.ID, "delete-dialog")))
        dialog.find_element(By.ID, "delete-confirm").click()
        self.wait().until(lambda _: self.current_id is None)

    # --- messages

    def answers(self) -> list[WebElement]:
        return self.find_all("#messages .message.assistant")

    def watch_answers(self) -> None:
        self.js(_WATCH_ANSWERS)

    def answer_snapshots(self) -> list[tuple[int, str, int]]:
        return [tuple(s) for s in self.js("return window.answerSnapshots")]

    def attach(self, path: Path) -> None:
        """Chooses a file in the Attach dialog; returns once the page lists it."""
        self.find("#attach-input").send_keys(str(path))
        self.wait().until(lambda _: path.name in self.attachment_names())

    def attachment_names(self) -> list[str]:
        script = "return [...document.querySelectorAll('#attachments .attachment-name')]"
        return [str(n) for n in self.js(f"{script}.map((n) => n.textContent)")]

    def type_and_enter(self, text: str) -> None:
        """Types the message (Shift+Enter between its lines), then sends it with Enter."""
        field = self.find("#message-input")
        lines = text.split("\n")
        for i, line in enumerate(lines):
            if i:
                field.send_keys(Keys.SHIFT, Keys.ENTER)
            field.send_keys(line)
        field.send_keys(Keys.ENTER)

    def send(self, text: str) -> WebElement:
        """Sends a message; returns its answer's element once it is shown (empty at first)."""
        count = len(self.answers())
        self.type_and_enter(text)
        self.wait().until(lambda _: len(self.answers()) == count + 1)
        return self.answers()[-1]

    def status(self, answer: WebElement) -> str:
        return answer.get_attribute("data-status") or ""

    def wait_until_ended(self, answer: WebElement, timeout: float = ANSWER_TIMEOUT) -> str:
        ongoing = ("waiting", "streaming")
        self.wait(timeout).until(lambda _: self.status(answer) not in ongoing)
        return self.status(answer)

    def text(self, answer: WebElement) -> str:
        return str(
            self.js("return arguments[0].querySelector('.message-body').textContent", answer)
        )

    def badge(self, answer: WebElement) -> Badge:
        text = answer.find_element(By.CSS_SELECTOR, ".badge").text
        share, ttft = _SHARE.search(text), _TTFT.search(text)
        assert share is not None, text
        assert ttft is not None, text
        drafted = _DRAFT.search(text)
        return Badge(
            ttft_ms=int(ttft.group(1)),
            cached_percent=float(share.group(1)),
            agent=text.rsplit("·", 1)[-1].strip(),
            draft_percent=float(drafted.group(1)) if drafted else 0.0,
        )

    # --- theme, and what the browser said

    @property
    def theme(self) -> str:
        return str(self.js("return document.documentElement.dataset.theme || ''"))

    def toggle_theme(self) -> None:
        before = self.theme
        self.find("#theme-toggle").click()
        self.wait().until(lambda _: self.theme != before)

    def background(self) -> str:
        return str(self.js("return getComputedStyle(document.body).backgroundColor"))

    def policy_violations(self) -> list[str]:
        """Console messages about what the Content-Security-Policy blocked."""
        logs: list[dict[str, Any]] = self.driver.get_log("browser")  # type: ignore[no-untyped-call]
        return [e["message"] for e in logs if "Content Security Policy" in e["message"]]
