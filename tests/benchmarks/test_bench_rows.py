"""``vllm-umim bench --rows`` without engines: rows, their engine arguments, the figures and the table."""

import pytest

from vllm_umim.bench import rows as bench_rows
from vllm_umim.bench.summary import spread
from vllm_umim.errors import UmimError


@pytest.fixture
def points(tmp_path):
    for name in ("faithful", "max"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "rules.bin").write_bytes(b"")
    return tmp_path


def test_rows_name_stock_or_a_point_with_modifiers(points):
    row = bench_rows.parse_row("max+fp8", points_dir=points)
    assert (row.umim, row.fp8, row.ngram, row.base) == (str(points / "max"), True, False, "stock+fp8")
    stock = bench_rows.parse_row("stock+ngram+fp8", points_dir=points)
    assert (stock.umim, stock.fp8, stock.ngram, stock.base) == (None, True, True, "stock+fp8+ngram")
    assert bench_rows.parse_row("umim", umim_rules="r.bin", points_dir=points).umim == "r.bin"
    pair = bench_rows.parse_row("max+ngram", points_dir=points)  # UMIM composes with n-gram speculation
    assert (pair.umim, pair.fp8, pair.ngram, pair.base) == (str(points / "max"), False, True, "stock+ngram")
    kwargs = bench_rows.row_engine_kwargs(pair, {"model": "m"})
    assert kwargs["speculative_config"] == bench_rows.NGRAM and kwargs["additional_config"]["umim"]["rules"] == str(points / "max")


@pytest.mark.parametrize("text,match", [
    ("max+int4", "modifiers are fp8 and ngram"),
    ("max+fp8+fp8", "each at most once"),
    ("fast", r"neither 'stock', 'umim', an operating point \(faithful, max\) nor a path"),
    ("umim", "needs --umim-rules"),
])
def test_bad_rows_are_refused_with_one_line(points, text, match):
    with pytest.raises(UmimError, match=match):
        bench_rows.parse_row(text, points_dir=points)


def test_row_engine_arguments_add_only_what_the_row_names():
    common = {"model": "m", "max_model_len": 1024, "additional_config": {"umim": {"rules": "r.bin"}, "other": 1}}
    stock = bench_rows.row_engine_kwargs(bench_rows.Row("stock"), common)
    assert stock == {"model": "m", "max_model_len": 1024, "additional_config": {"other": 1}}
    both = bench_rows.row_engine_kwargs(bench_rows.Row("max+fp8", umim="pt", fp8=True), common, kv_blocks=20)
    assert both["additional_config"] == {"other": 1, "umim": {"rules": "pt"}} and both["kv_cache_dtype"] == "fp8"
    assert both["num_gpu_blocks_override"] == 40  # the same bytes as 20 bf16 blocks
    fp32 = bench_rows.row_engine_kwargs(bench_rows.Row("stock+fp8", fp8=True), {**common, "dtype": "float32"}, kv_blocks=20)
    assert fp32["num_gpu_blocks_override"] == 80
    ngram = bench_rows.row_engine_kwargs(bench_rows.Row("stock+ngram", ngram=True), common, kv_blocks=20)
    assert ngram["speculative_config"] == bench_rows.NGRAM and ngram["num_gpu_blocks_override"] == 20
    assert "kv_cache_dtype" not in ngram


def test_first_differences_count_to_the_first_differing_token():
    figures = bench_rows.first_differences([[1, 2, 3], [1, 9, 3], [5, 5, 5]], [[1, 2, 3], [1, 2, 3], [4, 5, 5]])
    assert figures["first_difference_mean"] == pytest.approx((3 + 1 + 0) / 3)
    assert figures["equal_share"] == pytest.approx(1 / 3) and figures["requests"] == 3


def run(elapsed, steps, repetition, beside, tokens_per_s=None, **merge):
    return {"elapsed_s": elapsed, "steps": steps, "repetition": repetition, "beside": beside,
            "tokens_per_s": tokens_per_s or 1000 / elapsed, "merged_requests": 1 if merge else 0, "prefill_merges": 0,
            "decode_merges": 0, "peak_kv_blocks": None, "num_kv_blocks": None, "preemptions": 0, **merge}


def stock_and_max(stock_s=(10.0, 10.0), max_s=(8.0, 8.0)):
    """Rows, full runs (two repetitions, seconds given) and prefill-only runs of stock beside max."""
    rows = [bench_rows.Row("stock"), bench_rows.Row("max", umim="pt")]
    merged = dict(prompt_positions=60, raw_prompt_tokens=100, positions=80, raw_tokens=100)
    runs = {"stock": [run(t, 33, i, "max") for i, t in enumerate(stock_s)],
            "max": [run(t, 33, i, "max", **merged) for i, t in enumerate(max_s)]}
    prefill = {"stock": [run(4.0, 1, 0, "max"), run(4.0, 1, 1, "max")], "max": [run(3.0, 1, 0, "max"), run(3.0, 1, 1, "max")]}
    return rows, runs, prefill


