"""The capacity model: replicas of vLLM + LMCache from the simulated engine's costs."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
from benchmarks.capacity import Workload, plan
from benchmarks.cli import app
from typer.testing import CliRunner

BASE = Workload(users=10_000, messages_per_minute=1, context_tokens=4_000, hit_rate=0.8)


def test_a_hand_checked_example() -> None:
    # 10 requests/s of 1,000-token prompts, nothing cached, 100-token answers at 40/s:
    # prefill 38.0 ms each (the 1k calibration point); 25 streams at once, mean context
    # 1,050 tokens; per replica second, weights take 40 x 16.06 GB / 2.345 TB/s = 0.274,
    # so compute needs (10 x 0.0380 + 40 x 25 x 1,050 x 128 KiB / 2.345 TB/s) / (0.8 - 0.274)
    # = (0.380 + 0.0587) / 0.526 = 0.834 of a replica.
    workload = Workload(
        users=600,
        messages_per_minute=1,
        context_tokens=1_000,
        hit_rate=0.0,
        answer_tokens=100,
        tokens_per_s=40,
    )
    result = plan(workload)
    assert math.isclose(result.prefill_cold_s, 0.0380, abs_tol=1e-4)
    assert math.isclose(result.decoding_sequences, 25.0)
    assert math.isclose(result.needs["compute"], 0.834, abs_tol=2e-3)
    assert math.isclose(result.needs["sequences"], 25 / 256, abs_tol=1e-3)
    assert result.replicas == 1
    assert result.binding == "compute"
    assert plan(replace(workload, users=6_000)).replicas == 9


@pytest.mark.parametrize("users", [1, 100, 1_000, 10_000, 100_000])
def test_more_users_never_need_fewer_replicas(users: int) -> None:
    assert (
        plan(replace(BASE, users=users)).replicas <= plan(replace(BASE, users=users * 2)).replicas
    )


@pytest.mark.parametrize("context", [500, 2_000, 8_000, 32_000])
def test_longer_contexts_never_need_fewer_replicas(context: int) -> None:
    shorter = plan(replace(BASE, context_tokens=context))
    longer = plan(replace(BASE, context_tokens=context * 2))
    assert shorter.replicas <= longer.replicas
    assert shorter.needs["compute"] < longer.needs["compute"]


@pytest.mark.parametrize("context", [1_000, 4_000, 16_000])
@pytest.mark.parametrize("cpu_share", [0.0, 0.5, 1.0])
def test_a_higher_hit_rate_never_needs_more_replicas(context: int, cpu_share: float) -> None:
    rates = [i / 20 for i in range(21)]
    plans = [
        plan(replace(BASE, context_tokens=context, hit_rate=h, cpu_share=cpu_share)) for h in rates
    ]
    replicas = [p.replicas for p in plans]
    assert replicas == sorted(replicas, reverse=True)
    saved = [p.prefill_gpu_s_saved_per_s for p in plans]
    assert saved == sorted(saved)
    assert plans[-1].replicas_without_cache == plans[0].replicas


def test_the_binding_constraint_is_the_largest_need() -> None:
    # Long contexts and many slow streams: KV memory binds, not compute.
    result = plan(
        replace(BASE, context_tokens=32_000, hit_rate=0.95, tokens_per_s=5, answer_tokens=800)
    )
    assert result.binding == "kv_memory"
    assert result.replicas == math.ceil(max(result.needs.values()))


def test_an_unreachable_rate_and_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="out of reach"):
        plan(replace(BASE, tokens_per_s=200))
    with pytest.raises(ValueError, match="hit_rate"):
        Workload(users=1, messages_per_minute=1, context_tokens=100, hit_rate=1.5)


def test_the_command_prints_the_breakdown_and_refuses_bad_input() -> None:
    runner = CliRunner()
    base = ["capacity", "--users", "10000", "--messages-per-minute", "1"]
    printed = runner.invoke(app, [*base, "--context-tokens", "4000", "--hit-rate", "0.87"])
    assert printed.exit_code == 0, printed.output
    expected = plan(replace(BASE, hit_rate=0.87))
    assert f"-> {expected.replicas} replicas ({expected.binding} binds)" in printed.output
    assert f"with no cache: {expected.replicas_without_cache}" in printed.output
    refused = runner.invoke(app, [*base, "--context-tokens", "4000", "--hit-rate", "1.5"])
    assert refused.exit_code == 2
    assert "hit_rate must be between 0 and 1" in refused.output
