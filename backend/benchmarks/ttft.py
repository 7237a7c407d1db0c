"""TTFT of a cold turn vs follow-up turns, with the prefix cache off and on, in one run.

Starts ``chatbot serve`` twice on loopback (cache off, then on), plays the same
conversations through the native streaming API, and measures time to first token as the
client sees it (request sent to first ``token`` event) next to what the server reports.

    python -m benchmarks.ttft [--conversations 4] [--turns 4] [--max-tokens 32]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks.machine import describe

RESULTS = Path(__file__).parent / "results"
QUESTIONS = [
    "What is the tallest mountain in the world?",
    "How was it formed?",
    "Who first climbed it?",
    "What is the weather like at the top?",
    "Why do people climb mountains?",
    "Thank you. What should I read to learn more?",
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def start_server(prefix_cache: bool, max_tokens: int) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {
        **os.environ,
        "CHATBOT_PORT": str(port),
        "CHATBOT_HOST": "127.0.0.1",
        "CHATBOT_API_KEYS": "",
        "CHATBOT_PREFIX_CACHE": str(prefix_cache).lower(),
        "CHATBOT_MAX_TOKENS": str(max_tokens),
        "CHATBOT_TEMPERATURE": "0",
        "CHATBOT_LOG_LEVEL": "warning",
    }
    server = subprocess.Popen([sys.executable, "-m", "chatbot", "serve"], env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz").status_code == 200:
                return server, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    server.kill()
    raise RuntimeError("the server did not become ready")


def turn(client: httpx.Client, conversation_id: str, content: str) -> dict[str, Any]:
    sent = time.perf_counter()
    first_token: float | None = None
    end: dict[str, Any] = {}
    with client.stream(
        "POST", f"/v1/conversations/{conversation_id}/messages", json={"content": content}
    ) as response:
        response.raise_for_status()
        event = ""
        for line in response.iter_lines():
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:"):
                if event == "token" and first_token is None:
                    first_token = time.perf_counter()
                elif event == "message.end":
                    end = json.loads(line[5:])
                elif event == "error":
                    raise RuntimeError(line)
    client_ttft = ((first_token or time.perf_counter()) - sent) * 1000
    return {"client_ttft_ms": round(client_ttft, 1), **end["usage"], **end["timing"]}


def run_mode(
    prefix_cache: bool, conversations: int, turns: int, max_tokens: int
) -> list[dict[str, Any]]:
    server, url = start_server(prefix_cache, max_tokens)
    rows = []
    try:
        with httpx.Client(base_url=url, timeout=120) as client:
            for c in range(conversations):
                conversation_id = client.post("/v1/conversations", json={}).json()["id"]
                for t in range(turns):
                    row = turn(client, conversation_id, QUESTIONS[t % len(QUESTIONS)])
                    rows.append({"conversation": c, "turn": t + 1, **row})
    finally:
        server.terminate()
        server.wait(timeout=30)
    return rows


def p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summarise(rows: list[dict[str, Any]], first: bool) -> dict[str, float]:
    chosen = [r for r in rows if (r["turn"] == 1) == first]
    ttft = [r["client_ttft_ms"] for r in chosen]
    prompt = sum(r["prompt_tokens"] for r in chosen)
    cached = sum(r["cached_tokens"] for r in chosen)
    return {
        "n": len(chosen),
        "ttft_p50_ms": round(statistics.median(ttft), 1),
        "ttft_p95_ms": round(p(ttft, 0.95), 1),
        "prompt_tokens_mean": round(prompt / len(chosen), 1),
        "cached_share": round(cached / prompt, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conversations", type=int, default=4)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    command = "python -m benchmarks.ttft " + " ".join(sys.argv[1:])
    rows = {
        mode: run_mode(mode == "on", args.conversations, args.turns, args.max_tokens)
        for mode in ("off", "on")
    }
    summary = {
        mode: {"first turn": summarise(r, True), "follow-up turns": summarise(r, False)}
        for mode, r in rows.items()
    }
    result = {
        "command": command.strip(),
        "machine": describe(),
        "settings": vars(args),
        "summary": summary,
        "turns": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "ttft.json").write_text(json.dumps(result, indent=2) + "\n")

    machine = result["machine"]
    lines = [
        "# TTFT: first turn vs follow-up turns, prefix cache off vs on",
        "",
        f"`{result['command']}` on {machine['cores']} cores ({machine['cpu']}), "  # type: ignore[index]
        f"{machine['date']}; {args.conversations} conversations × {args.turns} turns, "  # type: ignore[index]
        f"answers ≤ {args.max_tokens} tokens, greedy. TTFT as the client sees it.",
        "",
        "| turns | cache | TTFT p50 (ms) | TTFT p95 (ms) | prompt tokens (mean) | cached share |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for kind in ("first turn", "follow-up turns"):
        for mode in ("off", "on"):
            s = summary[mode][kind]
            lines.append(
                f"| {kind} | {mode} | {s['ttft_p50_ms']} | {s['ttft_p95_ms']} | "
                f"{s['prompt_tokens_mean']} | {s['cached_share']:.0%} |"
            )
    off, on = summary["off"]["follow-up turns"], summary["on"]["follow-up turns"]
    cut = 1 - on["ttft_p50_ms"] / off["ttft_p50_ms"]
    lines += ["", f"Follow-up turns: TTFT p50 {cut:.0%} lower with the prefix cache."]
    (RESULTS / "ttft.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
