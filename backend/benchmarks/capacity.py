"""How many vLLM + LMCache GPU replicas a chat workload needs.

The costs are the simulated engine's (``chatbot.engines.simulated.GpuModel``: Llama-3.1-8B
in bf16 on one H100 80 GB), so the load tests and this model share one source of truth.
Assumptions, all stated in ``python -m benchmarks capacity --help`` too:

- Requests arrive evenly: ``users x messages_per_minute / 60`` a second. Every request
  carries ``context_tokens`` of prompt (system prompt, documents, the conversation so far)
  and is answered with ``answer_tokens``, each stream at ``tokens_per_s``.
- ``hit_rate`` of the prompt tokens are found in the KV cache; ``cpu_share`` of those come
  from LMCache's CPU RAM and are copied to the GPU (the rest are still in the GPU's own
  prefix cache, free). The rest of the prompt is prefilled, attending to all of it.
- Decode is memory-bound: a step reads the weights once and every running sequence's KV,
  and a replica steps ``tokens_per_s`` times a second so that each stream gets that rate.
  Prefill and decode share the GPU's time (chunked prefill), up to ``utilisation`` of it;
  the rest is headroom for bursts.
- A running sequence holds its whole KV on the GPU (prompt and answer); a replica runs at
  most ``max_sequences`` at once (vLLM's ``--max-num-seqs``).
- Session affinity keeps a conversation on its replica, so the hit rate does not fall as
  replicas are added; the API tier and the network are not counted.

Replicas = the largest of what compute, KV memory and the sequence limit each need; the
printed breakdown says which one binds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Annotated, Any

import typer

from chatbot.engines.simulated import GpuModel


@dataclass(frozen=True, slots=True)
class Workload:
    users: int
    messages_per_minute: float
    """Messages each user sends a minute."""
    context_tokens: int
    """Prompt tokens of a request."""
    hit_rate: float
    """Share of the prompt tokens found in the KV cache."""
    answer_tokens: int = 200
    tokens_per_s: float | None = None
    """Decode rate each stream must get; None: the model's ``decode_tokens_per_s``."""
    cpu_share: float = 0.5
    """Share of the cached tokens that LMCache copies in from CPU RAM."""
    utilisation: float = 0.8
    """Share of a replica's time that may be busy."""

    def __post_init__(self) -> None:
        if self.users < 0 or self.messages_per_minute < 0:
            raise ValueError("users and messages per minute cannot be negative")
        if self.context_tokens < 1 or self.answer_tokens < 1:
            raise ValueError("context and answer need at least one token")
        for name in ("hit_rate", "cpu_share"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be between 0 and 1")
        if not 0 < self.utilisation <= 1:
            raise ValueError("utilisation must be in (0, 1]")


@dataclass(frozen=True, slots=True)
class Plan:
    replicas: int
    binding: str
    """The constraint that sets ``replicas``: compute, kv_memory or sequences."""
    needs: dict[str, float]
    """Replicas each constraint alone would need (fractional)."""
    requests_per_s: float
    prefill_cold_s: float
    """One request's prefill with nothing cached."""
    prefill_s: float
    """One request's prefill at the hit rate, copies from CPU RAM included."""
    prefill_gpu_s_saved_per_s: float
    """GPU-seconds of prefill the hit rate saves, every second."""
    decoding_sequences: float
    """Streams being answered at once, over all replicas."""
    decode_step_s: float
    """One decode step on a replica at that load."""
    decode_gpu_share: float
    """Share of a replica's time spent decoding."""
    prefill_gpu_share: float
    kv_bytes_per_sequence: float
    replicas_without_cache: int

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__slots__}


def decode_step_s(gpu: GpuModel, sequences: float, context_tokens: float) -> float:
    """One decode step: memory-bound, it reads the weights once and every running
    sequence's KV."""
    kv = sequences * context_tokens * gpu.kv_bytes_per_token
    return (gpu.weight_bytes + kv) / gpu.hbm_bytes_per_s


def _needs(workload: Workload, gpu: GpuModel) -> tuple[dict[str, float], dict[str, float]]:
    rate = workload.tokens_per_s or gpu.decode_tokens_per_s
    requests = workload.users * workload.messages_per_minute / 60
    cached = round(workload.hit_rate * workload.context_tokens)
    uncached = workload.context_tokens - cached
    cold = gpu.prefill_s(0, workload.context_tokens)
    warm = gpu.prefill_s(cached, uncached) + gpu.load_s(round(cached * workload.cpu_share))
    # Loading more than recomputing would cost is never done: the engine would recompute.
    prefill = min(warm, cold)
    sequences = requests * workload.answer_tokens / rate  # Little's law
    context = workload.context_tokens + workload.answer_tokens / 2  # mean, while decoding
    weights_share = rate * gpu.weight_bytes / gpu.hbm_bytes_per_s
    headroom = workload.utilisation - weights_share
    if headroom <= 0:
        raise ValueError(
            f"{rate:g} tokens/s per stream is out of reach: reading the weights alone "
            f"takes {weights_share:.0%} of a replica's time"
        )
    kv_read = rate * sequences * context * gpu.kv_bytes_per_token / gpu.hbm_bytes_per_s
    kv_per_sequence = (workload.context_tokens + workload.answer_tokens) * gpu.kv_bytes_per_token
    needs = {
        # Per replica: prefill share + rate x step(n) <= utilisation, solved for replicas.
        "compute": (requests * prefill + kv_read) / headroom,
        "kv_memory": sequences * kv_per_sequence / gpu.kv_budget_bytes,
        "sequences": sequences / gpu.max_sequences,
    }
    facts = {
        "rate": rate,
        "requests": requests,
        "cold": cold,
        "prefill": prefill,
        "sequences": sequences,
        "context": context,
        "kv_per_sequence": kv_per_sequence,
    }
    return needs, facts


