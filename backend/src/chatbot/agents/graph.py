"""One conversation turn as a LangGraph ``StateGraph``::

    START → route ─┬─→ compact ─┬─→ assistant | knowledge | summarizer → END
                   └────────────┘

The conversation id is the thread id and the checkpointer holds the conversation's state.
The graph writes the turn's events (``chatbot.models.turns``) to LangGraph's custom stream:
``TurnStarted`` once the engine took the answer (or ``TurnRefused`` if it could not),
``TurnDelta`` per piece of text, then ``TurnEnded`` or ``TurnFailed`` with the answer as
stored. It generates through a ``LanguageModel`` (``agents.llm``), never through the engine
itself. A turn is stopped through its ``TurnControl``, never by cancelling the graph: the
agent node then still stores the answer as far as it got.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, cast

from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.config import get_config
from langgraph.graph import END, START, StateGraph
from langgraph.graph.state import CompiledStateGraph
from langgraph.runtime import Runtime
from langgraph.types import StreamWriter

from chatbot.agents import layout
from chatbot.agents.documents import Document, DocumentIndex
from chatbot.agents.llm import LanguageModel, report
from chatbot.agents.router import RuleRouter, parse_route, routing_prompt
from chatbot.agents.state import ConversationState, Route, Summary
from chatbot.config import RouterKind, Settings
from chatbot.engines.base import Finished, Generation, SamplingParams, TokenDelta
from chatbot.models.domain import (
    AgentName,
    ChatMessage,
    Message,
    MessageStatus,
    Usage,
    new_id,
)
from chatbot.models.errors import ChatbotError, EngineFailure
from chatbot.models.turns import TurnDelta, TurnEnded, TurnFailed, TurnRefused, TurnStarted
from chatbot.observability.metrics import Metrics

logger = logging.getLogger(__name__)

ROUTER_SAMPLING = SamplingParams(max_tokens=4, temperature=0.0, top_p=1.0, stop=("\n",))
COMPACTION_SAMPLING = SamplingParams(max_tokens=200, temperature=0.0, top_p=1.0)
CHARS_PER_TOKEN = 3
"""A low estimate, so that a new message's tokens are rather over- than under-counted."""


GraphEvent = TurnRefused | TurnStarted | TurnDelta | TurnEnded | TurnFailed


class _Node(Protocol):
    def __call__(
        self, state: ConversationState, runtime: Runtime[TurnContext]
    ) -> Awaitable[dict[str, Any]]: ...


class TurnControl:
    """Stops a turn's generation from outside the graph (the stop button, a client gone)."""

    def __init__(self) -> None:
        self._generation: Generation | None = None
        self.stopped = False

    def attach(self, generation: Generation) -> None:
        self._generation = generation

    async def stop(self) -> None:
        self.stopped = True
        if self._generation is not None:
            await self._generation.aclose()


@dataclass(frozen=True, slots=True)
class NextTurn:
    """What a message would get if it were sent now: its agent and its prompt."""

    route: Route
    prompt: layout.Prompt


@dataclass(frozen=True, slots=True)
class TurnContext:
    """What a run needs that is not conversation state (never checkpointed)."""

    user_id: str
    pinned: AgentName | None
    sampling: SamplingParams
    control: TurnControl = field(default_factory=TurnControl)
    answer_id: str = field(default_factory=lambda: new_id("msg"))


