"""Users are isolated from each other, on a live server and the real model, beyond what
``test_conversation_api`` and ``test_kv_cache`` already show (Bob gets 404 on Alice's
conversation; a short message of Alice's never serves Dave from the cache):

- Bob's 404 for Alice's conversation is byte for byte the 404 of an id that never existed,
  for every operation, while her answer is streaming too (no 409), and changes nothing;
- Alice's id as Bob's page cursor is unknown to him, and his pages never hold hers;
- ``/v1/cache/stats`` moves for its caller's lookups only, names nobody else, and shows the
  whole cache's totals (which move with everyone's turns) to operators only;
- a long message (several hashed chunks) of Alice's gives Bob no cache hit beyond the public
  preamble, from the live context or from RAM, on the native API and on the OpenAI API with
  the official client (with the server's system prompt or a client's own);
- nor does a long draft of Alice's, read while she was writing and never sent;
- every route that needs a key answers 401 with a JSON error without one, or with a wrong
  one, whether or not the conversation named exists.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from openai.types import CompletionUsage
from openai.types.chat import ChatCompletionMessageParam

from chatbot.models.domain import ChatMessage
from tests.conftest import ALICE_KEY, BOB_KEY, LiveServer
from tests.integration.test_conversation_api import new_conversation, stream_turn
from tests.prompts import public_tokens
from tests.sse import parse_events
from tests.waiting import wait_until

# About 190 tokens each: several 64-token chunks of the KV cache's index, all of them the
# sender's. The two differ from their first word, so that neither is a prefix of the other.
LOG = (
    "the lighthouse keeper of Quillmoor catalogued every passing ship: the Marigold "
    "Venture, the Tessellated Heron, the Obsidian Lark and the Saffron Comet, noting their "
    "flags, their cargo of cinnamon, tin and indigo, the hour of each sighting and the colour "
    "of the sea. "
)
LONG_A = "Zebulon, " + LOG * 3
LONG_B = "Philippa, " + LOG * 3
NOBODYS = "Quentin, " + LOG * 3  # never sent before Bob sends it: what his own history gives
DRAFTED = "Ottoline, " + LOG * 3  # Alice's draft, which nobody sends before it
UNSENT = "Barnabas, " + LOG * 3  # what Bob's history gives words nobody sent, for the draft
SEVERAL_CHUNKS = 150
NEVER = "conv_0123456789abcdef0123456789abcdef"


def operations(conversation_id: str) -> list[tuple[str, str, dict[str, Any] | None]]:
    path = f"/v1/conversations/{conversation_id}"
    return [
        ("GET", path, None),
        ("PATCH", path, {"title": "taken over"}),
        ("DELETE", path, None),
        ("GET", f"{path}/messages", None),
        ("POST", f"{path}/messages", {"content": "hello there"}),
        ("POST", f"{path}/messages", {"content": "hello there", "stream": False}),
        ("PUT", f"{path}/draft", {"content": "hello there"}),
        ("DELETE", f"{path}/draft", None),
    ]


def refusal(client: httpx.Client, method: str, path: str, body: Any, conversation: str) -> Any:
    """The 404, with the id it names replaced, so that two ids' refusals compare."""
    response = client.request(method, path, json=body)
    assert response.status_code == 404, (method, path, response.text)
    assert response.headers["content-type"] == "application/json"
    assert "retry-after" not in response.headers
    return response.text.replace(conversation, "<id>")


@pytest.fixture
def alices(live_server: LiveServer) -> Iterator[str]:
    """A conversation of Alice's with one answered turn."""
    with live_server.client() as alice:
        conversation_id = new_conversation(alice, title="alice's diary")
        stream_turn(alice, conversation_id, "What is the capital of Spain?")
        yield conversation_id


def test_bobs_404_for_alices_conversation_is_that_of_an_id_that_never_existed(
    live_server: LiveServer, alices: str
) -> None:
    with live_server.client(BOB_KEY) as bob, live_server.client() as alice:
        before = alice.get(f"/v1/conversations/{alices}/messages").json()["data"]
        for (method, path, body), (_, never_path, _) in zip(
            operations(alices), operations(NEVER), strict=True
        ):
            assert refusal(bob, method, path, body, alices) == refusal(
                bob, method, never_path, body, NEVER
            ), (method, path)
        # Nothing of Alice's changed.
        assert alice.get(f"/v1/conversations/{alices}").json()["title"] == "alice's diary"
        assert alice.get(f"/v1/conversations/{alices}/messages").json()["data"] == before


