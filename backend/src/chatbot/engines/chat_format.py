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

Invisible characters (Unicode's whole ``Cf`` category: zero-width space and joiners, BOM,
soft hyphen, bidirectional marks, tag characters...) are dropped where a line starts, in what
the model reads only: ``"\u200bAssistant:"`` tokenizes as a turn would, and at the start of
a line they carry no meaning. They are stripped rather than refused because right-to-left
text legitimately opens lines with direction marks. The stored messages keep them.
"""

from __future__ import annotations

import re
import threading
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Protocol

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
model does): its answer ends there. These exact strings are what a model server is handed;
the engines' own scanners stop at any line that ``turn_line`` reads as a turn (any case,
quoted or not, after blanks and invisible characters), of which these are the usual forms."""

INVISIBLE = (
    "\u00ad\u0600-\u0605\u061c\u06dd\u070f\u0890\u0891\u08e2\u180e\u200b-\u200f"
    "\u202a-\u202e\u2060-\u2064\u2066-\u206f\ufeff\ufff9-\ufffb\U000110bd\U000110cd"
    "\U00013430-\U00013438\U0001bca0-\U0001bca3\U0001d173-\U0001d17a\U000e0001"
    "\U000e0020-\U000e007f"
)
"""Unicode's format characters (category Cf, Unicode 14 as Python 3.11 has it), as the
ranges of a regular-expression class; ``INVISIBLE_CHARS`` lists them one by one."""
INVISIBLE_CHARS = "".join(
    chr(c)
    for part in re.findall(r"(.)(?:-(.))?", INVISIBLE, flags=re.DOTALL)
    for c in range(ord(part[0]), ord(part[1] or part[0]) + 1)
)
LINE_BREAKS = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"
"""What ``str.splitlines`` ends a line at: a model's answer is read back through it."""

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
    markup: frozenset[int] = frozenset()
    """Segments that are a chat template's own text, whose special tokens (``<|im_start|>``)
    are parsed as such; every other segment is content, tokenized as plain text."""
    bos: bool = True
    """The BOS token goes ahead of the text (a chat template may write it itself)."""


class Tokenize(Protocol):
    def __call__(self, text: str, *, special: bool = False) -> list[int]: ...


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


def up_to_the_answer(rendered: RenderedPrompt) -> RenderedPrompt:
    """The prompt without its last segment, which opens the assistant's turn (every prompt
    format ends so): what a draft of the message reads. The message's own prompt then
    extends it token for token, the segments being tokenized one by one."""
    last = len(rendered.segments) - 1
    return replace(
        rendered,
        segments=rendered.segments[:last],
        public_segments=min(rendered.public_segments, last),
        markup=rendered.markup - {last},
    )


def prompt_tokens(
    rendered: RenderedPrompt, *, bos: int, tokenize: Tokenize
) -> tuple[list[int], int]:
    """The prompt's tokens (after a BOS where it has one), and how many of them are public.
    Segment by segment, so that a message gives the same tokens whatever follows it: turn
    k+1's prompt then starts with exactly turn k's tokens. Special tokens are parsed in the
    markup segments only: content that spells one (``<|im_start|>``) stays text."""
    tokens = [bos] if rendered.bos else []
    public_tokens = len(tokens)
    for i, segment in enumerate(rendered.segments):
        tokens += tokenize(segment, special=i in rendered.markup)
        if i < rendered.public_segments:
            public_tokens = len(tokens)
    return tokens, public_tokens


