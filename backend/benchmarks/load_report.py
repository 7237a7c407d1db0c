"""The load benchmark's figures (``load``'s docstring says what each means) and its table."""

from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import asdict
from typing import Any, Protocol

from benchmarks.load_client import LAG_BUCKET_MS, LAG_BUCKETS, LoadSettings


class Samples(Protocol):
    """What was sampled from the server over the run."""

    rss_baseline: int
    peak: dict[str, float]
    """open_streams, rss_bytes and open_fds at the sample with the most open streams."""
    max_rss: int
    timeline: list[tuple[float, int, int]]
    """(seconds, open streams, RSS bytes)."""


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, round(q * (len(ordered) - 1))))]


def _histogram_percentile(counts: list[int], q: float) -> float | None:
    total = sum(counts)
    if not total:
        return None
    rank = q * total
    seen = 0
    for bucket, count in enumerate(counts):
        seen += count
        if seen >= rank:
            return (bucket + 1) * LAG_BUCKET_MS  # the bucket's upper edge
    return LAG_BUCKETS * LAG_BUCKET_MS


def summarise(
    settings: LoadSettings,
    stats: list[dict[str, Any]],
    samples: Samples,
    *,
    server_cpu_s: float,
    wall_s: float,
) -> dict[str, Any]:
    errors: Counter[str] = Counter()
    agents: Counter[str] = Counter()
    added: list[float] = []
    client_ttft: list[float] = []
    engine_ttft: list[float] = []
    lags = [0] * LAG_BUCKETS
    for s in stats:
        errors.update(s["errors"])
        agents.update(s["agents"])
        added += s["added_ttft_ms"]
        client_ttft += s["client_ttft_ms"]
        engine_ttft += s["engine_ttft_ms"]
        lags = [a + b for a, b in zip(lags, s["lag_counts"], strict=True)]
    messages = sum(s["messages"] for s in stats)
    all_tokens = sum(s["all_tokens"] for s in stats)
    all_messages = sum(s["all_messages"] for s in stats)
    tokens = sum(s["tokens"] for s in stats)
    prompt = sum(s["prompt_tokens"] for s in stats)
    peak = samples.peak
    streams = int(peak["open_streams"])
    per_stream = (peak["rss_bytes"] - samples.rss_baseline) / streams if streams else None
    window = settings.duration_s

    def ms(value: float | None) -> float | None:
        return None if value is None else round(value, 1)

    return {
        "settings": asdict(settings),
        "conversations": sum(s["conversations"] for s in stats),
        "messages": messages,
        "messages_per_s": round(messages / window, 1),
        "tokens_per_s": round(tokens / window, 1),
        "errors": dict(errors),
        "error_count": sum(errors.values()),
        "max_open_streams": streams,
        "server_open_fds_at_peak": int(peak["open_fds"]),
        "added_ttft_ms": {
            "p50": ms(_percentile(added, 0.5)),
            "p99": ms(_percentile(added, 0.99)),
            "mean": ms(statistics.fmean(added)) if added else None,
        },
        "client_ttft_ms": {
            "p50": ms(_percentile(client_ttft, 0.5)),
            "p99": ms(_percentile(client_ttft, 0.99)),
        },
        "engine_ttft_ms": {
            "p50": ms(_percentile(engine_ttft, 0.5)),
            "p99": ms(_percentile(engine_ttft, 0.99)),
        },
        "token_lag_ms": {
            "p50": _histogram_percentile(lags, 0.5),
            "p99": _histogram_percentile(lags, 0.99),
            "p999": _histogram_percentile(lags, 0.999),
            "tokens": sum(lags),
        },
        "cached_share": round(sum(s["cached_tokens"] for s in stats) / prompt, 4)
        if prompt
        else None,
        "agents": dict(agents),
        "server": {
            "rss_baseline_mib": round(samples.rss_baseline / 2**20, 1),
            "rss_at_peak_mib": round(peak["rss_bytes"] / 2**20, 1),
            "rss_max_mib": round(samples.max_rss / 2**20, 1),
            "memory_per_stream_kib": round(per_stream / 1024, 1) if per_stream else None,
            "cpu_cores": round(server_cpu_s / wall_s, 2),
            "cpu_us_per_token": round(server_cpu_s / all_tokens * 1e6, 1) if all_tokens else None,
            "cpu_ms_per_message": round(server_cpu_s / all_messages * 1e3, 2)
            if all_messages
            else None,
        },
        "clients": {
            "processes": settings.clients,
            "cpu_cores": round(sum(s["cpu_s"] for s in stats) / wall_s, 2),
        },
        "wall_s": round(wall_s, 1),
        "timeline": samples.timeline,
    }


def report_lines(runs: dict[str, dict[str, Any]]) -> list[str]:
    """The Markdown table of one or more runs, and what the columns mean."""
    body = []
    for name, r in runs.items():
        s = r["settings"]
        body.append(
            [
                name,
                f"{s['users']:,}",
                f"{s['think_s']:g} s",
                f"{s['answer_tokens']} @ {s['decode_tokens_per_s']:g}/s",
                f"{r['max_open_streams']:,}",
                f"{r['messages_per_s']:g}",
                f"{r['tokens_per_s']:,.0f}",
                r["error_count"],
                f"{r['added_ttft_ms']['p50']} / {r['added_ttft_ms']['p99']}",
                r["token_lag_ms"]["p99"],
                r["server"]["memory_per_stream_kib"],
                r["server"]["cpu_cores"],
                r["clients"]["cpu_cores"],
            ]
        )
    lines = [
        "| run | users | think | answer (tokens @ rate) | max open streams | messages/s "
        "| tokens/s | errors | added TTFT p50 / p99 (ms) | token lag p99 (ms) "
        "| server KiB / stream | server cores | client cores |",
        "|" + "---|" * 13,
    ]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in body]
    for name, r in runs.items():
        if r["errors"]:
            errors = ", ".join(f"{kind}: {n}" for kind, n in r["errors"].items())
            lines.append(f"\nErrors in {name}: {errors}.")
    lines += [
        "",
        "Added TTFT: client-seen TTFT (request written → first token event) minus the "
        "engine's own `timing.ttft_ms` (the simulated GPU's queue and prefill). Token lag: "
        "for each token after a stream's first, its arrival minus the engine's schedule "
        "anchored at the first token, `(arrival_i − arrival_0) − i / rate`; 1 ms buckets. "
        "Memory per stream: server RSS at the most open streams minus before the users "
        "started, over those streams (conversations created meanwhile included). Cores: CPU "
        "seconds a second over the run. Figures after the ramp only.",
    ]
    return lines
