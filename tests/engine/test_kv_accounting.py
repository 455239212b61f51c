"""KV blocks under 200 mixed requests with aborts and forced preemption (see kv_stress.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from vllm import SamplingParams

from tests.engine.conftest import RULES, module_for_tests, token_prompts

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def stress(tmp_path_factory, model_dir, heldout_prompts):
    folder = tmp_path_factory.mktemp("kv")
    config = {"model_dir": model_dir, "rules": str(RULES), "module": module_for_tests(), "prompts": heldout_prompts}
    (folder / "config.json").write_text(json.dumps(config))
    subprocess.run(
        [sys.executable, "-m", "tests.engine.kv_stress", str(folder / "config.json"), str(folder / "result.json")],
        cwd=ROOT,
        check=True,
        timeout=1800,
    )
    return json.loads((folder / "result.json").read_text())


def test_blocks_held_stay_within_compressed_need(stress):
    assert stress["violations"] == []
    assert stress["max_blocks_over_need"] <= 1


def test_every_block_is_free_after_all_requests_end(stress):
    assert stress["free_at_end"] == stress["free_at_start"]


def test_preemption_and_aborts_happened(stress):
    assert len(stress["preempted_requests"]) >= 5, "KV space was not small enough to force preemption"
    assert len(stress["aborted"]) == 20
    everyone = {request_id for request_id, _, _ in stress["requests"]}
    assert everyone - set(stress["aborted"]) <= set(stress["finished"])


def test_preempted_requests_rebuild_the_same_sequence(stress, umim_llm):
    """Greedy outputs of preempted, finished requests equal an engine run that never preempts."""
    aborted = set(stress["aborted"])
    checked = [(r, p, params) for r, p, params in stress["requests"] if r in stress["preempted_requests"] and r not in aborted]
    assert checked
    outputs = umim_llm.generate(token_prompts([p for _, p, _ in checked]), [SamplingParams(**params) for *_, params in checked], use_tqdm=False)
    for (request_id, _, _), output in zip(checked, outputs):
        assert stress["finished"][request_id] == list(output.outputs[0].token_ids), request_id