def test_bob_gets_404_not_409_while_alices_answer_streams(
    live_server: LiveServer, alices: str
) -> None:
    """A 409 would tell Bob that the conversation exists and is busy."""
    started = threading.Event()
    release = threading.Event()

    def alice_streams() -> None:
        with (
            live_server.client() as alice,
            alice.stream(
                "POST",
                f"/v1/conversations/{alices}/messages",
                json={"content": "Count from one to fifty, in words.", "max_tokens": 200},
            ) as response,
        ):
            for name, _ in parse_events(response.iter_lines()):
                if name == "token":
                    started.set()
                    release.wait(timeout=30)
                    return

    thread = threading.Thread(target=alice_streams)
    thread.start()
    try:
        assert started.wait(timeout=60), "Alice's answer did not start"
        with live_server.client(BOB_KEY) as bob:
            for method, path, body in operations(alices):
                assert refusal(bob, method, path, body, alices), (method, path)
            # Alice herself is refused with 409: the conversation is busy.
            with live_server.client() as alice:
                busy = alice.post(f"/v1/conversations/{alices}/messages", json={"content": "hi"})
                assert busy.status_code == 409
    finally:
        release.set()
        thread.join(timeout=30)


def test_bobs_pages_never_hold_alices_conversations(live_server: LiveServer) -> None:
    with live_server.client() as alice, live_server.client(BOB_KEY) as bob:
        hers = {new_conversation(alice, title=f"a{i}") for i in range(3)}
        his = {new_conversation(bob, title=f"b{i}") for i in range(3)}
        seen: list[str] = []
        after: str | None = None
        while True:
            params: dict[str, Any] = {"limit": 2} | ({"after": after} if after else {})
            page = bob.get("/v1/conversations", params=params).json()
            seen += [c["id"] for c in page["data"]]
            if not page["has_more"]:
                break
            after = page["data"][-1]["id"]
        assert his <= set(seen)
        assert not hers & set(seen)
        assert len(seen) == len(set(seen))
        # Alice's id as Bob's cursor is as unknown to him as an id that never existed.
        mine = next(iter(hers))
        refused = bob.get("/v1/conversations", params={"after": mine})
        never = bob.get("/v1/conversations", params={"after": NEVER})
        assert refused.status_code == never.status_code == 404
        assert refused.text.replace(mine, "<id>") == never.text.replace(NEVER, "<id>")


def test_cache_stats_move_for_their_caller_only_and_name_nobody_else(
    live_server: LiveServer,
) -> None:
    with live_server.client() as alice, live_server.client(BOB_KEY) as bob:
        bob_before = bob.get("/v1/cache/stats").json()
        alice_before = alice.get("/v1/cache/stats").json()
        stream_turn(alice, new_conversation(alice), "Which planet is the largest?")
        bob_after_alice = bob.get("/v1/cache/stats").json()
        stream_turn(bob, new_conversation(bob), "Which planet is the smallest?")
        bob_after = bob.get("/v1/cache/stats")
        alice_after = alice.get("/v1/cache/stats").json()

    assert bob_after_alice["user"] == bob_before["user"], "Alice's turn moved Bob's counters"
    assert bob_after.json()["user"]["lookups"] == bob_before["user"]["lookups"] + 1
    assert alice_after["user"]["lookups"] == alice_before["user"]["lookups"] + 1
    # The whole cache's totals, which would move with Alice's turn, are an operator's only.
    assert bob_after.json()["cache"] is None
    assert bob_after.json()["enabled"] is True
    assert "alice" not in bob_after.text.lower()
    assert ALICE_KEY not in bob_after.text


