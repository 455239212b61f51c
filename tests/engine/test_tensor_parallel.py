"""Tensor parallelism: with TP=2 every rank builds identical surrogates (the merge module is
replicated; the wrapped VocabParallelEmbedding all-reduces the span's token embeddings first), so
the engine still equals the HF reference. SmolLM2-135M has 9 heads (not divisible by 2), so this
uses a random 4-head Llama with SmolLM2's tokenizer, and rules that include the bigrams of its own
greedy output so that decode merges certainly happen."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.engine.conftest import RULES
from vllm_umim.module import MergeModule, MergeModuleConfig
from vllm_umim.reference import ReferenceRuntime
from vllm_umim.rules import RuleSet, load_rules, save_rules

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
PROMPT = "The United States of America is a country in North America, and New York City is"
MAX_TOKENS = 24

RUN_ENGINE = """
import json, os, sys
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "0|1"
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt
from vllm_umim import merge_stats
if __name__ == "__main__":
    model, rules, prompt, backend = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4]
    if backend == "ray":
        import ray
        os.environ.setdefault("RAY_memory_monitor_refresh_ms", "0")  # no OOM killer watching a shared machine
        ray.init(num_cpus=2, include_dashboard=False)
        os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address  # the EngineCore joins this instance
    llm = LLM(model=model, dtype="float32", enforce_eager=True, max_model_len=512, tensor_parallel_size=2,
              distributed_executor_backend=backend, additional_config={"umim": {"rules": rules, "module": "mean"}})
    out = llm.generate([TokensPrompt(prompt_token_ids=prompt)], SamplingParams(temperature=0, max_tokens=%d), use_tqdm=False)[0]
    print("RESULT " + json.dumps({"tokens": list(out.outputs[0].token_ids), "stats": merge_stats(out),
                                  "executor": str(llm.llm_engine.vllm_config.parallel_config.distributed_executor_backend)}), flush=True)
    llm.llm_engine.engine_core.shutdown()
""" % MAX_TOKENS


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, model_dir):
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-tp")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=49152, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.3, tie_word_embeddings=True,
        architectures=["LlamaForCausalLM"],
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(model_dir) / name, folder / name)
    return folder


@pytest.mark.parametrize("backend", ["mp", pytest.param("ray", marks=pytest.mark.skipif(
    __import__("importlib").util.find_spec("ray") is None, reason="ray is not installed"))])
def test_tp2_equals_reference(tiny_model_dir, tokenizer, tmp_path, backend):
    import json

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    prompt = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    base = load_rules(RULES)
    module = MergeModule(MergeModuleConfig(128))
    prompt_only = ReferenceRuntime(model, base, module, dynamic=False).generate(prompt, MAX_TOKENS)
    out = prompt_only.output_token_ids  # the dynamic run is identical up to its first decode merge
    bigrams = {tuple(out[i : i + 2]) for i in range(0, len(out) - 1, 2)} | set(map(tuple, base.ngrams[2].tolist()))
    rules = RuleSet(base.tokenizer_fingerprint, base.vocab_size, 1, {**base.ngrams, 2: np.array(sorted(bigrams), np.int32)}, {})
    rules.counts = {n: np.ones(len(t), np.uint32) for n, t in rules.ngrams.items()}
    save_rules(rules, tmp_path / "rules.bin")

    expected = ReferenceRuntime(model, load_rules(tmp_path / "rules.bin"), module, dynamic=True).generate(prompt, MAX_TOKENS)
    (tmp_path / "run.py").write_text(RUN_ENGINE)
    result = subprocess.run(
        [sys.executable, str(tmp_path / "run.py"), str(tiny_model_dir), str(tmp_path / "rules.bin"), json.dumps(prompt), backend],
        capture_output=True, text=True, cwd=ROOT, timeout=900,
    )
    line = next((text for text in result.stdout.splitlines() if text.startswith("RESULT ")), None)
    assert line, result.stderr[-3000:]
    engine = json.loads(line[len("RESULT "):])
    assert engine["stats"]["prefill_merges"] > 0 and engine["stats"]["decode_merges"] > 0
    assert engine["tokens"] == expected.output_token_ids
    assert engine["stats"]["positions"] == len(expected.elements)
    assert ("UmimCpuRayExecutor" in engine["executor"]) == (backend == "ray")
