"""The three workloads, played the same way against every server.

- multi-round QA (after vLLM production-stack's multi-round-qa benchmark): U users, R
  rounds each, a shared system prompt, a per-user document in round 1, the user's own
  history after it, answers of at most A tokens; users take turns round-robin, so each
  user's next question arrives after U - 1 other conversations have used the context.
- repeated prompts: U users each send the same P questions, each in a new conversation,
  after the same shared system prompt.
- one long conversation: T turns of one user.

Texts are generated from fixed seeds, so every server and every run gets the same ones.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import httpx
from testbed.servers import Target

from benchmarks.client import Reply, chat

SYSTEM_PROMPT = " ".join(
    [
        "You are the support assistant of Northwind Outfitters, a shop for hiking and",
        "camping gear. Answer briefly and politely, in plain language.",
        *(
            f"Policy {i + 1}: {sentence}"
            for i, sentence in enumerate(
                [
                    "Orders over 50 euros ship free within the European Union.",
                    "Standard delivery takes three to five working days; express takes one.",
                    "Customers may return unused items within 30 days for a full refund.",
                    "Worn footwear can be returned within 14 days if it shows no damage.",
                    "Tents carry a two-year warranty covering seams, poles and zippers.",
                    "Sleeping bags are rated by comfort temperature, not by the limit.",
                    "Gift cards never expire and can be used online and in every store.",
                    "Price matching applies to identical items sold by authorised dealers.",
                    "Repairs of backpacks are free during the first year after purchase.",
                    "Rental gear must be returned cleaned and dry, or a fee of 20 euros applies.",
                    "Members of the loyalty club earn one point per euro spent.",
                    "Points can be exchanged for vouchers in steps of 500 points.",
                    "The customer service desk is open from 8 to 20 on working days.",
                    "Stores in Berlin, Munich, Vienna and Zurich offer boot fitting.",
                    "Stoves and fuel canisters cannot be shipped by air.",
                    "Climbing ropes are retired after five years, or at once after a big fall.",
                    "Water filters should be dried before storage to prevent mould.",
                    "Down jackets are washed at 30 degrees with a special detergent.",
                    "Trekking poles are adjusted so the elbow is bent at a right angle.",
                    "Headlamps use rechargeable batteries that last about 200 cycles.",
                ]
            )
        ),
    ]
)

_TOPICS = ["tent", "backpack", "sleeping bag", "boots", "stove", "rain jacket", "headlamp"]
_PLACES = ["the Alps", "Scotland", "Norway", "the Pyrenees", "Iceland", "the Dolomites"]


def user_document(user: int) -> str:
    rng = random.Random(1000 + user)
    items = ", ".join(rng.sample(_TOPICS, 4))
    place = rng.choice(_PLACES)
    return (
        f"Here is my order history: order {rng.randint(10000, 99999)} contained {items}. "
        f"I paid {rng.randint(80, 900)} euros and I am a loyalty member with "
        f"{rng.randint(100, 3000)} points. I am planning a {rng.randint(3, 14)}-day trip to "
        f"{place} next month with {rng.randint(1, 4)} friends and want to be well prepared."
    )


def question(user: int, n: int) -> str:
    rng = random.Random(user * 100 + n)
    topic = rng.choice(_TOPICS)
    asks = [
        f"Can I still return the {topic} I bought?",
        f"How should I look after my {topic} during the trip?",
        f"Is my {topic} covered by a warranty, and for how long?",
        f"Which {topic} would you recommend for {rng.choice(_PLACES)}?",
        f"How many points do I earn if I buy a new {topic}?",
        f"Can I rent a {topic} instead of buying one?",
    ]
    return rng.choice(asks)


@dataclass(frozen=True, slots=True)
class Row:
    user: int
    round: int
    ttft_ms: float
    total_ms: float
    prompt_tokens: int
    cached_tokens: int | None
    completion_tokens: int

    @classmethod
    def of(cls, user: int, round_: int, reply: Reply) -> Row:
        return cls(
            user,
            round_,
            reply.ttft_ms,
            reply.total_ms,
            reply.prompt_tokens,
            reply.cached_tokens,
            reply.completion_tokens,
        )


Observer = Callable[[Target], None]


class Conversation:
    """One user's messages as the client keeps them (the OpenAI API is stateless)."""

    def __init__(self, target: Target, user: int) -> None:
        self.target, self.user = target, user
        self.messages: list[dict[str, str]] = (
            [{"role": "system", "content": SYSTEM_PROMPT}] if target.sends_system_prompt else []
        )

    def ask(self, client: httpx.Client, content: str, max_tokens: int) -> Reply:
        self.messages.append({"role": "user", "content": content})
        reply = chat(
            client,
            self.target.keys[self.user],
            self.messages,
            model=self.target.model,
            max_tokens=max_tokens,
        )
        self.messages.append({"role": "assistant", "content": reply.text})
        return reply


def multi_round(
    target: Target, *, users: int, rounds: int, answer_tokens: int, observe: Observer
) -> list[Row]:
    conversations = [Conversation(target, u) for u in range(users)]
    rows: list[Row] = []
    with httpx.Client(base_url=target.url, timeout=600) as client:
        for r in range(1, rounds + 1):
            for u, conversation in enumerate(conversations):
                content = question(u, r)
                if r == 1:
                    content = f"{user_document(u)}\n\n{content}"
                rows.append(Row.of(u, r, conversation.ask(client, content, answer_tokens)))
                observe(target)
    return rows


def repeated_prompts(
    target: Target, *, users: int, prompts: int, answer_tokens: int, observe: Observer
) -> list[Row]:
    rows: list[Row] = []
    with httpx.Client(base_url=target.url, timeout=600) as client:
        for p in range(prompts):
            for u in range(users):
                reply = Conversation(target, u).ask(client, question(0, p), answer_tokens)
                rows.append(Row.of(u, p + 1, reply))
                observe(target)
    return rows


def long_conversation(
    target: Target, *, turns: int, answer_tokens: int, observe: Observer
) -> list[Row]:
    conversation = Conversation(target, 0)
    rows: list[Row] = []
    with httpx.Client(base_url=target.url, timeout=600) as client:
        for t in range(1, turns + 1):
            content = question(0, t) if t > 1 else f"{user_document(0)}\n\n{question(0, t)}"
            rows.append(Row.of(0, t, conversation.ask(client, content, answer_tokens)))
            observe(target)
    return rows


def as_dicts(rows: list[Row]) -> list[dict[str, Any]]:
    return [asdict(row) for row in rows]