class TurnGraph:
    """The compiled graph of one turn and what its nodes share: the preamble, the router,
    the compaction threshold, the model they generate with."""

    def __init__(
        self,
        settings: Settings,
        documents: tuple[Document, ...],
        checkpointer: BaseCheckpointSaver[Any],
        metrics: Metrics,
        model: LanguageModel,
    ) -> None:
        self.documents = documents
        self.preamble = layout.preamble(settings.system_prompt, documents)
        self._index = DocumentIndex(documents)
        self._rules = RuleRouter(self._index)
        self._router = settings.router
        self._compact_share = settings.compact_at
        self._keep = settings.compact_keep_messages
        self._metrics = metrics
        self._model = model
        self.checkpointer = checkpointer
        self.graph = self._build()

    def _build(self) -> CompiledStateGraph[Any, Any, Any, Any]:
        graph = StateGraph(ConversationState, context_schema=TurnContext)
        graph.add_node("route", self._route)
        graph.add_node("compact", self._compact)
        for agent in AgentName:
            graph.add_node(agent.value, self._answerer(agent))
        graph.add_edge(START, "route")
        names = [a.value for a in AgentName]
        graph.add_conditional_edges("route", self._after_route, ["compact", *names, END])
        graph.add_conditional_edges("compact", self._after_compact, [*names, END])
        for name in names:
            graph.add_edge(name, END)
        return graph.compile(checkpointer=self.checkpointer, name="turn")

    # --- running a turn

    async def run(
        self, thread_id: str, question: Message, context: TurnContext, config: RunnableConfig
    ) -> AsyncIterator[GraphEvent]:
        config = {**config, "configurable": {"thread_id": thread_id}}
        # "sync": each step's checkpoint is stored before the next step starts, so the
        # question is durable before its answer begins to stream.
        async for event in self.graph.astream(
            {"pending": question},
            config,
            context=context,
            stream_mode="custom",
            durability="sync",
        ):
            yield cast(GraphEvent, event)

    async def state(self, thread_id: str) -> ConversationState:
        snapshot = await self.graph.aget_state({"configurable": {"thread_id": thread_id}})
        return cast(ConversationState, snapshot.values)

    async def record_interrupted(self, thread_id: str) -> Message | None:
        """A question left pending by a turn whose process died: store it with a failed,
        retryable answer. Call only while holding the conversation's turn claim."""
        state = await self.state(thread_id)
        question = state.get("pending")
        if question is None:
            return None
        route = state.get("route")
        agent = route.agent if route is not None else AgentName.ASSISTANT
        answer = Message(
            conversation_id=question.conversation_id,
            role="assistant",
            content="",
            status=MessageStatus.FAILED,
            agent=agent,
            error="interrupted",
        )
        await self.graph.aupdate_state(
            {"configurable": {"thread_id": thread_id}},
            {"messages": [question, answer], "pending": None, "compacted": False},
            as_node=agent.value,
        )
        logger.info("a turn interrupted by a stopped server was recorded as failed")
        return answer

    def next_turn(
        self, state: ConversationState, content: str, pinned: AgentName | None
    ) -> NextTurn | None:
        """The agent and prompt that a message with ``content`` would get from ``state`` (no
        turn running), laid out by the turn's own steps: the route as the rules pick it (the
        model router's pick is known only once it has answered), then the agent's prompt.
        None when a compaction would come first: the prompt then starts with a summary
        not yet written."""
        if self._needs_compaction(state, content):
            return None
        route = self._rules_route(state, content, pinned)
        return NextTurn(route=route, prompt=self._layout(route.agent, state, content))

    async def prune(self, thread_id: str) -> None:
        """Drop every checkpoint of the conversation but its latest (its state)."""
        await self.checkpointer.aprune([thread_id], strategy="keep_latest")

    async def forget(self, thread_id: str) -> None:
        await self.checkpointer.adelete_thread(thread_id)

    # --- nodes

    async def _route(
        self, state: ConversationState, runtime: Runtime[TurnContext]
    ) -> dict[str, Any]:
        question = _pending(state)
        context = runtime.context
        rules = self._rules_route(state, question.content, context.pinned)
        if context.pinned is not None or self._router is RouterKind.RULES:
            return {"route": rules}
        prompt, public = routing_prompt(question.content)
        try:
            reply = await self._complete(
                question, context, layout.Prompt(prompt, public), "router", ROUTER_SAMPLING
            )
        except ChatbotError as exc:
            runtime.stream_writer(TurnRefused(exc))
            return {"pending": None}
        agent = parse_route(reply)
        if agent is None:
            return {"route": rules.model_copy(update={"reason": f"{rules.reason} (rules)"})}
        return {"route": Route(agent=agent, reason=f"the model chose {agent.value}")}

    def _rules_route(
        self, state: ConversationState, question: str, pinned: AgentName | None
    ) -> Route:
        if pinned is not None:
            return Route(agent=pinned, reason="pinned")
        previous = state.get("route")
        return self._rules.route(question, previous.agent if previous else None)

    # The edges' path functions are coroutines although they never wait: LangGraph runs a
    # plain function of an async graph on a worker thread, a thread hop per edge and turn.
    async def _after_route(self, state: ConversationState) -> str:
        if state.get("pending") is None:
            return END
        if self._needs_compaction(state, _pending(state).content):
            return "compact"
        return _route_of(state).agent.value

    def _needs_compaction(self, state: ConversationState, question: str) -> bool:
        kept = layout.kept_messages(state.get("messages", []))
        summary = state.get("summary")
        covered = summary.covers if summary else 0
        expected = (
            state.get("context_tokens", 0)
            + len(question) // CHARS_PER_TOKEN
            + 32  # the instruction line and the turn's markers
        )
        compact_at = int(self._compact_share * self._model.context_tokens)
        return expected > compact_at and len(kept) - covered > self._keep

    async def _compact(
        self, state: ConversationState, runtime: Runtime[TurnContext]
    ) -> dict[str, Any]:
        """Summarise every kept message but the last few, once: the prompts that follow
        start from the summary and extend each other again."""
        messages = state.get("messages", [])
        summary = state.get("summary")
        prompt = layout.compaction_prompt(self.preamble, messages, summary)
        try:
            text = await self._complete(
                _pending(state), runtime.context, prompt, "compaction", COMPACTION_SAMPLING
            )
        except ChatbotError as exc:
            runtime.stream_writer(TurnRefused(exc))
            return {"pending": None}
        kept = layout.kept_messages(messages)
        covers = max(len(kept) - self._keep, summary.covers if summary else 0)
        while covers < len(kept) and kept[covers].role != "user":
            covers += 1  # keep whole exchanges: start the kept part at a question
        logger.info("compacted a conversation: %d messages summarised", covers)
        return {"summary": Summary(text=text.strip(), covers=covers), "compacted": True}

    async def _after_compact(self, state: ConversationState) -> str:
        if state.get("pending") is None:
            return END
        return _route_of(state).agent.value

    def _answerer(self, agent: AgentName) -> _Node:
        async def answer(state: ConversationState, runtime: Runtime[TurnContext]) -> dict[str, Any]:
            return await self._answer(agent, state, get_config(), runtime)

        answer.__name__ = agent.value
        return answer

    async def _answer(
        self,
        agent: AgentName,
        state: ConversationState,
        config: RunnableConfig,
        runtime: Runtime[TurnContext],
    ) -> dict[str, Any]:
        """The agent's answer to the pending question, streamed as it comes and stored."""
        question, write = _pending(state), runtime.stream_writer
        prompt = self._prompt(agent, state, question)
        generation = await self._admit(agent, state, question, prompt, runtime)
        if generation is None:
            return {"pending": None, "compacted": False}
        streamed = await self._stream(agent, generation, prompt, config, runtime)
        source = self._cite(agent, question, streamed, write)
        answer = self._stored(agent, state, question, streamed, source, runtime.context)
        write(TurnEnded(answer) if streamed.error is None else TurnFailed(streamed.error, answer))
        return _checkpoint(question, answer, prompt, streamed.finished)

    def _prompt(
        self, agent: AgentName, state: ConversationState, question: Message
    ) -> layout.Prompt:
        """The turn's prompt, counting a prefix break if it does not extend the last one."""
        prompt = self._layout(agent, state, question.content)
        self._check_prefix(state, prompt.messages, agent)
        return prompt

    def _layout(self, agent: AgentName, state: ConversationState, question: str) -> layout.Prompt:
        messages = state.get("messages", [])
        return layout.turn_prompt(self.preamble, messages, state.get("summary"), agent, question)

    async def _admit(
        self,
        agent: AgentName,
        state: ConversationState,
        question: Message,
        prompt: layout.Prompt,
        runtime: Runtime[TurnContext],
    ) -> Generation | None:
        """The engine's generation, announced with ``TurnStarted``; None, announced with
        ``TurnRefused``, if the engine could not take it."""
        context, write = runtime.context, runtime.stream_writer
        try:
            generation = await self._model.start(
                prompt,
                context.sampling,
                user_id=context.user_id,
                session=question.conversation_id,
                purpose=agent.value,
            )
        except ChatbotError as exc:
            write(TurnRefused(exc))
            return None
        write(
            TurnStarted(
                conversation_id=question.conversation_id,
                message_id=context.answer_id,
                agent=agent,
                route_reason=_route_of(state).reason,
            )
        )
        context.control.attach(generation)
        if context.control.stopped:
            await generation.aclose()
        return generation

    async def _stream(
        self,
        agent: AgentName,
        generation: Generation,
        prompt: layout.Prompt,
        config: RunnableConfig,
        runtime: Runtime[TurnContext],
    ) -> _Streamed:
        """Each piece of text as a ``TurnDelta``, traced; a failure ends the stream, kept."""
        traced: RunnableConfig = {
            **config,
            "metadata": {**config.get("metadata", {}), "agent": agent.value},
        }
        streamed = _Streamed()
        try:
            async for event in report(
                generation,
                prompt.messages,
                traced,
                model_id=self._model.model_id,
                sampling=runtime.context.sampling,
            ):
                if isinstance(event, TokenDelta):
                    streamed.parts.append(event.text)
                    runtime.stream_writer(TurnDelta(event.text))
                else:
                    streamed.finished = event
        except ChatbotError as exc:
            streamed.error = exc
        except Exception:
            logger.exception("the %s agent failed", agent.value)
            streamed.error = EngineFailure("the answer failed")
        finally:
            await generation.aclose()
        return streamed

    def _cite(
        self, agent: AgentName, question: Message, streamed: _Streamed, write: StreamWriter
    ) -> str | None:
        """The document a knowledge answer drew on, added as its source line if the model
        did not name it."""
        if agent is not AgentName.KNOWLEDGE or streamed.finished is None:
            return None
        cited = self._uncited_source(question.content, streamed.text)
        if cited is not None:
            streamed.parts.append(layout.source_line(cited))
            write(TurnDelta(layout.source_line(cited)))
        return cited

    def _stored(
        self,
        agent: AgentName,
        state: ConversationState,
        question: Message,
        streamed: _Streamed,
        source: str | None,
        context: TurnContext,
    ) -> Message:
        """The answer as it is stored: complete, cancelled or failed."""
        finished, error = streamed.finished, streamed.error
        return Message(
            id=context.answer_id,
            conversation_id=question.conversation_id,
            role="assistant",
            content=streamed.text,
            status=streamed.status,
            usage=finished.usage if finished else None,
            timing=finished.timing if finished else None,
            agent=agent,
            route_reason=_route_of(state).reason,
            source=source,
            error=error.code if error is not None else None,
        )

    async def _complete(
        self,
        question: Message,
        context: TurnContext,
        prompt: layout.Prompt,
        purpose: str,
        sampling: SamplingParams,
    ) -> str:
        """Generate a short internal answer (a route, a summary) and return its text."""
        generation = await self._model.start(
            prompt,
            sampling,
            user_id=context.user_id,
            session=question.conversation_id,
            purpose=purpose,
        )
        parts: list[str] = []
        async with generation:
            async for event in generation:
                if isinstance(event, TokenDelta):
                    parts.append(event.text)
        return "".join(parts)

    def _uncited_source(self, question: str, answer: str) -> str | None:
        """The document the answer drew on, if the model did not name it: a small model
        often forgets, and an answer from documents must say which one."""
        if any(d.name in answer for d in self.documents):
            return None
        document = self._index.about(question) or self._index.about(answer)
        return document.name if document else None

    def _check_prefix(
        self, state: ConversationState, prompt: list[ChatMessage], agent: AgentName
    ) -> None:
        reference, length = state.get("prefix_digest"), state.get("prefix_length", 0)
        if layout.extends(prompt, reference, length):
            return
        reason: Literal["compaction", "layout_changed"] = (
            "compaction" if state.get("compacted") else "layout_changed"
        )
        self._metrics.prefix_breaks.labels(reason).inc()
        logger.info("prefix break (%s) before a %s turn", reason, agent.value)


