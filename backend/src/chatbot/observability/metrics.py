"""Every Prometheus metric of the product, in one registry owned by the app (no globals)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from itertools import accumulate

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from chatbot.models.cache import CacheStats
from chatbot.models.domain import STEP_SECONDS_BUCKETS, BatchStats, DraftStats, Timing, Usage

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.ttft = Histogram(
            "chatbot_ttft_seconds",
            "Time from admission to the first streamed token.",
            ["engine", "agent"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.prefill = Histogram(
            "chatbot_prefill_seconds",
            "Time spent computing the uncached prompt tokens.",
            ["engine", "agent"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "chatbot_prompt_tokens",
            "Prompt tokens of finished generations.",
            ["engine", "agent"],
            registry=r,
        )
        self.cached_tokens = Counter(
            "chatbot_cached_tokens",
            "Prompt tokens whose KV state was reused instead of recomputed.",
            ["engine", "agent"],
            registry=r,
        )
        self.completion_tokens = Counter(
            "chatbot_completion_tokens", "Generated tokens.", ["engine", "agent"], registry=r
        )
        self.draft_hit_tokens = Counter(
            "chatbot_draft_hit_tokens",
            "Prompt tokens of finished generations whose KV state a draft computed while "
            "the user was writing (a part of chatbot_cached_tokens).",
            ["engine", "agent"],
            registry=r,
        )
        self.drafts_received = Counter(
            "chatbot_drafts_received", "Drafts clients sent (PUT .../draft).", registry=r
        )
        self.drafts_skipped = Counter(
            "chatbot_drafts_skipped",
            "Drafts nothing was computed for, by reason (engine_busy: no spare capacity).",
            ["reason"],
            registry=r,
        )
        self.generations = Counter(
            "chatbot_generations", "Generations by outcome.", ["engine", "outcome"], registry=r
        )
        self.prefix_breaks = Counter(
            "chatbot_prefix_breaks",
            "Conversation turns whose prompt did not extend the previous turn's prompt and "
            "answer, so the KV cache could not cover the history.",
            ["reason"],
            registry=r,
        )
        self.requests = Counter(
            "chatbot_requests",
            "HTTP requests by route and status.",
            ["route", "status"],
            registry=r,
        )
        self.active_streams = Gauge(
            "chatbot_active_streams", "Responses being generated right now.", registry=r
        )
        self.queue_depth = Gauge(
            "chatbot_engine_queue_depth", "Requests waiting for the engine.", registry=r
        )

    def observe_generation(
        self, engine: str, agent: str, usage: Usage | None, timing: Timing
    ) -> None:
        """``agent``: the agent answering, "router" or "compaction" for the graph's own calls,
        "none" for the OpenAI-compatible API. ``usage``: None when the engine's server did
        not report it; its tokens are then left uncounted rather than counted as zero."""
        self.ttft.labels(engine, agent).observe(timing.ttft_ms / 1000)
        self.prefill.labels(engine, agent).observe(timing.prefill_ms / 1000)
        if usage is None:
            return
        self.prompt_tokens.labels(engine, agent).inc(usage.prompt_tokens)
        self.cached_tokens.labels(engine, agent).inc(usage.cached_tokens)
        self.completion_tokens.labels(engine, agent).inc(usage.completion_tokens)
        self.draft_hit_tokens.labels(engine, agent).inc(usage.draft_tokens)

    def watch_queue(self, depth: Callable[[], float]) -> None:
        self.queue_depth.set_function(depth)

    def watch_batches(self, stats: Callable[[], BatchStats | None]) -> None:
        """Export how the engine batches its sequences, read at each scrape."""
        self.registry.register(_BatchCollector(stats))

    def watch_drafts(self, stats: Callable[[], DraftStats | None]) -> None:
        """Export what the engine did with drafts, read at each scrape."""
        self.registry.register(_DraftCollector(stats))

    def watch_kv_cache(self, stats: Callable[[], CacheStats | None]) -> None:
        """Export the engine's KV-cache counters, read at each scrape."""
        self.registry.register(_KVCacheCollector(stats))

    @contextmanager
    def stream(self) -> Iterator[None]:
        self.active_streams.inc()
        try:
            yield
        finally:
            self.active_streams.dec()

    def export(self) -> bytes:
        return generate_latest(self.registry)


