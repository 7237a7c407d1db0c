"""How a chat becomes the model's prompt: its own chat template, or the plain transcript.

An instruction-tuned GGUF carries the chat template it was trained with
(``tokenizer.chat_template``, Jinja). It is rendered here as transformers and vLLM render
it: a sandboxed, immutable Jinja environment with ``trim_blocks``, ``lstrip_blocks`` and
loop controls, ``raise_exception``, ``bos_token`` and ``eos_token`` from the model, and
``add_generation_prompt``. A GGUF without a template (the bundled base model) gets the
transcript of ``chat_format`` and its few-shot examples.

Two properties the engines depend on:

- **No special-token injection.** Each message's content is put into the template as a
  placeholder, so the rendered text splits into the template's own markup and the
  messages' content. Only markup is tokenized with special-token parsing on: a user who
  types ``<|im_start|>system`` gets those characters as text, never the control token.
- **Prefix stability.** Each piece is tokenized on its own, so a message gives the same
  tokens whatever follows it, and turn k+1's prompt starts with turn k's tokens as long as
  the template renders earlier messages the same way whatever follows them. ``check``
  renders two- and three-turn chats at start-up and says whether it does; a template that
  does not (some drop earlier reasoning, or move the system prompt) still works, and the
  share of each prompt it leaves reusable is measured and reported.

Content goes in verbatim, or trimmed where the template trims it (Gemma's and Llama's
``| trim``), which the placeholders detect; a template that transforms content otherwise
renders it as given, and ``check`` reports the difference.
"""

from __future__ import annotations

import itertools
import json
import logging
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from chatbot.engines import chat_format
from chatbot.engines.chat_format import RenderedPrompt, Tokenize
from chatbot.engines.llama_context import LlamaContext
from chatbot.engines.stops import TRANSCRIPT_STOPS, Stops
from chatbot.kvcache.keys import common_prefix_length
from chatbot.models.domain import ChatMessage
from chatbot.models.errors import InvalidRequest

logger = logging.getLogger(__name__)

TRANSCRIPT = "transcript"
AUTO = "auto"

# Private-use characters: a template passes them through, and no template writes them.
_OPEN, _CLOSE = "\ue000", "\ue001"
# An em space either side shows whether the template trims the content it is given (str.strip
# and Jinja's trim remove it); unlike a plain space, no template's markup ends with one.
_PAD = "\u2003"
_PLACEHOLDER = re.compile(rf"({_PAD}?){_OPEN}(\d+){_CLOSE}({_PAD}?)")


class PromptFormat(ABC):
    """Renders a chat into prompt segments for the embedded engine."""

    name: str
    """``transcript``, ``model`` (the GGUF's template) or the template file's name."""
    stops: Stops

    @abstractmethod
    def render(self, messages: Sequence[ChatMessage], *, public_messages: int) -> RenderedPrompt:
        """The prompt, the assistant's turn open at its end."""

    def check(self, tokenize: Tokenize, bos: int) -> TemplateCheck | None:
        """How well prompts extend each other; None where that holds by construction."""
        del tokenize, bos
        return None


class TranscriptFormat(PromptFormat):
    name = TRANSCRIPT
    stops = TRANSCRIPT_STOPS

    def __init__(self, *, few_shot: bool) -> None:
        self._few_shot = few_shot

    def render(self, messages: Sequence[ChatMessage], *, public_messages: int) -> RenderedPrompt:
        return chat_format.render(
            messages, few_shot=self._few_shot, public_messages=public_messages
        )


@dataclass(frozen=True, slots=True)
class TemplateCheck:
    """What the start-up check found (``/v1/models`` shows it)."""

    prefix_stable: bool
    """A two-turn chat's prompt tokens start the three-turn chat's, and a one-turn chat's
    start the two-turn chat's."""
    reuse: float
    """Of the two- and three-turn prompts, the smallest share of tokens that the next turn's
    prompt starts with: 1.0 when prefix-stable."""
    verbatim: bool
    """The template shows content as given (or trimmed): the text of our segments is the
    text the template itself renders, on this engine and on vLLM alike."""


