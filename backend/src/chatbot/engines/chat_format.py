"""How a chat is laid out as text for a base model, by the embedded engine and by vLLM.

Gemma 3 270M is a base model: it ignores Gemma's chat tokens but continues a plain
``User:``/``Assistant:`` transcript well once a few example exchanges show it how. The
prompt is a list of segments tokenized one by one, so that the prompt of turn k+1 starts
with exactly the tokens of turn k's prompt: a message renders to the same tokens whatever
follows it, which is what lets the KV cache of earlier turns be reused.

``deploy/vllm/transcript.jinja`` is the same layout as a chat template, for vLLM serving the
same model: it must render exactly the text of ``render`` (a unit test compares them), so
that a conversation's prefixes extend each other on both engines alike.

Content cannot forge a turn. A turn starts where a line starts with a role marker, so every
line of every message (system prompt, documents, questions, answers) that would read as one
(``user:``, `` Assistant :`` in any case, after any indentation) is quoted with ``> `` in
``_text``, the one place content enters the prompt. See research.md §2.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from chatbot.models.domain import ChatMessage

USER_PREFIX = "User:"
ASSISTANT_PREFIX = "Assistant:"
SYSTEM_PREFIX = "System:"
ROLE_WORDS = ("user", "assistant", "system")
QUOTE = "> "
"""Put before a content line that reads as a turn: it is then a quoted line of the turn
that contains it."""
TURNS = (USER_PREFIX, ASSISTANT_PREFIX, SYSTEM_PREFIX)
STOPS = tuple(f"\n{quote}{turn}" for quote in ("", QUOTE) for turn in TURNS)
"""Where the model starts a turn of its own, or copies a quoted one from its context (a base
model does): its answer ends there."""

FEW_SHOT: tuple[tuple[str, str], ...] = (
    ("Hi! Who are you?", "Hello! I am an AI assistant. How can I help you today?"),
    ("What is the capital of France?", "The capital of France is Paris."),
    (
        "Give me one tip for sleeping better.",
        "Keep a regular schedule: go to bed and wake up at the same time every day.",
    ),
    (
        "How do I reverse a list in Python?",
        "Use slicing, `items[::-1]`, for a reversed copy, or `items.reverse()` to reverse "
        "the list in place.",
    ),
    ("What is 12 times 3?", "12 times 3 is 36."),
)

DEFAULT_HEADER = (
    "The following is a conversation between a user and a helpful, concise AI assistant."
)


@dataclass(frozen=True, slots=True)
class RenderedPrompt:
    segments: list[str]
    public_segments: int
    """Leading segments made only of public material (see ``GenerationRequest``)."""


def render(
    messages: Sequence[ChatMessage], *, few_shot: bool, public_messages: int = 0
) -> RenderedPrompt:
    """The prompt as text segments; the last one leaves the assistant to speak.

    Leading system messages make the header, ahead of the few-shot examples; a system
    message later in the chat is a ``System:`` line in place. The text does not depend on
    ``public_messages`` (a chat template knows nothing of it): the header is public only if
    every leading system message is.
    """
    leading = next((i for i, m in enumerate(messages) if m.role != "system"), len(messages))
    if leading:
        header = "\n\n".join(_text(m.content) for m in messages[:leading])
    else:
        header = DEFAULT_HEADER
    segments = [header + "\n\n"]
    if few_shot:
        for question, answer in FEW_SHOT:
            segments += _exchange(question, answer)
    public_segments = len(segments) if leading <= public_messages else 0
    for i, message in enumerate(messages[leading:], start=leading):
        still_public = public_segments == len(segments) and i < public_messages
        segments += _message(message)
        if still_public:
            public_segments = len(segments)
    segments.append(ASSISTANT_PREFIX)
    return RenderedPrompt(segments, public_segments)


def prompt_tokens(
    rendered: RenderedPrompt, *, bos: int, tokenize: Callable[[str], list[int]]
) -> tuple[list[int], int]:
    """The prompt's tokens after a BOS, and how many of them are public. Segment by segment,
    so that a message gives the same tokens whatever follows it: turn k+1's prompt then
    starts with exactly turn k's tokens. ``tokenize`` must not parse special tokens."""
    tokens = [bos]
    public_tokens = 1
    for i, segment in enumerate(rendered.segments):
        tokens += tokenize(segment)
        if i < rendered.public_segments:
            public_tokens = len(tokens)
    return tokens, public_tokens


def prompt_text(rendered: RenderedPrompt) -> str:
    """The prompt's text, without the BOS token the engines put ahead of it."""
    return "".join(rendered.segments)


def reads_as_turn(line: str) -> bool:
    """Whether a line would start a turn of the transcript, to a reader or to the model:
    a role word, in any case, after any indentation, then a colon after optional blanks."""
    word = line.lstrip().lower()
    return any(
        word.startswith(role) and word[len(role) :].lstrip().startswith(":") for role in ROLE_WORDS
    )


def _text(content: str) -> str:
    """Content as the prompt shows it: line breaks as ``\\n`` and no line that starts a turn.

    Every message kind goes through here. The template does the same with the same string
    methods (``splitlines``, ``lstrip``, ``lower``), so both agree on what a line is.
    """
    return "\n".join(QUOTE + line if reads_as_turn(line) else line for line in content.splitlines())


def _message(message: ChatMessage) -> list[str]:
    content = f" {_text(message.content.strip())}\n"
    if message.role == "system":
        return [SYSTEM_PREFIX, content]
    if message.role == "user":
        return [USER_PREFIX, content]
    return [ASSISTANT_PREFIX, content + "\n"]


def _exchange(question: str, answer: str) -> list[str]:
    return [USER_PREFIX, f" {question}\n", ASSISTANT_PREFIX, f" {answer}\n\n"]
