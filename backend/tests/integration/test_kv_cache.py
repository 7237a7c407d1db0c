"""The tiered KV cache over HTTP on the real model: each answer says which tier served it,
and one user's content never serves another. (That a state from RAM or disk continues
exactly as a cold prefill would is tested in test_batching.py.)"""

from __future__ import annotations

import httpx

from tests.conftest import BOB_KEY, CAROL_KEY, DAVE_KEY, LiveServer
from tests.integration.test_conversation_api import new_conversation, stream_turn
from tests.prompts import public_tokens


def test_each_answer_names_the_tier_that_served_it(live_server: LiveServer) -> None:
    with live_server.client() as alice, live_server.client(CAROL_KEY) as carol:
        mine = new_conversation(alice)
        stream_turn(alice, mine, "Which planet is the largest?")
        other = new_conversation(carol)
        carol_end = stream_turn(carol, other, "Which metal is the lightest?")[-1][1]
        # Alice's conversation lost the live context to Carol's and comes back from RAM.
        end = stream_turn(alice, mine, "How many moons does it have?")[-1][1]
        stored = alice.get(f"/v1/conversations/{mine}/messages").json()["data"][-1]

    assert carol_end["usage"]["cache_tier"] is not None  # the shared preamble, at least
    assert end["usage"]["cache_tier"] == "ram"
    assert end["usage"]["cached_tokens"] > public_tokens(live_server)
    assert stored["usage"] == end["usage"]


def test_one_users_words_never_hit_the_cache_for_another(live_server: LiveServer) -> None:
    words = "Please repeat after me: the secret password is tangerine-42."
    with live_server.client() as alice, live_server.client(DAVE_KEY) as dave:
        stream_turn(alice, new_conversation(alice), words)
        stream_turn(alice, new_conversation(alice), "Something else, to move the context on.")
        end = stream_turn(dave, new_conversation(dave), words)[-1][1]
    # Dave, who has written nothing before, gets the server's public preamble from the
    # cache and not one token more, though Alice's identical words are in RAM.
    assert end["usage"]["cached_tokens"] == public_tokens(live_server)


def test_cache_stats_show_the_tiers_and_only_the_callers_own_lookups(
    live_server: LiveServer,
) -> None:
    with live_server.client(CAROL_KEY) as carol, live_server.client(BOB_KEY) as bob:
        before = carol.get("/v1/cache/stats").json()
        stream_turn(bob, new_conversation(bob), "What colour is the sky?")
        after = carol.get("/v1/cache/stats").json()
        bobs = bob.get("/v1/cache/stats").json()
        metrics = httpx.get(f"{live_server.url}/metrics").text

    assert after["enabled"] is True
    assert after["user"] == before["user"], "Carol's own counters must not move for Bob"
    assert after["cache"]["lookups"] == before["cache"]["lookups"] + 1
    assert set(after["cache"]["tiers"]) == {"live", "ram", "disk"}
    ram = after["cache"]["tiers"]["ram"]
    assert 0 < ram["bytes"] <= ram["budget_bytes"]
    assert bobs["user"]["lookups"] >= 1
    assert 0 < bobs["user"]["hit_rate"] <= 1
    assert 'chatbot_kv_hit_tokens_total{tier="ram"}' in metrics
    assert "chatbot_kv_lookups_total" in metrics


def test_cache_stats_need_a_key(live_server: LiveServer) -> None:
    response = httpx.get(f"{live_server.url}/v1/cache/stats")
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "authentication_error"
