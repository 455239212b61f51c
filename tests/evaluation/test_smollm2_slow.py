"""End to end on the real SmolLM2-135M (slow): teacher cache -> 3 training steps -> eval + QA."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

ARTIFACT_RULES = Path(__file__).resolve().parents[2] / "artifacts" / "smollm2-135m" / "rules.bin"


@pytest.mark.slow
def test_train_and_eval_smollm2(tmp_path):
    from vllm_umim.cli.main import main
    from vllm_umim.data import fetch_corpus, fetch_model

    if not ARTIFACT_RULES.exists():
        pytest.skip("no shipped rules")
    torch.set_num_threads(1)
    model, corpus = fetch_model(), fetch_corpus()
    out = tmp_path / "module.safetensors"
    common = ["--model", str(model), "--rules", str(ARTIFACT_RULES), "--threads", "1", "--no-progress"]
    assert main(["train", *common, "--corpus", str(corpus / "train.txt"), "-o", str(out), "--max-tokens", "1536",
                 "--seq-len", "128", "--batch-size", "4", "--val-windows", "2", "--eval-every", "3",
                 "--checkpoint-every", "3"]) == 0
    log = [json.loads(x) for x in (tmp_path / "module.safetensors.run" / "log.jsonl").read_text().splitlines()]
    vals = [r["val_loss"] for r in log if "val_loss" in r]
    assert vals[-1] < vals[0]  # distillation moves away from the mean-pooling start
    from vllm_umim.module.file_format import read_metadata

    assert read_metadata(out)["training"]["tokens_seen"] == 1536
    report = tmp_path / "eval.json"
    assert main(["eval", *common, "--module", str(out), "--corpus", str(corpus / "heldout.txt"), "--windows", "1",
                 "--seq-len", "128", "--tr-documents", "20", "--qa", "--limit", "2", "--tasks", "copa",
                 "--json", str(report)]) == 0
    res = json.loads(report.read_text())
    assert set(res["heldout"]["modules"]) == {"trained", "mean"}
    assert 0.2 < res["heldout"]["tr"] < 0.6 and res["heldout"]["base_ppl"] > 1
    assert res["qa"]["copa"]["n"] == 2 and set(res["qa"]["copa"]["accuracy"]) == {"base", "trained", "mean"}
