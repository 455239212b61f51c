"""The soak run's verdict (``benchmarks.soak.verdict``) on synthetic samples: no server."""

import pytest

from benchmarks.soak import malformed_requests, rss_growth, thin, verdict

MIB = 2**20
GOOD = {"merged": {"200": 500}, "opt-out": {"200": 200}, "chat": {"200": 200}, "abort": {"200": 180},
        "malformed": {"400": 190, "422": 10}}


def samples(minutes=32, api_mib=(400, 400), engine_mib=(900, 900), spike_s=None):
    """One sample each 10 s; RSS rising linearly from the first to the second figure (MiB)."""
    out, n = [], int(minutes * 6) + 1
    for i in range(n):
        t, frac = i * 10.0, i / (n - 1)
        api = api_mib[0] + (api_mib[1] - api_mib[0]) * frac
        engine = engine_mib[0] + (engine_mib[1] - engine_mib[0]) * frac
        if spike_s is not None and t < spike_s:
            engine *= 1.5  # warm-up: compile buffers, freed later
        out.append({"t": t, "api_rss": api * MIB, "engine_rss": engine * MIB})
    return out


def judge(s, counts=GOOD, **kw):
    return verdict(s, counts, **{"kv_drained": True, "probe_equal": True, **kw})


def test_a_flat_run_passes_with_its_figures():
    result = judge(samples(spike_s=120))  # a warm-up spike does not count
    assert result["pass"] and result["failures"] == []
    assert result["rss"]["engine"]["growth"] == pytest.approx(0.0)
    assert result["rss"]["api"]["baseline_window_s"] == [300, 600]
    assert result["rss"]["api"]["final_window_s"] == [1620.0, 1920.0]
    assert result["rss"]["api"]["baseline_samples"] == result["rss"]["api"]["final_samples"] == 30
    assert result["server_errors_5xx"] == result["connection_errors"] == result["unexpected_statuses"] == 0


def test_growth_above_the_bound_fails_and_names_the_process():
    grown = judge(samples(engine_mib=(900, 900 * 1.05)))
    assert not grown["pass"]
    assert grown["rss"]["engine"]["growth"] > 0.02 and grown["rss"]["api"]["growth"] == pytest.approx(0.0)
    assert any(f.startswith("engine RSS grew") for f in grown["failures"])
    slight = judge(samples(api_mib=(400, 400 * 1.015)))  # about 1.2 % between the windows' medians
    assert slight["pass"] and 0 < slight["rss"]["api"]["growth"] < 0.02


def test_every_sampled_process_is_judged():
    with_worker = [{**s, "worker_rss": 1500 * MIB * (1 + 0.1 * s["t"] / 1920)} for s in samples()]
    result = judge(with_worker)
    assert set(result["rss"]) == {"api", "engine", "worker"}
    assert not result["pass"] and [f.split()[0] for f in result["failures"]] == ["worker"]


def test_a_single_5xx_fails():
    result = judge(samples(), {**GOOD, "chat": {"200": 199, "500": 1}})
    assert not result["pass"] and result["server_errors_5xx"] == 1
    assert result["failures"] == ["1 5xx responses"]


def test_connection_errors_stream_errors_and_wrong_statuses_fail():
    assert judge(samples(), {**GOOD, "merged": {"200": 499, "timeout": 1}})["connection_errors"] == 1
    assert judge(samples(), {**GOOD, "abort": {"200": 179, "stream_error": 1}})["failures"] == ["1 error events inside streams"]
    accepted_bad_input = judge(samples(), {**GOOD, "malformed": {"400": 199, "200": 1}})
    assert not accepted_bad_input["pass"] and accepted_bad_input["unexpected_statuses"] == 1
    refused_good_input = judge(samples(), {**GOOD, "merged": {"200": 499, "400": 1}})
    assert not refused_good_input["pass"] and refused_good_input["unexpected_statuses"] == 1


def test_undrained_kv_a_changed_probe_or_a_fault_fails():
    assert judge(samples(), kv_drained=False)["failures"] == ["KV cache not drained after the load stopped"]
    assert not judge(samples(), probe_equal=False)["pass"]
    assert judge(samples(), faults=2)["failures"] == ["2 UMIM request faults"]


def test_a_run_too_short_for_two_windows_is_not_a_pass():
    result = judge(samples(minutes=12))  # windows [5, 10) and [7, 12] minutes overlap
    assert not result["pass"] and result["rss"]["api"]["growth"] is None
    assert rss_growth([], "api_rss", 300, 300)["growth"] is None


def test_thin_keeps_ends_and_bounds_length():
    series = list(range(1000))
    thinned = thin(series, 100)
    assert len(thinned) == 100 and thinned[0] == 0 and thinned[-1] == 999 and thinned == sorted(thinned)
    assert thin(series[:50], 100) == series[:50]


def test_malformed_requests_cover_the_cases():
    names = [name for name, _, _ in malformed_requests("m", "p")]
    assert {"negative-window", "huge-window", "unknown-setting", "wrong-type", "broken-json"} <= set(names)
    assert len(names) == len(set(names))


def test_results_page_section_shows_the_verdict_and_both_tables(tmp_path, monkeypatch):
    import json

    from benchmarks import report

    result = judge(samples(), {**GOOD, "chat": {"200": 199, "500": 1}})
    soak = {"command": "python -m benchmarks.soak --minutes 32", "samples": samples(engine_mib=(900, 990)), "settings": {"clients": 6, "minutes": 32, "rules": "artifacts/x/max",
            "max_window": 32}, "requests_total": 1280, "cpu_count": 2, "requests": GOOD,
            "load_average": {"1m_during": {"min": 2.5, "median": 4.0, "max": 6.25}}, "verdict": result}
    (tmp_path / "soak.json").write_text(json.dumps(soak))
    monkeypatch.setattr(report, "RESULTS", tmp_path)
    text = "\n".join(report.soak_section())
    assert "Verdict **fail**: 1 5xx responses" in text and "5xx: 1;" in text
    assert "| UMIM | api | 400.0 | 400.0 | +0.00 % | +0.00 % |" in text
    # engine 900 -> 990 MiB linearly over 1920 s; the late column: last 5 min (median t 1775) against the 5 before (1465)
    engine = lambda t: 900 + 90 * t / 1920  # noqa: E731
    assert report.late_growth(soak, "engine") == pytest.approx(engine(1775) / engine(1465) - 1)
    assert "stock vLLM (control)" not in text
    assert "| requests | 200 | 400 | 422 | total |" in text and "| malformed | 0 | 190 | 10 | 200 |" in text
    monkeypatch.setattr(report, "RESULTS", tmp_path / "none")
    assert report.soak_section() == []
