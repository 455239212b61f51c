"""The vllm-umim commands end to end on the real tokenizer and model (slow)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from vllm_umim.rules import load_rules

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "artifacts" / "smollm2-135m" / "rules.bin"


def vllm_umim(*args, check=True):
    result = subprocess.run([sys.executable, "-m", "vllm_umim.cli.main", *map(str, args)], capture_output=True, text=True, cwd=ROOT, timeout=900)
    if check:
        assert result.returncode == 0, result.stderr
    return result


@pytest.fixture(scope="module")
def model_dir():
    from vllm_umim.data.model import fetch_model

    return fetch_model("smollm2-135m")


def test_mine_and_inspect(model_dir, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("The United States of America is a country.\n" * 6 + "New York City is a city.\n" * 5)
    out = vllm_umim("mine", "--model", model_dir, "--corpus", corpus, "--threshold", "5", "-o", tmp_path / "r.bin")
    assert "4-grams:" in out.stdout and "kept after overlap filtering" in out.stdout
    rules = load_rules(tmp_path / "r.bin")
    assert rules.count(4) > 0 and rules.threshold == 5
    shown = vllm_umim("inspect", tmp_path / "r.bin", "--model", model_dir).stdout
    assert "most frequent 4-grams" in shown and "United States" in shown


def test_inspect_refuses_a_damaged_file(tmp_path):
    (tmp_path / "bad.bin").write_bytes(RULES.read_bytes()[:1000])
    result = vllm_umim("inspect", tmp_path / "bad.bin", check=False)
    assert result.returncode == 2 and "truncated" in result.stderr and "Traceback" not in result.stderr


def test_generate_reference_brackets_merged_spans(model_dir):
    prompt = "The United States of America is one of the largest countries in the world."
    out = vllm_umim(
        "generate", "--model", model_dir, "--rules", RULES, "--module", "mean", "--prompt", prompt, "--max-tokens", "12", "--dynamic",
    ).stdout
    text, _, summary = out.rpartition("\n-- reference: ")
    figures = re.match(r"(\d+) raw tokens -> (\d+) positions \(token reduction ([\d.]+) %; prefill merges (\d+), decode merges (\d+)\)", summary)
    raw, positions, tr, prefill, decode = int(figures[1]), int(figures[2]), float(figures[3]), int(figures[4]), int(figures[5])
    # the bracketed spans re-join to exactly the prompt followed by the generated text
    assert text.replace("[", "").replace("]", "").startswith(prompt)
    # one bracket pair per merge, and the reported TR is what the counts say
    assert text.count("[") == text.count("]") == prefill + decode and prefill > 0
    assert tr == pytest.approx(100 * (1 - positions / raw), abs=0.05)
    assert raw - positions >= prefill + decode  # every merge removes at least one position


def test_generate_with_the_engine_prints_results_only_on_stdout(model_dir):
    prompt = "The United States of America is one of the largest countries in the world."
    result = vllm_umim(
        "generate", "--model", model_dir, "--rules", RULES, "--module", "mean", "--prompt", prompt, "--max-tokens", "12",
        "--dynamic", "--engine", "vllm", "--enforce-eager",
    )
    text, _, summary = result.stdout.rpartition("\n-- vllm: ")
    assert text.replace("[", "").replace("]", "").startswith(prompt), result.stdout[:2000]
    assert "INFO" not in result.stdout and "WARNING" not in result.stdout
    assert "INFO" in result.stderr  # vLLM's log went to stderr
    assert re.match(r"\d+ raw tokens -> \d+ positions", summary)


def test_score_and_select_rules(model_dir, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("The United States of America is a country in North America.\n" * 12)
    module = ROOT / "artifacts" / "smollm2-135m" / "module.safetensors"
    scored = tmp_path / "scored.bin"
    out = vllm_umim("score-rules", "--model", model_dir, "--rules", RULES, "--module", module, "--corpus", corpus,
                    "--windows", 2, "--seq-len", 32, "--heldout", corpus, "--no-progress", "-o", scored).stdout
    assert "held-out:" in out and "most harmful frequent rules" in out
    rules = load_rules(scored)
    assert rules.scored and rules.fingerprint == load_rules(RULES).fingerprint
    assert "harm scores:" in vllm_umim("inspect", scored).stdout
    kept = vllm_umim("select-rules", "--rules", scored, "--max-harm", 0.5, "--unscored", "drop", "-o", tmp_path / "k.bin").stdout
    assert re.search(r"kept \d+ of 48187 rules", kept)
    tr = vllm_umim("select-rules", "--rules", scored, "--target-tr", 0.1, "--unscored", "drop", "--model", model_dir, "--corpus", corpus,
                   "-o", tmp_path / "t.bin").stdout
    before, after = map(float, re.search(r"TR ([\d.]+) % -> ([\d.]+) %", tr).groups())
    assert after <= 10.0 < before
    out_of_reach = vllm_umim("select-rules", "--rules", scored, "--target-tr", 0.1, "--model", model_dir, "--corpus", corpus,
                             "-o", tmp_path / "u.bin", check=False)  # the unscored rules alone merge more
    assert out_of_reach.returncode == 2 and "out of reach" in out_of_reach.stderr
    refused = vllm_umim("select-rules", "--rules", RULES, "--max-harm", 1, "-o", tmp_path / "x.bin", check=False)
    assert refused.returncode == 2 and "no harm scores" in refused.stderr


def test_teacher_cache_then_train_refuses_a_stale_cache_in_one_line(model_dir, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("The United States of America is a country in North America. New York City is a city.\n" * 40)
    common = ["--model", model_dir, "--rules", RULES, "--corpus", corpus, "--seq-len", 32, "--val-windows", 0, "--threads", 1,
              "--no-progress"]
    cache = tmp_path / "teacher"
    built = vllm_umim("teacher-cache", *common, "--k", 8, "--max-tokens", 128, "--cache-dir", cache)
    assert f"wrote {cache}" in built.stdout and (cache / "train" / "shard-00000.safetensors").is_file()
    # the same cache with another top-k: one line naming the cache and the setting, no traceback
    stale = vllm_umim("train", *common, "--k", 4, "--max-tokens", 128, "--cache-dir", cache, "-o", tmp_path / "m.safetensors",
                      check=False)
    assert stale.returncode == 2 and "Traceback" not in stale.stderr, stale.stderr[-2000:]
    assert stale.stderr.strip().splitlines()[-1] == (
        f"vllm-umim: error: teacher cache {cache / 'train'} was built with k=8, not 4; remove it or use another cache directory")