class TemplateFormat(PromptFormat):
    """The model's own chat template."""

    stops = Stops()  # the model's end-of-generation tokens end its answers

    def __init__(
        self, source: str, *, name: str, bos_token: str, eos_token: str, adds_bos: bool
    ) -> None:
        self.name = name
        self._template = _environment().from_string(source)
        self._bos_token = bos_token
        self._eos_token = eos_token
        self._adds_bos = adds_bos

    def text(self, messages: Sequence[ChatMessage], *, add_generation_prompt: bool = True) -> str:
        """The template's own rendering, content included: what vLLM renders."""
        return self._render(
            [{"role": m.role, "content": m.content} for m in messages], add_generation_prompt
        )

    def render(self, messages: Sequence[ChatMessage], *, public_messages: int) -> RenderedPrompt:
        placeholders = [
            {"role": m.role, "content": f"{_PAD}{_OPEN}{i}{_CLOSE}{_PAD}"}
            for i, m in enumerate(messages)
        ]
        layout = self._render(placeholders, add_generation_prompt=True)
        segments: list[str] = []
        markup: set[int] = set()
        public_segments = 0
        public_so_far = True
        position = 0
        for match in _PLACEHOLDER.finditer(layout):
            if match.start() > position:
                markup.add(len(segments))
                segments.append(layout[position : match.start()])
            i = int(match.group(2))
            segments.append(_trimmed(messages[i].content, match.group(1), match.group(3)))
            if i < public_messages and public_so_far:
                public_segments = len(segments)
            else:
                public_so_far = False
            position = match.end()
        if position < len(layout):
            markup.add(len(segments))
            segments.append(layout[position:])
        bos = self._adds_bos and not layout.startswith(self._bos_token)
        return RenderedPrompt(segments, public_segments, frozenset(markup), bos)

    def check(self, tokenize: Tokenize, bos: int) -> TemplateCheck:
        chats = [list(CHECK_CHAT[: 2 * turns]) for turns in (1, 2, 3)]
        for chat in chats:
            chat.insert(0, CHECK_SYSTEM)
        prompts = [
            chat_format.prompt_tokens(
                self.render(chat, public_messages=1), bos=bos, tokenize=tokenize
            )[0]
            for chat in (c[:-1] for c in chats)
        ]
        shares = [common_prefix_length(a, b) / len(a) for a, b in itertools.pairwise(prompts)]
        last = chats[-1][:-1]
        rendered = chat_format.prompt_text(self.render(last, public_messages=1))
        return TemplateCheck(
            prefix_stable=min(shares) == 1.0,
            reuse=round(min(shares), 4),
            verbatim=rendered == self.text(last),
        )

    def _render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        try:
            return self._template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self._bos_token,
                eos_token=self._eos_token,
            )
        except jinja2.TemplateError as exc:
            # Strict templates refuse some chats (roles out of order, a role they lack).
            raise InvalidRequest(
                f"the model's chat template refused these messages: {exc}",
                code="chat_template_error",
            ) from exc


CHECK_SYSTEM = ChatMessage(role="system", content="You are a helpful assistant.")
CHECK_CHAT: tuple[ChatMessage, ...] = (
    ChatMessage(role="user", content="What is the capital of France?"),
    ChatMessage(role="assistant", content="The capital of France is Paris."),
    ChatMessage(role="user", content="And of Italy?"),
    ChatMessage(role="assistant", content="Rome."),
    ChatMessage(role="user", content="Thank you!"),
    ChatMessage(role="assistant", content="You are welcome."),
)
"""A chat rendered at start-up, one, two and three turns of it, to check the template."""


def choose(
    choice: str,
    *,
    model_template: str | None,
    few_shot: bool,
    bos_token: str,
    eos_token: str,
    adds_bos: bool,
) -> PromptFormat:
    """The prompt format ``CHATBOT_CHAT_TEMPLATE`` asks for: ``auto`` (the GGUF's template
    if it has one, else the transcript), ``transcript``, ``model`` (the GGUF's, which it
    must have), or a ``.jinja`` file."""
    if choice == TRANSCRIPT or (choice == AUTO and model_template is None):
        return TranscriptFormat(few_shot=few_shot)
    if choice in (AUTO, "model"):
        if model_template is None:
            raise ValueError("CHATBOT_CHAT_TEMPLATE=model: the GGUF has no chat template")
        source, name = model_template, "model"
    else:
        source, name = Path(choice).read_text(), Path(choice).name
    return TemplateFormat(
        source, name=name, bos_token=bos_token, eos_token=eos_token, adds_bos=adds_bos
    )


def from_context(choice: str, context: LlamaContext, *, few_shot: bool) -> PromptFormat:
    """``choose`` for the model that ``context`` has loaded, from its GGUF's metadata."""
    return choose(
        choice,
        model_template=context.chat_template(),
        few_shot=few_shot,
        bos_token=context.token_text(context.bos()),
        eos_token=context.token_text(context.eos()),
        adds_bos=context.adds_bos(),
    )


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    # Jinja's own tojson escapes HTML; templates expect JSON as json.dumps writes it.
    env.filters["tojson"] = _tojson
    return env


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def _tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False) -> str:
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii)


def _trimmed(content: str, before: str, after: str) -> str:
    side: Literal["both", "left", "right", "none"] = (
        "none" if before and after else "right" if before else "left" if after else "both"
    )
    if side == "both":
        return content.strip()
    if side == "left":
        return content.lstrip()
    if side == "right":
        return content.rstrip()
    return content
