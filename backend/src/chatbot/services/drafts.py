"""Drafts: what a user is writing, read by the engine before they send it.

The path of one draft::

    api/routes/conversations.py   put_draft: DraftService.put
    services/drafts.py            authorises it as a message, checks the limits, and lays
                                  out the prompt the message would have with the turn
                                  graph's own steps (TurnGraph.next_turn)
    engines/                      Engine.prefill_draft returns at once and reads the prompt
                                  at the lowest priority; the message's usual prefix lookup
                                  then finds what it read (Usage.draft_tokens)

Nothing is stored: no message, no checkpoint, no history. A draft costs compute, so each
counts against its user's token budget (``TokenBudget``), a user's drafts are held in a few
conversations at most (``CHATBOT_MAX_DRAFTS_PER_USER``: one more drops the oldest), and a
conversation has one at most: a newer draft replaces it, and the message itself ends it.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from chatbot.agents.graph import CHARS_PER_TOKEN, TurnGraph
from chatbot.config import Settings
from chatbot.engines.base import DraftStatus
from chatbot.models.domain import AUTO, AgentName, DraftSkipReason, DraftState
from chatbot.models.errors import PayloadTooLarge
from chatbot.observability.metrics import Metrics
from chatbot.persistence.index import ConversationIndex
from chatbot.services.generation import GenerationService
from chatbot.services.limits import TokenBudget

FIRST_DRAFT_TOKENS = 32
"""Added to a conversation's first draft's estimate: the agent's instruction line and the
turn's markers, read with it."""

HELD_S = 600.0
"""A draft not replaced, sent or dropped for this long is no longer counted as held: the
engine has long evicted it, or will at its turn."""


def check_message_size(content: str, settings: Settings) -> None:
    """413 for a message, or a draft, longer than ``CHATBOT_MAX_MESSAGE_CHARS``."""
    if len(content) > settings.max_message_chars:
        raise PayloadTooLarge(
            f"the message has {len(content)} characters; the limit is {settings.max_message_chars}",
            code="message_too_large",
        )


@dataclass(frozen=True, slots=True)
class DraftOutcome:
    status: DraftState
    reason: DraftSkipReason | None = None
    agent: AgentName | None = None


@dataclass(frozen=True, slots=True)
class HeldDraft:
    """A draft the engine was given: enough of its text to tell whether the next one only
    adds to it (its length and the digest of its characters), and when it came."""

    length: int
    digest: bytes
    at: float

    @classmethod
    def of(cls, content: str, at: float) -> HeldDraft:
        return cls(len(content), _digest(content), at)


def _digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode(), digest_size=16).digest()


def estimated_tokens(previous: HeldDraft | None, content: str) -> int:
    """What reading ``content`` will compute, rather over- than under-counted: the text
    added to the previous draft, or, when it does not extend that one, all of it."""
    if previous is None:
        return math.ceil(len(content) / CHARS_PER_TOKEN) + FIRST_DRAFT_TOKENS
    added = len(content)
    if added >= previous.length and _digest(content[: previous.length]) == previous.digest:
        added -= previous.length
    # The token the previous draft ended in is read again (typing may have extended it).
    return math.ceil(added / CHARS_PER_TOKEN) + 1


