"""The load benchmark end to end, small: a real server process on the simulated engine,
a few dozen users for a few seconds, and the report it makes."""

from __future__ import annotations

from benchmarks.load import LoadSettings, report_lines, run


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
    assert result["messages"] > 0
    assert result["tokens_per_s"] > 0
    assert result["max_open_streams"] >= 1
    for figure in ("added_ttft_ms", "client_ttft_ms", "engine_ttft_ms"):
        assert set(result[figure]) >= {"p50", "p99"}
        assert result[figure]["p50"] is not None
    assert result["token_lag_ms"]["tokens"] > 0
    assert result["token_lag_ms"]["p99"] is not None
    assert result["cached_share"] is not None
    assert 0 < result["cached_share"] < 1
    assert result["server"]["rss_baseline_mib"] > 0
    assert result["server"]["cpu_cores"] > 0, "the server did work for 40 conversations"
    assert result["clients"]["processes"] == 1
    lines = report_lines({"think": result})
    assert lines[0].startswith("| run | users")
    assert any(line.startswith("| think | 40 |") for line in lines)