def test_alices_long_message_gives_bob_no_hit_beyond_the_public_preamble(
    live_server: LiveServer,
) -> None:
    shared = public_tokens(live_server)

    def turn(client: httpx.Client, words: str) -> dict[str, Any]:
        usage: dict[str, Any] = stream_turn(client, new_conversation(client), words, max_tokens=4)[
            -1
        ][1]["usage"]
        return usage

    with live_server.client() as alice, live_server.client(BOB_KEY) as bob:
        first = turn(alice, LONG_A)
        from_live = turn(bob, LONG_A)  # Alice's tokens are in the live context
        turn(alice, LONG_B)
        turn(alice, "Something else, to move the context on.")
        from_ram = turn(bob, LONG_B)  # Alice's state for them is in RAM only
        nobodys = turn(bob, NOBODYS)
        # The cache does serve the same words to their author.
        alice_again = turn(alice, LONG_A)
        bob_again = turn(bob, LONG_B)

    assert first["prompt_tokens"] > shared + SEVERAL_CHUNKS
    # Beyond the public preamble Bob may hit his own earlier turns (the agent's instruction
    # line and the user header they share), exactly as for words nobody sent: never more.
    assert nobodys["cached_tokens"] < shared + SEVERAL_CHUNKS
    assert shared <= from_live["cached_tokens"] <= nobodys["cached_tokens"]
    assert shared <= from_ram["cached_tokens"] <= nobodys["cached_tokens"]
    assert alice_again["cached_tokens"] > shared + SEVERAL_CHUNKS
    assert bob_again["cached_tokens"] > shared + SEVERAL_CHUNKS


def test_alices_draft_gives_bob_no_hit_beyond_the_public_preamble(
    live_server: LiveServer,
) -> None:
    shared = public_tokens(live_server)
    engine = live_server.state.engine

    def usage(client: httpx.Client, conversation_id: str, words: str) -> dict[str, Any]:
        end = stream_turn(client, conversation_id, words, max_tokens=4)[-1][1]
        spent: dict[str, Any] = end["usage"]
        return spent

    with live_server.client() as alice, live_server.client(BOB_KEY) as bob:
        hers = new_conversation(alice)
        usage(alice, hers, "Good morning.")  # her conversation now holds the sequence
        before = engine.draft_stats()
        assert before is not None
        drafted = alice.put(f"/v1/conversations/{hers}/draft", json={"content": DRAFTED})
        assert drafted.json()["status"] == "prefilling", drafted.text
        wait_until(lambda: (engine.draft_stats() or before).prefilled > before.prefilled)
        from_draft = usage(bob, new_conversation(bob), DRAFTED)
        nobodys = usage(bob, new_conversation(bob), UNSENT)
        # Her draft, saved when Bob took the sequence, serves her own message.
        alices = usage(alice, hers, DRAFTED)

    assert from_draft["draft_tokens"] == 0
    # Bob gets no more for the words of Alice's draft than for words nobody sent: the public
    # part, and what his own earlier turns share with it.
    assert shared <= from_draft["cached_tokens"] <= nobodys["cached_tokens"]
    assert nobodys["cached_tokens"] < shared + SEVERAL_CHUNKS
    assert alices["cached_tokens"] > shared + SEVERAL_CHUNKS


@pytest.fixture
def openai_clients(live_server: LiveServer) -> Iterator[tuple[openai.OpenAI, openai.OpenAI]]:
    base = f"{live_server.url}/v1"
    with (
        openai.OpenAI(base_url=base, api_key=ALICE_KEY, max_retries=0) as alice,
        openai.OpenAI(base_url=base, api_key=BOB_KEY, max_retries=0) as bob,
    ):
        yield alice, bob


def usage(client: openai.OpenAI, messages: list[ChatCompletionMessageParam]) -> CompletionUsage:
    completion = client.chat.completions.create(
        model=client.models.list().data[0].id, messages=messages, max_tokens=4, temperature=0
    )
    assert completion.usage is not None
    assert completion.usage.prompt_tokens_details is not None
    return completion.usage


def cached_tokens(client: openai.OpenAI, messages: list[ChatCompletionMessageParam]) -> int:
    details = usage(client, messages).prompt_tokens_details
    assert details is not None
    return details.cached_tokens or 0