def test_split_limit_and_ratios_from_paired_runs():
    rows, runs, prefill = stock_and_max()
    stock, umim = bench_rows.summarize_rows(rows, runs, prefill, fidelity={})
    assert stock["ratio"]["median"] == 1.0 and umim["ratio"]["median"] == pytest.approx(1.25)
    assert stock["time"]["prefill_share"] == pytest.approx(0.4) and stock["time"]["decode_step_ms"] == pytest.approx(6000 / 32)
    # stock 10 s = 4 s prefill + 6 s decode; free merged positions: 4 x 0.6 + 6 x 0.8 = 7.2 s
    assert umim["limit"] == pytest.approx(10 / 7.2) and umim["ratio_to_limit"] == pytest.approx(1.25 / (10 / 7.2))
    assert umim["token_reduction"] == pytest.approx(0.2) and umim["prompt_token_reduction"] == pytest.approx(0.4)
    assert umim["decode_step_ms_above_base"] == pytest.approx((5000 - 6000) / 32)
    assert "limit" not in stock and umim["base"]["row"] == "stock"
    assert umim["phase_speedup"] == pytest.approx({"prefill": 4 / 3, "decode": 6 / 5})
    again = bench_rows.resummarize({"scenarios": [{"rows": [{**stock, "fidelity": None}, umim], "runs": runs, "prefill_runs": prefill}]})
    assert again["scenarios"][0]["rows"][1]["limit"] == pytest.approx(umim["limit"])
    scenario = {"scenario": {"name": "natural"}, "rows": [stock, umim], "command": "c", "when": "w",
                "load_average_start": [1], "load_average_1_5_15": [1]}
    table = bench_rows.markdown({"scenarios": [scenario], "cpu_count": 2})
    assert "| natural | max | 1.250 [1.250–1.250] (2) | 1.39 | 90 % | – | – | 20.0 % | 38 % | 1.33 / 1.20 | 32 | 156.2 |" in table


def test_twin_requests_end_with_the_merged_requests_positions():
    prompts = [list(range(100)), list(range(50)), list(range(10))]
    # positions at the end (prompt + output, merges counted), output length 20
    twins = bench_rows.twin_prompts(prompts, [90, 70, 15], output_len=20)
    assert twins == [list(range(70)), list(range(50)), [0]]  # unmerged: whole prompt; never empty
    with pytest.raises(ValueError):
        bench_rows.twin_prompts(prompts, [90, 70], output_len=20)


def test_the_measured_limit_is_stock_time_over_the_twin_time_of_the_same_repetition():
    rows, runs, prefill = stock_and_max(stock_s=(10.0, 12.0), max_s=(8.0, 9.0))
    twins = {"max": [run(8.0, 33, 0, "max"), run(8.0, 33, 1, "max")]}
    stock, umim = bench_rows.summarize_rows(rows, runs, prefill, fidelity={}, twin_runs=twins)
    assert "measured_limit" not in stock
    assert (umim["measured_limit"]["min"], umim["measured_limit"]["max"]) == pytest.approx((10 / 8, 12 / 8))
    assert umim["ratio_to_measured_limit"] == pytest.approx(umim["ratio"]["median"] / umim["measured_limit"]["median"])
    again = bench_rows.resummarize({"scenarios": [{"rows": [{**stock, "fidelity": None}, umim], "runs": runs,
                                                   "prefill_runs": prefill, "twin_runs": twins}]})
    assert again["scenarios"][0]["rows"][1]["measured_limit"] == umim["measured_limit"]
    cells = bench_rows.row_cells("natural", umim)
    assert cells[5:7] == ["1.38 [1.25–1.50]", f"{100 * umim['ratio_to_measured_limit']:.0f} %"]


def test_the_limit_of_a_row_over_fp8_starts_from_stock_fp8():
    rows = [bench_rows.Row("stock"), bench_rows.Row("stock+fp8", fp8=True), bench_rows.Row("max+fp8", umim="pt", fp8=True)]
    merged = dict(prompt_positions=50, raw_prompt_tokens=100, positions=50, raw_tokens=100)
    runs = {"stock": [run(10.0, 33, 0, "stock+fp8"), run(10.0, 33, 0, "max+fp8")],
            "stock+fp8": [run(5.0, 33, 0, "stock+fp8")], "max+fp8": [run(4.0, 33, 0, "max+fp8", **merged)]}
    prefill = {name: [run(1.0, 1, 0, r["beside"]) for r in rs] for name, rs in runs.items()}
    summaries = {s["row"]: s for s in bench_rows.summarize_rows(rows, runs, prefill, fidelity={})}
    # stock+fp8 runs 2x stock; half the positions gone would halve its time: 4x stock
    assert summaries["max+fp8"]["limit"] == pytest.approx(4.0) and summaries["max+fp8"]["ratio"]["median"] == pytest.approx(2.5)


def test_spread_gives_the_mean_a_t_interval():
    figures = spread([0.98, 1.0, 1.02])
    assert figures["mean"] == pytest.approx(1.0) and figures["ci95"] == pytest.approx(4.303 * 0.02 / 3 ** 0.5, rel=1e-3)
    assert spread([1.0])["ci95"] is None


def test_an_earlier_run_keeps_the_scenarios_not_run_again(tmp_path):
    path = tmp_path / "rows.json"
    assert bench_rows.kept_scenarios(path, {"model": "m"}, ["natural"]) == []
    earlier = [{"scenario": {"name": "natural"}}, {"scenario": {"name": "decode-heavy"}}]
    path.write_text(__import__("json").dumps({"engine_kwargs": {"model": "m"}, "scenarios": earlier}))
    assert bench_rows.kept_scenarios(path, {"model": "m"}, ["natural"]) == [{"scenario": {"name": "decode-heavy"}}]
    assert bench_rows.kept_scenarios(path, {"model": "other"}, ["natural"]) == []  # other engine arguments: start afresh