class DraftService:
    def __init__(
        self,
        store: ConversationIndex,
        graph: TurnGraph,
        generations: GenerationService,
        budget: TokenBudget,
        metrics: Metrics,
        settings: Settings,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._graph = graph
        self._generations = generations
        self._budget = budget
        self._metrics = metrics
        self._settings = settings
        self._clock = clock
        self._sampling = generations.sampling()  # a draft samples nothing; requests need one
        self._held: dict[str, dict[str, HeldDraft]] = {}
        """Each user's drafts the engine was given, by conversation, oldest first."""
        self._serial = 0
        self._newest: dict[str, int] = {}
        """The serial of each conversation's newest draft in flight; a message sent or a
        draft dropped meanwhile moves it on."""
        self._in_flight: Counter[str] = Counter()
        self._next_sweep = clock() + HELD_S

    async def put(self, user_id: str, conversation_id: str, content: str) -> DraftOutcome:
        """Hand the prompt that a message with ``content`` would have to the engine, or say
        why not. Returns without waiting for the model; raises as a message would (404,
        413)."""
        check_message_size(content, self._settings)
        conversation = await self._store.get(user_id, conversation_id)
        self._metrics.drafts_received.inc()
        if not self._settings.drafts:
            return self._skipped(DraftSkipReason.DISABLED)
        with self._ticket(conversation.id) as newest:
            state = await self._graph.state(conversation.id)
            if state.get("pending") is not None:
                return self._skipped(DraftSkipReason.TURN_IN_PROGRESS)
            pinned = None if conversation.agent == AUTO else AgentName(conversation.agent)
            turn = self._graph.next_turn(state, content, pinned)
            if turn is None:
                return self._skipped(DraftSkipReason.COMPACTION)
            agent = turn.route.agent
            tokens = estimated_tokens(self._held_by(user_id).get(conversation.id), content)
            if not newest():
                return self._skipped(DraftSkipReason.SUPERSEDED, agent)
            if not self._budget.try_charge(user_id, tokens):
                return self._skipped(DraftSkipReason.TOKEN_BUDGET, agent)
            # The slot is taken before anything is awaited, so that drafts arriving together
            # in other conversations count it: the user's oldest beyond the cap is dropped
            # before this one is handed over, and the engine never holds more.
            held = self._held.setdefault(user_id, {})
            held.pop(conversation.id, None)
            mine = held[conversation.id] = HeldDraft.of(content, self._clock())
            evicted = list(held)[: max(0, len(held) - self._settings.max_drafts_per_user)]
            for oldest in evicted:
                del held[oldest]
            for oldest in evicted:
                await self._generations.engine.drop_draft(oldest)
            status = DraftStatus.SKIPPED
            if newest():  # no message came while the oldest were dropped
                request = self._generations.request(
                    turn.prompt, self._sampling, user_id=user_id, session=conversation.id
                )
                status = await self._generations.engine.prefill_draft(request)
            if status is DraftStatus.PREFILLING:
                return DraftOutcome(DraftState.PREFILLING, agent=agent)
            self._budget.charge(user_id, -tokens)
            if held.get(conversation.id) is mine:
                del held[conversation.id]
            self._forget_user_if_idle(user_id)
            if not newest():
                return self._skipped(DraftSkipReason.SUPERSEDED, agent)
            reason = (
                DraftSkipReason.ENGINE_BUSY
                if status is DraftStatus.SKIPPED
                else DraftSkipReason.UNSUPPORTED
            )
            return self._skipped(reason, agent)

    async def delete(self, user_id: str, conversation_id: str) -> None:
        """Drop the conversation's draft (404 for someone else's conversation)."""
        conversation = await self._store.get(user_id, conversation_id)
        await self.drop(user_id, conversation.id)

    async def drop(self, user_id: str, conversation_id: str) -> None:
        """Stop reading the conversation's draft: deleted, or dropped by its user."""
        self.message_sent(user_id, conversation_id)
        await self._generations.engine.drop_draft(conversation_id)

    def message_sent(self, user_id: str, conversation_id: str) -> None:
        """The message has come: the engine continues from its draft (the usual prefix
        lookup), and a draft still on its way to the engine is no longer wanted."""
        if conversation_id in self._newest:
            self._serial += 1
            self._newest[conversation_id] = self._serial
        self._held.get(user_id, {}).pop(conversation_id, None)
        self._forget_user_if_idle(user_id)

    @contextmanager
    def _ticket(self, conversation_id: str) -> Iterator[Callable[[], bool]]:
        """Yields a check: whether this is still the conversation's newest draft, with no
        message or drop since it came (its prompt would then be out of date)."""
        self._serial += 1
        mine = self._serial
        self._newest[conversation_id] = mine
        self._in_flight[conversation_id] += 1
        try:
            yield lambda: self._newest.get(conversation_id) == mine
        finally:
            self._in_flight[conversation_id] -= 1
            if not self._in_flight[conversation_id]:
                del self._in_flight[conversation_id]
                del self._newest[conversation_id]

    def _held_by(self, user_id: str) -> dict[str, HeldDraft]:
        now = self._clock()
        if now >= self._next_sweep:
            for user in list(self._held):
                drafts = self._held[user]
                for conversation_id in [c for c, h in drafts.items() if now - h.at > HELD_S]:
                    del drafts[conversation_id]
                self._forget_user_if_idle(user)
            self._next_sweep = now + HELD_S
        return self._held.get(user_id, {})

    def _forget_user_if_idle(self, user_id: str) -> None:
        if not self._held.get(user_id, True):
            del self._held[user_id]

    def _skipped(self, reason: DraftSkipReason, agent: AgentName | None = None) -> DraftOutcome:
        self._metrics.drafts_skipped.labels(reason.value).inc()
        return DraftOutcome(DraftState.SKIPPED, reason=reason, agent=agent)
