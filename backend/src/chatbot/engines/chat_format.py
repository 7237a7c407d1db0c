"""How the embedded engine lays a chat out as text for a base model.

Gemma 3 270M is a base model: it ignores Gemma's chat tokens but continues a plain
``User:``/``Assistant:`` transcript well once a few example exchanges show it how. The
prompt is a list of segments tokenized one by one, so that the prompt of turn k+1 starts
with exactly the tokens of turn k's prompt: a message renders to the same tokens whatever
follows it, which is what lets the KV cache of earlier turns be reused.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from chatbot.models.domain import ChatMessage

USER_PREFIX = "User:"
ASSISTANT_PREFIX = "Assistant:"
SYSTEM_PREFIX = "System:"
STOPS = ("\nUser:", "\nAssistant:", "\nSystem:")

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
    message later in the chat (an agent's instruction) is a ``System:`` line in place.
    """
    leading = next((i for i, m in enumerate(messages) if m.role != "system"), len(messages))
    public_leading = min(leading, public_messages)
    # The header is public if it is made of public messages only; a client's own system
    # prompt, which is not, then makes the whole header.
    head = public_leading if public_leading else leading
    header = "\n\n".join(m.content for m in messages[:head]) if head else DEFAULT_HEADER
    segments = [header + "\n\n"]
    if few_shot:
        for question, answer in FEW_SHOT:
            segments += _exchange(question, answer)
    public_segments = len(segments) if head == public_leading else 0
    for i, message in enumerate(messages[head:], start=head):
        still_public = public_segments == len(segments) and i < public_messages
        segments += _message(message)
        if still_public:
            public_segments = len(segments)
    segments.append(ASSISTANT_PREFIX)
    return RenderedPrompt(segments, public_segments)


def _message(message: ChatMessage) -> list[str]:
    if message.role == "system":
        return [SYSTEM_PREFIX, f" {message.content.strip()}\n"]
    if message.role == "user":
        return [USER_PREFIX, f" {message.content.strip()}\n"]
    return [ASSISTANT_PREFIX, f" {message.content.strip()}\n\n"]


def _exchange(question: str, answer: str) -> list[str]:
    return [USER_PREFIX, f" {question}\n", ASSISTANT_PREFIX, f" {answer}\n\n"]
