"""A tiny real run of ``vllm-umim bench``: two engines, the KV-bound scenario, one repetition
(fp32 eager to keep CI short; the benchmark's default is vLLM's defaults, checked below)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_help_passes_through_to_the_benchmark():
    cli = Path(sys.executable).with_name("vllm-umim")
    out = subprocess.run([cli, "bench", "--help"], capture_output=True, text=True, timeout=300).stdout
    assert "--scenario" in out and "--umim-rules" in out and "--max-model-len" in out


def test_engines_run_in_vllm_defaults_unless_told():
    from vllm_umim.cli.bench import bench_parser

    args = bench_parser().parse_args([])
    assert args.enforce_eager is None or args.enforce_eager is False
    assert args.dtype == "auto"
    eager = bench_parser().parse_args(["--enforce-eager", "--dtype", "float32"])
    assert eager.enforce_eager is True and eager.dtype == "float32"


def test_tiny_kv_bound_run(tmp_path):
    cli = Path(sys.executable).with_name("vllm-umim")
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "0-1"}
    argv = ["bench", "--scenario", "decode-heavy", "--num-prompts", "3", "--input-len", "32", "--output-len", "8",
            "--kv-blocks", "3", "--repetitions", "1", "--output-dir", str(tmp_path), "--enforce-eager", "--dtype", "float32"]
    done = subprocess.run([cli, *argv], capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "throughput.json").read_text())
    (scenario,) = report["scenarios"]
    assert scenario["name"] == "decode-heavy" and scenario["num_kv_blocks"] == 3
    assert len(scenario["runs"]["stock"]) == len(scenario["runs"]["umim"]) == 1
    for run in scenario["runs"]["stock"] + scenario["runs"]["umim"]:
        assert run["num_requests"] == 3 and run["output_tokens"] == 3 * 8
    assert scenario["runs"]["umim"][0]["merged_requests"] == 3 and scenario["runs"]["stock"][0]["merged_requests"] == 0
    stock, umim = scenario["runs"]["stock"][0], scenario["runs"]["umim"][0]
    assert stock["prompt_tokens"] == umim["prompt_tokens"] and stock["output_tokens"] == umim["output_tokens"]
    assert scenario["tokens_per_s_ratio"]["median"] == pytest.approx(umim["tokens_per_s"] / stock["tokens_per_s"])
    assert scenario["token_reduction"] == pytest.approx(umim["tokens_merged_away"] / umim["raw_tokens"]) and scenario["token_reduction"] > 0
    assert (tmp_path / "throughput.png").stat().st_size > 0
    table = (tmp_path / "throughput.md").read_text()
    assert "| decode-heavy |" in table and "dtype=float32, enforce_eager=True" in table
    assert set(scenario["startup_s"]) == {"stock", "umim"} and all(s > 0 for s in scenario["startup_s"].values())