@dataclass(slots=True)
class _Streamed:
    """What a generation streamed: its text so far, and how it ended (``finished`` for a
    whole answer, ``error`` for a failure, neither for a stopped one)."""

    parts: list[str] = field(default_factory=list)
    finished: Finished | None = None
    error: ChatbotError | None = None

    @property
    def text(self) -> str:
        return "".join(self.parts)

    @property
    def status(self) -> MessageStatus:
        if self.error is not None:
            return MessageStatus.FAILED
        return MessageStatus.COMPLETE if self.finished is not None else MessageStatus.CANCELLED


def _checkpoint(
    question: Message, answer: Message, prompt: layout.Prompt, finished: Finished | None
) -> dict[str, Any]:
    """The turn's update of the conversation state: the question and its answer, and what
    the next turn's prompt must start with."""
    update: dict[str, Any] = {"messages": [question, answer], "pending": None, "compacted": False}
    if layout.kept_messages([question, answer]):
        # The next turn's prompt must start with this one and its answer.
        expected = [*prompt.messages, layout.spoken(answer)]
        update["prefix_digest"] = layout.digest(expected)
        update["prefix_length"] = len(expected)
        if finished is not None:
            update["context_tokens"] = _context_tokens(finished.usage, expected)
    return update


def _context_tokens(usage: Usage | None, messages: list[ChatMessage]) -> int:
    """Tokens a turn left in the context: as counted by the engine, or, from a server that
    reports no usage, estimated for the compaction threshold, so that the conversation is
    compacted before it overflows."""
    if usage is not None:
        return usage.prompt_tokens + usage.completion_tokens
    return sum(len(m.content) for m in messages) // CHARS_PER_TOKEN + 8 * len(messages)


def _pending(state: ConversationState) -> Message:
    question = state.get("pending")
    if question is None:
        raise RuntimeError("a turn runs only with a pending question")
    return question


def _route_of(state: ConversationState) -> Route:
    route = state.get("route")
    if route is None:
        raise RuntimeError("the route node runs first")
    return route
