"""The agents: what each is for (the router reads it) and the instruction it adds to a turn.

An instruction is one short line at the head of the user's turn, never in the shared prefix:
switching agents between turns then changes a few tokens at the end of the prompt and
nothing the KV cache already holds.
"""

from __future__ import annotations

from dataclasses import dataclass

from chatbot.models.domain import AgentName


@dataclass(frozen=True, slots=True)
class AgentSpec:
    name: AgentName
    purpose: str
    instruction: str


AGENTS: dict[AgentName, AgentSpec] = {
    spec.name: spec
    for spec in (
        AgentSpec(
            AgentName.ASSISTANT,
            purpose="general conversation",
            instruction="Answer as a helpful, concise assistant.",
        ),
        AgentSpec(
            AgentName.KNOWLEDGE,
            purpose="questions about the documents",
            instruction="Answer from the documents above and name the document you used.",
        ),
        AgentSpec(
            AgentName.SUMMARIZER,
            purpose="summaries of the conversation or of a pasted text",
            instruction="Summarise the conversation so far, or the text the user gives, "
            "in a few sentences.",
        ),
    )
}

COMPACTION_INSTRUCTION = (
    "Summarise the conversation so far in a few sentences, keeping names, numbers and "
    "decisions, so that it can continue from the summary alone."
)