class _BatchCollector(Collector):
    """The engine's batch counters, kept on its worker thread; rates come from Prometheus:
    batch tokens per step is ``rate(batch_tokens) / rate(steps)``, decode tokens/s is
    ``rate(decode_tokens)``."""

    def __init__(self, stats: Callable[[], BatchStats | None]) -> None:
        self._stats = stats

    def describe(self) -> list[Metric]:
        return []  # the families appear only for an engine that batches itself

    def collect(self) -> Iterator[Metric]:
        stats = self._stats()
        if stats is None:
            return
        yield GaugeMetricFamily(
            "chatbot_engine_running_sequences",
            "Requests holding a sequence of the engine: being prefilled or answering.",
            value=stats.running,
        )
        yield GaugeMetricFamily(
            "chatbot_engine_waiting_sequences",
            "Requests waiting for a sequence of the engine.",
            value=stats.waiting,
        )
        yield CounterMetricFamily(
            "chatbot_engine_steps", "Batches the engine evaluated.", value=stats.steps
        )
        yield CounterMetricFamily(
            "chatbot_engine_batch_tokens",
            "Tokens the engine evaluated in its batches: answer tokens and prompt chunks.",
            value=stats.batch_tokens,
        )
        yield CounterMetricFamily(
            "chatbot_engine_decode_tokens",
            "Answer tokens the engine evaluated.",
            value=stats.decode_tokens,
        )
        yield CounterMetricFamily(
            "chatbot_engine_side_read_tokens",
            "Prompt tokens the side reader read beside the answers, on a core of its own, "
            "and handed to their sequence.",
            value=stats.side_read_tokens,
        )
        yield CounterMetricFamily(
            "chatbot_engine_answer_steps",
            "Batches that carried answer tokens: against chatbot_engine_decode_tokens, how many "
            "answers share a step.",
            value=stats.answer_steps,
        )
        if not stats.step_seconds_buckets:
            return
        cumulative = list(accumulate(stats.step_seconds_buckets))
        yield HistogramMetricFamily(
            "chatbot_engine_step_seconds",
            "Time each batch took to evaluate.",
            buckets=[
                *((str(le), n) for le, n in zip(STEP_SECONDS_BUCKETS, cumulative, strict=False)),
                ("+Inf", cumulative[-1]),
            ],
            sum_value=stats.step_seconds,
        )
        yield CounterMetricFamily(
            "chatbot_engine_predicted_step_seconds",
            "Time the engine's cost model predicted for those batches: against "
            "chatbot_engine_step_seconds_sum, how well it predicts.",
            value=stats.predicted_step_seconds,
        )
        yield GaugeMetricFamily(
            "chatbot_engine_step_bound_seconds",
            "The most an answers' step and the reads' step after it may cost together (four "
            "times it for a prompt alone on the engine).",
            value=stats.step_bound_seconds,
        )


class _DraftCollector(Collector):
    """The engine's draft counters. The compute drafts wasted is
    ``chatbot_engine_draft_tokens - chatbot_engine_draft_tokens_used`` (what a message has
    not used yet, drafts still being written among it)."""

    def __init__(self, stats: Callable[[], DraftStats | None]) -> None:
        self._stats = stats

    def describe(self) -> list[Metric]:
        return []  # the families appear only for an engine that reads drafts itself

    def collect(self) -> Iterator[Metric]:
        stats = self._stats()
        if stats is None:
            return
        yield CounterMetricFamily(
            "chatbot_engine_drafts_prefilled",
            "Drafts the engine read to their end.",
            value=stats.prefilled,
        )
        yield CounterMetricFamily(
            "chatbot_engine_drafts_dropped",
            "Drafts the engine stopped before their end: replaced by a newer draft or the "
            "message, or dropped by the client (one paused for a request goes on later).",
            value=stats.dropped,
        )
        yield CounterMetricFamily(
            "chatbot_engine_draft_tokens",
            "Prompt tokens the engine computed for drafts.",
            value=stats.tokens,
        )
        yield CounterMetricFamily(
            "chatbot_engine_draft_tokens_used",
            "Of the tokens computed for drafts, those a message's prompt reused.",
            value=stats.tokens_used,
        )


class _KVCacheCollector(Collector):
    """The engine keeps its own counters (it counts on its worker thread); they are read
    when Prometheus scrapes rather than copied on every request."""

    def __init__(self, stats: Callable[[], CacheStats | None]) -> None:
        self._stats = stats

    def describe(self) -> list[Metric]:
        return []  # no fixed description: the families appear once the engine has a cache

    def collect(self) -> Iterator[Metric]:
        stats = self._stats()
        if stats is None:
            return
        yield CounterMetricFamily(
            "chatbot_kv_lookups", "Prompts looked up in the KV cache.", value=stats.lookups
        )
        yield CounterMetricFamily(
            "chatbot_kv_requested_tokens",
            "Prompt tokens looked up in the KV cache.",
            value=stats.requested_tokens,
        )
        per_tier: list[tuple[str, str, str, type[CounterMetricFamily | GaugeMetricFamily]]] = [
            ("hits", "chatbot_kv_hits", "Lookups served, by tier.", CounterMetricFamily),
            (
                "hit_tokens",
                "chatbot_kv_hit_tokens",
                "Prompt tokens served, by tier.",
                CounterMetricFamily,
            ),
            ("stores", "chatbot_kv_stores", "States saved, by tier.", CounterMetricFamily),
            (
                "evictions",
                "chatbot_kv_evictions",
                "States evicted to stay within the budget, by tier.",
                CounterMetricFamily,
            ),
            ("entries", "chatbot_kv_entries", "States held, by tier.", GaugeMetricFamily),
            ("bytes", "chatbot_kv_bytes", "Bytes held, by tier.", GaugeMetricFamily),
        ]
        for field, name, documentation, family_type in per_tier:
            family = family_type(name, documentation, labels=["tier"])
            for tier, tier_stats in stats.tiers.items():
                family.add_metric([tier.value], getattr(tier_stats, field))
            yield family
        budget = GaugeMetricFamily(
            "chatbot_kv_budget_bytes", "Most bytes a tier may hold.", labels=["tier"]
        )
        for tier, tier_stats in stats.tiers.items():
            if tier_stats.budget_bytes is not None:
                budget.add_metric([tier.value], tier_stats.budget_bytes)
        yield budget