def plan(workload: Workload, gpu: GpuModel | None = None) -> Plan:
    gpu = gpu or GpuModel()
    needs, f = _needs(workload, gpu)
    binding = max(needs, key=lambda name: needs[name])
    replicas = max(1, math.ceil(needs[binding] - 1e-9)) if workload.users else 0
    per_replica = f["sequences"] / replicas if replicas else 0.0
    step = decode_step_s(gpu, per_replica, f["context"]) if replicas else 0.0
    cold_needs, _ = _needs(replace(workload, hit_rate=0.0), gpu)
    without = max(1, math.ceil(max(cold_needs.values()) - 1e-9)) if workload.users else 0
    return Plan(
        replicas=replicas,
        binding=binding,
        needs={k: round(v, 3) for k, v in needs.items()},
        requests_per_s=round(f["requests"], 3),
        prefill_cold_s=round(f["cold"], 5),
        prefill_s=round(f["prefill"], 5),
        prefill_gpu_s_saved_per_s=round(f["requests"] * (f["cold"] - f["prefill"]), 3),
        decoding_sequences=round(f["sequences"], 1),
        decode_step_s=round(step, 5),
        decode_gpu_share=round(f["rate"] * step, 3),
        prefill_gpu_share=round(f["requests"] * f["prefill"] / replicas, 3) if replicas else 0.0,
        kv_bytes_per_sequence=f["kv_per_sequence"],
        replicas_without_cache=without,
    )


def describe(workload: Workload, result: Plan, gpu: GpuModel | None = None) -> list[str]:
    """The breakdown, as printed lines."""
    gpu = gpu or GpuModel()
    rate = workload.tokens_per_s or gpu.decode_tokens_per_s
    cached = round(workload.hit_rate * workload.context_tokens)
    gib = 1024**3
    return [
        f"Workload: {workload.users:,} users x {workload.messages_per_minute:g} messages/min = "
        f"{result.requests_per_s:,.1f} requests/s; {workload.context_tokens:,}-token prompts, "
        f"{workload.hit_rate:.0%} cached ({cached:,} tokens, {workload.cpu_share:.0%} of them "
        f"from CPU RAM); {workload.answer_tokens}-token answers at {rate:g} tokens/s each.",
        f"Prefill per request: {result.prefill_cold_s * 1000:.1f} ms cold, "
        f"{result.prefill_s * 1000:.1f} ms at the hit rate: the cache saves "
        f"{result.prefill_gpu_s_saved_per_s:,.2f} GPU-seconds of prefill every second "
        f"(about {result.prefill_gpu_s_saved_per_s / workload.utilisation:,.1f} replicas' "
        "worth).",
        f"Decode: {result.decoding_sequences:,.0f} streams at once; on each of "
        f"{result.replicas} replicas a step takes {result.decode_step_s * 1000:.1f} ms "
        f"(weights {gpu.weight_bytes / 1e9:.1f} GB + KV), {result.decode_gpu_share:.0%} of its "
        f"time; prefill takes {result.prefill_gpu_share:.0%}.",
        f"KV per running sequence: {result.kv_bytes_per_sequence / gib:.2f} GiB; a replica holds "
        f"{gpu.kv_budget_bytes / gib:.0f} GiB of KV and at most {gpu.max_sequences} sequences.",
        "Replicas each constraint needs: "
        + ", ".join(f"{name} {value:,.2f}" for name, value in result.needs.items())
        + f" -> {result.replicas} replicas ({result.binding} binds); with no cache: "
        f"{result.replicas_without_cache}.",
    ]


def command(
    users: Annotated[int, typer.Option(help="Users of the service.")],
    messages_per_minute: Annotated[
        float, typer.Option(help="Messages each user sends a minute (at the busy hour).")
    ],
    context_tokens: Annotated[
        int, typer.Option(help="Prompt tokens of a request: system prompt, documents, history.")
    ],
    hit_rate: Annotated[float, typer.Option(help="Share of prompt tokens found in the cache.")],
    answer_tokens: Annotated[int, typer.Option(help="Tokens of an answer.")] = 200,
    tokens_per_s: Annotated[
        float | None, typer.Option(help="Decode rate each stream must get; default 40.")
    ] = None,
    cpu_share: Annotated[
        float, typer.Option(help="Share of cached tokens copied in from LMCache's CPU RAM.")
    ] = 0.5,
    utilisation: Annotated[
        float, typer.Option(help="Share of a replica's time that may be busy.")
    ] = 0.8,
) -> None:
    """How many vLLM + LMCache replicas (Llama-3.1-8B bf16, one H100 each) a workload
    needs, from the simulated engine's timing model: prefill (38/138/614 ms at 1k/4k/16k
    tokens), KV copies from CPU RAM (54 GB/s, 128 KiB a token), memory-bound decode (3.35
    TB/s at 70 %), ~50 GiB of KV and 256 sequences a replica.

    Assumes: requests spread evenly; every request carries the whole context; the hit rate
    holds as replicas are added (session affinity); prefill and decode share a replica's
    time up to --utilisation; a running sequence keeps its prompt and answer's KV on the
    GPU; the API tier and network are not counted. Replicas = the largest of what compute,
    KV memory and the sequence limit need (see benchmarks/capacity.py)."""
    try:
        workload = Workload(
            users=users,
            messages_per_minute=messages_per_minute,
            context_tokens=context_tokens,
            hit_rate=hit_rate,
            answer_tokens=answer_tokens,
            tokens_per_s=tokens_per_s,
            cpu_share=cpu_share,
            utilisation=utilisation,
        )
        result = plan(workload)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    typer.echo("\n".join(describe(workload, result)))