@pytest.mark.parametrize("system", [None, "You are Captain Quillmoor's own ship's log."])
def test_openai_api_alices_words_give_bob_no_hit(
    live_server: LiveServer,
    openai_clients: tuple[openai.OpenAI, openai.OpenAI],
    system: str | None,
) -> None:
    """Without a system message the server's own is used, and shared; a client's own system
    prompt is that client's content, so nothing at all is shared but the few-shot preamble."""
    alice, bob = openai_clients

    def ask(words: str) -> list[ChatCompletionMessageParam]:
        messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": words}]
        if system is not None:
            messages.insert(0, {"role": "system", "content": system})
        return messages

    prompt_system = system or live_server.state.settings.system_prompt
    shared = public_tokens(
        live_server,
        [ChatMessage(role="system", content=prompt_system), ChatMessage(role="user", content="")],
        public=0 if system else 1,
    )

    cached_tokens(alice, ask(LONG_A))
    from_live = cached_tokens(bob, ask(LONG_A))
    cached_tokens(alice, ask(LONG_B))
    cached_tokens(alice, ask("Something else, to move on."))
    from_ram = cached_tokens(bob, ask(LONG_B))
    nobody = usage(bob, ask(NOBODYS))
    assert nobody.prompt_tokens_details is not None
    nobodys = nobody.prompt_tokens_details.cached_tokens or 0
    # Bob gets no more for Alice's words than for words nobody sent: the public part, and
    # what his own earlier requests share with it (his own system prompt, the header).
    assert shared <= nobodys < nobody.prompt_tokens - SEVERAL_CHUNKS
    assert from_live <= nobodys
    assert from_ram <= nobodys
    # The same words do hit for their author.
    assert cached_tokens(alice, ask(LONG_A)) > shared + SEVERAL_CHUNKS
    assert cached_tokens(bob, ask(LONG_B)) > shared + SEVERAL_CHUNKS


def authenticated_routes(live_server: LiveServer, conversation_id: str) -> list[tuple[str, str]]:
    """Every operation of the served API that declares a key, with a real conversation id."""
    schema = live_server.app.openapi()
    routes = [
        (method.upper(), path.replace("{conversation_id}", conversation_id))
        for path, item in schema["paths"].items()
        for method, operation in item.items()
        if operation.get("security")
    ]
    assert len(routes) >= 10
    return routes


BODIES: dict[tuple[str, str], dict[str, Any]] = {
    ("POST", "conversations"): {"title": "x"},
    ("PATCH", "conversations"): {"title": "x"},
    ("POST", "messages"): {"content": "hi"},
    ("PUT", "draft"): {"content": "hi"},
    ("POST", "completions"): {"model": "any", "messages": [{"role": "user", "content": "hi"}]},
}


@pytest.mark.parametrize(
    "authorization",
    [None, "Bearer wrong-key-0123456789abcdef", f"Basic {ALICE_KEY}", "Bearer", ALICE_KEY],
)
def test_every_route_refuses_a_missing_or_wrong_key_with_401(
    live_server: LiveServer, alices: str, authorization: str | None
) -> None:
    headers = {"Authorization": authorization} if authorization else {}
    with httpx.Client(base_url=live_server.url, headers=headers, timeout=30) as anonymous:
        for conversation_id in (alices, NEVER):  # existing or not: the same 401
            for method, path in authenticated_routes(live_server, conversation_id):
                body = BODIES.get((method, path.rsplit("/", 1)[-1]))
                if body is None and path.startswith("/v1/conversations/") and method != "GET":
                    body = BODIES.get((method, "conversations"))
                response = anonymous.request(method, path, json=body)
                assert response.status_code == 401, (method, path, response.text)
                assert response.headers["content-type"] == "application/json"
                assert response.headers["www-authenticate"] == "Bearer"
                error = response.json()["error"]
                assert error["type"] == "authentication_error"
                assert error["code"] in ("missing_api_key", "invalid_api_key")
                assert alices not in response.text
    with live_server.client() as alice:  # and nothing happened
        assert alice.get(f"/v1/conversations/{alices}").json()["title"] == "alice's diary"
        assert len(alice.get(f"/v1/conversations/{alices}/messages").json()["data"]) == 2
    wait_until(lambda: not live_server.state.engine.queue_depth)
