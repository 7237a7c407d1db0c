"""Keep-latest pruning of every checkpointer the product uses: one checkpoint per thread
remains, the state it holds is whole, and later runs build on it."""

from __future__ import annotations

import asyncio
import operator
from typing import Annotated, Any, TypedDict

from langchain_core.runnables import RunnableConfig
from langgraph.graph import START, StateGraph

from chatbot.agents.state import checkpoint_serializer
from chatbot.persistence.storage import open_storage


class State(TypedDict, total=False):
    messages: Annotated[list[str], operator.add]
    pending: str | None


def answer(state: State) -> dict[str, Any]:
    question = state.get("pending") or ""
    return {"messages": [question, question.upper()], "pending": None}


def test_keep_latest_leaves_one_whole_checkpoint_per_thread(store_url: str) -> None:
    async def scenario() -> None:
        async with open_storage(store_url, serde=checkpoint_serializer()) as storage:
            saver = storage.checkpointer
            graph = (
                StateGraph(State)
                .add_node("answer", answer)
                .add_edge(START, "answer")
                .compile(checkpointer=saver)
            )
            mine: RunnableConfig = {"configurable": {"thread_id": "mine"}}
            other: RunnableConfig = {"configurable": {"thread_id": "other"}}
            for turn in range(3):
                await graph.ainvoke({"pending": f"q{turn}"}, mine)
            await graph.ainvoke({"pending": "theirs"}, other)
            assert len([c async for c in saver.alist(mine)]) > 3

            await saver.aprune(["mine"], strategy="keep_latest")

            assert len([c async for c in saver.alist(mine)]) == 1
            assert len([c async for c in saver.alist(other)]) > 1  # other threads untouched
            state = (await graph.aget_state(mine)).values
            assert state["messages"] == ["q0", "Q0", "q1", "Q1", "q2", "Q2"]
            await graph.ainvoke({"pending": "q3"}, mine)
            state = (await graph.aget_state(mine)).values
            assert state["messages"] == ["q0", "Q0", "q1", "Q1", "q2", "Q2", "q3", "Q3"]

    asyncio.run(scenario())
