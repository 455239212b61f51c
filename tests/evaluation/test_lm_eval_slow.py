"""The lm-eval instrument end to end through vLLM at a tiny size: stock fp32 against the balanced
operating point on a log-likelihood task (ARC-Easy) and a generative one (NQ-open), 20 items each."""

import json
import os
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")
pytestmark = pytest.mark.slow

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0-1")

POINT = Path(__file__).resolve().parents[2] / "artifacts" / "smollm2-135m" / "balanced"
N = 20


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from vllm_umim.data.model import fetch_model
    from vllm_umim.evaluation import harness

    config = harness.LmEvalConfig(model=str(fetch_model("smollm2-135m")), output_dir=tmp_path_factory.mktemp("lm-eval"),
                                  systems=[*harness.stock_systems(("float32",)), harness.point_system(POINT)],
                                  tasks=("arc_easy", "nq_open"), limit=N, max_model_len=1024)
    return config, harness.run_lm_eval(config)


def test_results_pair_stock_and_the_point(run):
    config, results = run
    assert json.loads((Path(config.output_dir) / "results.json").read_text()) == results
    rows = {row["task"]: row for row in results["tasks"]}
    assert set(rows) == {"arc_easy", "nq_open"}
    for row in rows.values():
        stock, point = row["systems"]["stock-fp32"], row["systems"]["balanced"]
        assert stock["accuracy"]["n"] == point["accuracy"]["n"] == N
        paired = point["paired_vs_reference"]
        assert paired["low"] <= paired["estimate"] <= paired["high"] and paired["n"] == N
        assert paired["estimate"] == pytest.approx(point["accuracy"]["estimate"] - stock["accuracy"]["estimate"])
        assert stock["merge"].get("served_merged", 0) == 0  # stock is stock
        merge = point["merge"]  # every request of the point merged: log-likelihood ones included
        assert merge["served_merged"] == merge["requests"] > 0 and merge.get("served_unmerged", 0) == 0
        assert merge["prompt_token_reduction"] > 0.05
    assert "balanced − stock-fp32" in (Path(config.output_dir) / "results.md").read_text()


def test_a_rerun_skips_finished_tasks(run, monkeypatch):
    from vllm_umim.evaluation import harness

    config, results = run
    monkeypatch.setattr(harness, "_make_lm", lambda *a: pytest.fail("a finished task started an engine"))
    assert harness.run_lm_eval(config) == results


def test_stock_scoring_equals_lm_evals_own_vllm_backend(run):
    """UmimVLLM with umim=None scores log-likelihoods exactly as lm-eval's VLLM class does."""
    from lm_eval.models.vllm_causallms import VLLM

    from vllm_umim.data.qa import load_task
    from vllm_umim.evaluation import harness

    config, _ = run
    lm = harness._make_lm(config, harness.stock_systems(("float32",))[0])
    try:
        requests = []
        for item in load_task("arc_easy", limit=3):
            context = lm.tok_encode(item.context)
            requests += [(None, context, lm.tok_encode(item.context + c)[len(context):]) for c in item.choices]
        ours = lm._loglikelihood_tokens(requests, disable_tqdm=True)
        theirs = VLLM._loglikelihood_tokens(lm, requests, disable_tqdm=True)
        assert [greedy for _, greedy in ours] == [greedy for _, greedy in theirs]
        assert [lp for lp, _ in ours] == pytest.approx([lp for lp, _ in theirs], abs=1e-5)
    finally:
        lm.shutdown()
