"""benchmarks/oracle_divergence.py on the tiny random Llama: the path batch's last rows are the
continuation's, greedy decoding from embeddings is plain greedy decoding, fitting on the measured
path lowers the KL along it below the module's, a prompt without a merge is equal everywhere, and
bad ``--settings`` are one clear error before any model loads."""

from __future__ import annotations

import pytest
import torch

from benchmarks.oracle_divergence import (
    VARIANTS,
    DivergenceSettings,
    divergence_table,
    greedy,
    main,
    measure_prompt,
    summarize,
    with_continuation,
)
from tests.conftest import make_ruleset, tiny_llama
from vllm_umim.module.batches import collate
from vllm_umim.module.merge_module import MergeModule, MergeModuleConfig
from vllm_umim.policies import MergeSettings

PROMPT = [20, 1, 2, 21, 3, 4, 22, 5, 6, 7, 23, 24, 1, 2, 25, 26, 27, 3, 4]
FIT = DivergenceSettings(max_tokens=8, lr=3e-2, max_steps=20, patience=50, tol=0.01)


@pytest.fixture(scope="module")
def toy():
    model = tiny_llama().requires_grad_(False)
    torch.manual_seed(0)
    rules = make_ruleset([(1, 2), (3, 4), (5, 6, 7)])
    return model, MergeModule(MergeModuleConfig(32)).eval(), MergeSettings(mode="prompt", window=4).build(rules)


def test_greedy_from_embeddings_is_greedy_decoding(toy):
    model, _, _ = toy
    ids = torch.tensor([PROMPT])
    expected = model.generate(ids, max_new_tokens=6, do_sample=False, attention_mask=torch.ones_like(ids))[0, len(PROMPT):].tolist()
    assert greedy(model, model.get_input_embeddings()(ids[0]), 6) == expected


def test_path_batch_ends_with_the_continuation_rows(toy):
    _, _, policy = toy
    seg = policy.segment([PROMPT])[0]
    assert seg.num_merged == 4 and seg.rule_ids[-1] == -1  # the 4-token raw window: the last (3, 4) is not merged
    path = with_continuation(seg, [30, 31, 32])
    batch = collate([path])  # collate checks the App. C alignment
    assert batch.last_index[0, -4:].tolist() == [len(PROMPT) - 1 + i for i in range(4)]  # rows predicting continuation tokens 0..3


def test_fitting_on_the_path_lowers_its_kl(toy):
    model, module, _ = toy
    policy = MergeSettings(mode="prompt").build(make_ruleset([(1, 2), (3, 4), (5, 6, 7)]))  # a merge just before the path
    result = measure_prompt(model, module, policy, PROMPT, FIT)
    assert (result["tokens"], result["merged"]) == (len(PROMPT), 5)
    assert result["oracle-path"]["path_kl"] < 0.5 * result["module"]["path_kl"]
    assert all(0 <= result[v]["first_divergence"] <= FIT.max_tokens for v in VARIANTS)
    summary = summarize([result], FIT.max_tokens)
    assert summary["module"]["first_divergence"] == [result["module"]["first_divergence"]]
    kind = {"summary": summary, "prompts": 1, "prompt_tr": 0.25}
    result = {"max_tokens": 8, "settings": {"mode": "prompt", "window": 0}, "kinds": {"wiki": kind, "gsm8k": kind}}
    table = divergence_table({"a": result, "b": result})
    assert table.count("\n") == 7 and "| a (mode prompt) | 1 / 1 | 25.0 / 25.0 | the merge module" in table
    assert "oracle, fitted on the prompt's rows" in table and "(wiki / gsm8k)" in table
    with pytest.raises(ValueError, match="differ"):
        divergence_table({"a": result, "b": {**result, "max_tokens": 32}})


def test_a_prompt_without_a_merge_is_equal_in_every_variant(toy):
    model, module, policy = toy
    result = measure_prompt(model, module, policy, [20, 21, 22, 23, 24, 25], FIT)
    assert result["merged"] == 0
    assert all(result[v] == {"first_divergence": FIT.max_tokens, "path_kl": 0.0} for v in VARIANTS)


@pytest.mark.parametrize("settings", ['{"mode": "prompt"', '{"mode": "sometimes"}', '{"windo": 4}'])
def test_bad_settings_are_one_clear_error(settings, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--settings", settings, "--json", str(tmp_path / "out.json")])
    assert "--settings:" in capsys.readouterr().err and not (tmp_path / "out.json").exists()