class SegmentTokens:
    """A ``Tokenize`` that remembers each segment's tokens, least recently used out first,
    up to ``max_chars`` characters of segments in all; thread-safe.

    Prompts are tokenized segment by segment (``prompt_tokens``), so a segment's tokens never
    depend on its neighbours, and most of a request's segments were seen before: the
    server's preamble in every request, and every earlier message in each request of a
    stateless client (OpenAI's API sends the whole conversation) and in each draft of a
    message. Tokenizing them again cost 2.7 ms for a 1,000-token prompt (2-core machine),
    4.8 ms of a follow-up's 71 ms to its first token in a running server."""

    def __init__(self, tokenize: Tokenize, *, max_chars: int = 4_000_000) -> None:
        self._tokenize = tokenize
        self._max_chars = max_chars
        self._chars = 0
        self._tokens: OrderedDict[tuple[bool, str], array[int]] = OrderedDict()
        self._lock = threading.Lock()

    def __call__(self, text: str, *, special: bool = False) -> list[int]:
        key = (special, text)
        with self._lock:
            known = self._tokens.get(key)
            if known is not None:
                self._tokens.move_to_end(key)
                return known.tolist()
        tokens = self._tokenize(text, special=special)
        if len(text) > self._max_chars // 4:
            return tokens  # one huge segment would push out most of the others
        with self._lock:
            if key not in self._tokens:
                self._tokens[key] = array("i", tokens)
                self._chars += len(text)
                while self._chars > self._max_chars:
                    (_, old), _ = self._tokens.popitem(last=False)
                    self._chars -= len(old)
        return tokens


def prompt_text(rendered: RenderedPrompt) -> str:
    """The prompt's text, without a BOS token the engines put ahead of it."""
    return "".join(rendered.segments)


def reads_as_turn(line: str) -> bool:
    """Whether a line would start a turn of the transcript, to a reader or to the model:
    a role word, in any case, after any indentation and invisible characters, then a colon
    after optional blanks."""
    word = visible_line(line).lstrip().lower()
    return any(
        word.startswith(role) and word[len(role) :].lstrip().startswith(":") for role in ROLE_WORDS
    )


def visible_line(line: str) -> str:
    """The line without the invisible characters among its leading blanks."""
    start = 0
    while start < len(line) and (line[start].isspace() or line[start] in INVISIBLE_CHARS):
        start += 1
    lead = "".join(c for c in line[:start] if c not in INVISIBLE_CHARS)
    return lead + line[start:]


def turn_line(line: str) -> bool | None:
    """Whether a line the model is writing starts a turn: True when it does, None while
    what has arrived of it could still become one, False once it cannot.

    Wider than ``reads_as_turn``: it also takes a quoted turn (``> User:``, which a base
    model copies from quoted lines of its context) and ignores a line break in ``line``'s
    tail (the line ends there), so that it can be asked before the line is complete."""
    head = line
    for i, c in enumerate(line):
        if c in LINE_BREAKS:
            head = line[:i]
            break
    complete = head != line
    i = 0
    while i < len(head) and (head[i].isspace() or head[i] in INVISIBLE_CHARS or head[i] == ">"):
        i += 1
    word = head[i:].lower()
    for role in ROLE_WORDS:
        if word.startswith(role):
            rest = word[len(role) :].lstrip(" \t")
            if rest.startswith(":"):
                return True
            if not rest and not complete:
                return None
        elif role.startswith(word) and not complete:
            return None
    return False


def _text(content: str) -> str:
    """Content as the prompt shows it: line breaks as ``\\n``, no invisible character
    among a line's leading blanks, and no line that starts a turn.

    Every message kind goes through here. The template does the same with the same string
    methods (``splitlines``, ``isspace``, ``lstrip``, ``lower``), so both agree on what a
    line is.
    """
    lines = (visible_line(line) for line in content.splitlines())
    return "\n".join(QUOTE + line if reads_as_turn(line) else line for line in lines)


def _message(message: ChatMessage) -> list[str]:
    content = f" {_text(message.content.strip())}\n"
    if message.role == "system":
        return [SYSTEM_PREFIX, content]
    if message.role == "user":
        return [USER_PREFIX, content]
    return [ASSISTANT_PREFIX, content + "\n"]


def _exchange(question: str, answer: str) -> list[str]:
    return [USER_PREFIX, f" {question}\n", ASSISTANT_PREFIX, f" {answer}\n\n"]
