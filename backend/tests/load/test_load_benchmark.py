"""The load benchmark end to end, small: a real server process on the simulated engine,
a few dozen users for a few seconds, and the report it makes."""

from __future__ import annotations

from benchmarks.load import run
from benchmarks.load_client import LAG_BUCKET_MS, LoadSettings
from benchmarks.load_report import report_lines


def test_a_short_load_run_reports_every_figure_and_no_errors() -> None:
    settings = LoadSettings(
        users=40,
        think_s=0.5,
        ramp_s=1.0,
        duration_s=3.0,
        answer_tokens=30,
        decode_tokens_per_s=200.0,
        stream_interval_ms=20.0,
        timeout_s=30.0,
    )
    result = run(settings)
    assert result["errors"] == {}
    assert result["error_count"] == 0
    assert result["conversations"] == 40
    assert result["messages"] >= 40, "every user sent at least one message"
    assert result["tokens_per_s"] > 0
    assert 1 <= result["max_open_streams"] <= 40
    timeout_ms = settings.timeout_s * 1000
    for figure in ("client_ttft_ms", "engine_ttft_ms"):
        assert 0 < result[figure]["p50"] <= result[figure]["p99"] < timeout_ms, result[figure]
    # The client's wait contains the engine's, request by request, so its quantiles do too.
    assert result["client_ttft_ms"]["p50"] >= result["engine_ttft_ms"]["p50"]
    added = result["added_ttft_ms"]
    assert added["p50"] <= added["p99"] < timeout_ms, added
    lag = result["token_lag_ms"]
    assert lag["tokens"] > 0
    assert LAG_BUCKET_MS <= lag["p50"] <= lag["p99"] <= lag["p999"], lag
    assert 0 < result["cached_share"] < 1
    assert result["server"]["rss_baseline_mib"] > 0
    assert result["server"]["cpu_cores"] > 0, "the server did work for 40 conversations"
    assert result["clients"]["processes"] == 1
    lines = report_lines({"think": result})
    assert lines[0].startswith("| run | users")
    assert any(line.startswith("| think | 40 |") for line in lines)
