"""Every example in examples/ runs, at smoke size (CI): what a vLLM user copies must work.
(``examples/openai_client.py`` runs against the session's server: tests/server/test_example_client.py.)"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
ENV = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "0-1"}


def run(command: list[str], timeout: int = 900, **env) -> str:
    done = subprocess.run(command, cwd=REPO, env={**ENV, **env}, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def test_offline_generate():
    out = run([sys.executable, str(EXAMPLES / "offline_generate.py"), "--eager", "--max-tokens", "8"])
    assert "== opted out" in out and "unmerged" in out
    assert out.count("prompt merges") == 4  # merged and windowed, 2 prompts each


def test_vllm_bench_throughput(tmp_path):
    out = run(["bash", str(EXAMPLES / "vllm_bench_throughput.sh"), "8", "--enforce-eager", "--dtype", "float32"],
              OUTPUT_DIR=str(tmp_path))
    assert "UMIM / stock" in out and (tmp_path / "summary.json").is_file()


def test_bring_your_own_model(tmp_path):
    from vllm_umim.data.corpus import fetch_corpus

    corpus = tmp_path / "corpus"  # a slice of the wiki corpus: mining the whole split is not the point here
    corpus.mkdir()
    for split in ("train.txt", "heldout.txt"):
        lines = (fetch_corpus("wiki") / split).read_text().splitlines(keepends=True)[:1500]
        (corpus / split).write_text("".join(lines))
    run(["bash", str(EXAMPLES / "bring_your_own_model.sh"), str(tmp_path)], NO_SERVE="1", TOKENS="1024",
        EVAL_WINDOWS="2", FIDELITY_PROMPTS="2", CORPUS=str(corpus))
    for name in ("rules.bin", "module.safetensors", "eval.json", "fidelity.json"):
        assert (tmp_path / name).is_file(), name
