"""The ceiling measurement on the tiny random Llama: the per-occurrence oracle lowers the divergence
below the module's, a per-rule table fitted on training windows is the only source of held-out
vectors besides the module fallback, coverage and fallback counts match a direct count, and a rerun
skips finished variants."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.conftest import make_ruleset, tiny_llama
from vllm_umim.errors import CeilingError
from vllm_umim.evaluation.ceiling import (
    CeilingConfig,
    CeilingData,
    Split,
    Table,
    evaluate,
    fit_table,
    key_counts,
    measure_ceiling,
    module_surrogates,
    oracle_batch,
    teacher_logprobs,
    student_logprobs,
    mean_kl,
)
from vllm_umim.module.merge_module import MergeModule, MergeModuleConfig

RULES = [(1, 2), (3, 4), (5, 6, 7), (40, 41)]  # (40, 41) occurs only in held-out windows below


def rule_id(rules, tokens) -> int:
    return next(i for i, row in enumerate(rules.padded.tolist()) if tuple(t for t in row if t >= 0) == tuple(tokens))


def windows(count: int, seed: int, extra: tuple[int, ...] = ()) -> list[list[int]]:
    """Windows of random filler tokens (12..39) with the training rules (and ``extra``) mixed in."""
    rng = np.random.default_rng(seed)
    pieces = [[1, 2], [3, 4], [5, 6, 7]] + ([list(extra)] if extra else [])
    out = []
    for _ in range(count):
        w = [int(t) for t in rng.integers(12, 40, 2)]
        while len(w) < 32:
            w += pieces[int(rng.integers(len(pieces)))] + [int(t) for t in rng.integers(12, 40, 2)]
        out.append(w[:32])
    return out


@pytest.fixture(scope="module")
def toy():
    model = tiny_llama()
    for p in model.parameters():
        p.requires_grad_(False)
    torch.manual_seed(0)
    module = MergeModule(MergeModuleConfig(32)).eval()  # mean pooling
    rules = make_ruleset(RULES)
    return model, module, rules


def config(tmp_path, **kw) -> CeilingConfig:
    base = dict(model="m", rules="r", module="mod", heldout_corpus="h", train_corpus="t", out=str(tmp_path / "ceiling.json"),
                scratch_dir=str(tmp_path / "scratch"), variants=("module", "rule", "context1", "oracle"), seq_len=32,
                heldout_windows=6, train_windows=8, val_windows=4, batch_windows=4, oracle_max_steps=15, fit_lr=3e-2,
                rule_epochs=3, context_epochs=2, threads=None)
    base.update(kw)
    return CeilingConfig(**base)


def test_oracle_lowers_kl_below_the_module(toy):
    model, module, rules = toy
    split = Split.build(windows(4, 1, (40, 41)), rules, 4)
    batch = split.batches[0]
    init = module_surrogates(model, batch, module)
    teacher = teacher_logprobs(model, batch)
    start = float(mean_kl(teacher, student_logprobs(model, batch, init)))
    vectors, curve, reason = oracle_batch(model, batch, init, lr=3e-2, max_steps=20, patience=50, tol=0.01)
    assert curve[0] == pytest.approx(start, rel=1e-5)  # step 0 is the module's surrogate
    assert reason == "max_steps" and len(curve) == 21
    end = float(mean_kl(teacher, student_logprobs(model, batch, vectors)))
    assert end == pytest.approx(min(curve), rel=1e-4)
    assert end < 0.5 * start


def test_oracle_stops_on_a_plateau(toy):
    model, module, rules = toy
    batch = Split.build(windows(2, 3), rules, 4).batches[0]
    _, curve, reason = oracle_batch(model, batch, module_surrogates(model, batch, module), lr=1e-9, max_steps=50, patience=3, tol=0.01)
    assert reason == "plateau" and len(curve) == 4  # nothing moves: steps 0..3, then it stops


def test_heldout_uses_only_training_fitted_vectors_and_counts_fallbacks(toy):
    model, module, rules = toy
    train = Split.build(windows(8, 2), rules, 4)
    heldout = Split.build(windows(6, 5, (40, 41)), rules, 4)
    counts = key_counts(train, 0)
    unseen = rule_id(rules, (40, 41))
    assert set(counts) == {0, 1, 2, 3} - {unseen}  # (40, 41) never occurs in training
    base = [module_surrogates(model, b, module) for b in train.batches]
    init = {r: base_vec for r, base_vec in _first_vectors(train, base).items()}
    table = Table({r: i for i, r in enumerate(sorted(counts))}, torch.stack([init[r] for r in sorted(counts)]), counts)
    fitted, fit = fit_table(model, train, None, 0, table, lambda split, i: base[i], epochs=2, lr=3e-2, seed=0, teacher_cache={},
                            log=lambda *_: None)
    assert fit["kept_epoch"] == 2 and not torch.allclose(fitted.vectors, table.vectors)
    held_base = [module_surrogates(model, b, module) for b in heldout.batches]
    n_rule3 = n_other = 0
    for i in range(len(heldout.batches)):
        keys = heldout.occurrence_keys(i, 0)
        applied = fitted.apply(keys, held_base[i])
        for s, key in enumerate(keys):
            if key == unseen:  # unseen in training: exactly the module's surrogate
                assert torch.equal(applied[s], held_base[i][s])
                n_rule3 += 1
            else:  # seen: exactly the vector fitted on training windows
                assert torch.equal(applied[s], fitted.vectors[fitted.index[key]])
                n_other += 1
    assert n_rule3 > 0 and n_other > 0
    direct = sum(1 for s in heldout.segs for r in s.rule_ids if r == unseen)
    assert n_rule3 == direct


def _first_vectors(split: Split, base: list[torch.Tensor]) -> dict:
    out = {}
    for i in range(len(split.batches)):
        for s, key in enumerate(split.occurrence_keys(i, 0)):
            out.setdefault(key, base[i][s])
    return out


def test_measure_ceiling_end_to_end_and_resume(toy, tmp_path):
    model, module, rules = toy
    data = CeilingData(model, rules, module, windows(6, 5, (40, 41)), windows(8, 2), windows(4, 9))
    cfg = config(tmp_path)
    result = measure_ceiling(cfg, data, log=lambda *_: None)
    v = result["variants"]
    assert list(v) == ["module", "rule", "context1", "oracle"]
    held = result["data"]["heldout"]
    assert held["windows"] == 6 and held["tokens"] == 6 * 32
    assert held["merged_spans"] == sum(s.num_merged for s in Split.build(data.heldout, rules, 4).segs)
    # rule coverage: every held-out span but the (40, 41) ones, which fall back to the module
    n40 = sum(1 for s in Split.build(data.heldout, rules, 4).segs for r in s.rule_ids if r == rule_id(rules, (40, 41)))
    assert v["rule"]["heldout_spans"] == held["merged_spans"]
    assert v["rule"]["covered_spans"] == held["merged_spans"] - n40
    assert v["rule"]["covered_distinct_keys"] == 3 and v["rule"]["heldout_distinct_keys"] == 4
    # the oracle is in sample and beats the module on all rows and at merged elements
    assert v["oracle"]["all"]["kl"] < v["module"]["all"]["kl"]
    assert v["oracle"]["merged"]["kl"] < v["module"]["merged"]["kl"]
    assert v["oracle"]["in_sample"] is True
    # comparisons on the same subsets: uncovered-by-rule rows are the (40, 41) spans' rows
    comp = result["comparison"]
    assert comp["uncovered_by_rule"]["rows"] <= n40
    assert comp["covered_by_rule"]["rows"] + comp["uncovered_by_rule"]["rows"] == held["rows_at_merged"]
    assert comp["covered_by_context1"]["rows"] <= comp["covered_by_rule"]["rows"]
    for subset in comp.values():
        assert set(subset) >= {"rows", "module", "rule", "context1", "oracle"}
    # written incrementally and resumable: a rerun skips every variant and changes nothing
    on_disk = json.loads((tmp_path / "ceiling.json").read_text())
    assert on_disk["variants"]["oracle"]["all"] == v["oracle"]["all"]
    logged = []
    again = measure_ceiling(cfg, data, log=logged.append)
    assert sum("skipped" in line for line in logged) == 4
    assert again["variants"] == json.loads(json.dumps(v))
    # an oracle interrupted after its batches were checkpointed resumes from them
    on_disk["variants"].pop("oracle")
    (tmp_path / "ceiling.json").write_text(json.dumps(on_disk))
    logged = []
    resumed = measure_ceiling(cfg, data, log=logged.append)
    assert "oracle: running" in logged and not any("oracle batch" in line for line in logged)
    assert resumed["variants"]["oracle"]["all"] == v["oracle"]["all"]
    # other settings: one clear error, not a silent mix
    with pytest.raises(CeilingError, match="oracle_lr"):
        measure_ceiling(config(tmp_path, oracle_lr=1e-2), data, log=lambda *_: None)


def test_resume_runs_only_missing_variants(toy, tmp_path):
    model, module, rules = toy
    data = CeilingData(model, rules, module, windows(6, 5, (40, 41)), windows(8, 2), windows(4, 9))
    measure_ceiling(config(tmp_path, variants=("module",)), data, log=lambda *_: None)
    logged = []
    result = measure_ceiling(config(tmp_path, variants=("module", "rule")), data, log=logged.append)
    assert logged[0] == "module: done already, skipped" and "rule: running" in logged
    assert set(result["variants"]) == {"module", "rule"}
    # a setting only the oracle depends on leaves the finished variants valid
    logged = []
    result = measure_ceiling(config(tmp_path, variants=("module", "rule", "oracle"), oracle_max_steps=3), data, log=logged.append)
    assert sum("skipped" in line for line in logged) == 2 and result["variants"]["oracle"]["settings"]["oracle_max_steps"] == 3
    with pytest.raises(CeilingError, match="'rule' measured with other settings \\(fit_lr\\)"):
        measure_ceiling(config(tmp_path, variants=("module", "rule"), fit_lr=1e-3), data, log=lambda *_: None)


def test_select_training_windows_covers_heldout_keys(toy):
    from vllm_umim.evaluation.ceiling import select_training_windows
    from vllm_umim.module.batches import segment

    _, _, rules = toy
    a, b = [1, 2], [3, 4]
    pool = segment([[30, 31, 21] + a + [32], [33, 20] + a + [34, 35], [36, 37, 38, 39], [30] + b + [31, 32, 33],
                    [20] + a + [36] + b], rules)
    heldout = segment([[25, 20] + a + [26, 27] + b], rules)
    chosen, stats = select_training_windows(pool, heldout, budget=10, k=1)
    # (20, A) from window 1, A after another token from window 0, B (no context seen) from window 3
    assert chosen == [0, 1, 3]
    assert stats["heldout_rules"] == 2 and stats["heldout_rules_in_pool"] == 2
    assert stats["heldout_contexts"] == 2 and stats["heldout_contexts_in_pool"] == 1
    assert select_training_windows(pool, heldout, budget=1, k=1)[0] == [1]
    assert select_training_windows(pool, heldout, budget=10, k=None)[0] == [0, 3]  # rules only, first window each


def test_paired_difference_resamples_whole_windows():
    from vllm_umim.evaluation.ceiling import paired_difference

    row_window = np.array([0, 0, 1, 1, 1, 2])
    mask = np.array([True, True, True, True, False, True])
    resample = np.random.default_rng(0).multinomial(3, [1 / 3] * 3, size=500)
    constant = paired_difference(np.full(6, 0.25), mask, row_window, resample)
    assert constant["mean"] == pytest.approx(0.25) and constant["ci95"] == pytest.approx([0.25, 0.25])
    diff = np.array([1.0, 1.0, -1.0, -1.0, 100.0, 0.0])  # the masked-out row never counts
    varied = paired_difference(diff, mask, row_window, resample)
    assert varied["mean"] == pytest.approx(0.0)
    assert -1.0 <= varied["ci95"][0] < 0 < varied["ci95"][1] <= 1.0


def test_config_errors(tmp_path):
    with pytest.raises(CeilingError, match="unknown ceiling variant"):
        config(tmp_path, variants=("module", "contextual"))
    with pytest.raises(CeilingError, match="include 'rule'"):
        config(tmp_path, variants=("module", "context1"))
    with pytest.raises(CeilingError, match="heldout_windows"):
        config(tmp_path, heldout_windows=0)


def test_evaluate_module_matches_student_embeddings(toy):
    """The surrogate path reproduces the module's own student inputs (batches.student_embeddings)."""
    from vllm_umim.module.batches import student_embeddings

    model, module, rules = toy
    split = Split.build(windows(4, 7), rules, 4)
    batch = split.batches[0]
    with torch.no_grad():
        inputs = student_embeddings(batch, model.get_input_embeddings(), module)
        logits = model(inputs_embeds=inputs, attention_mask=batch.attention_mask).logits[batch.loss_mask].log_softmax(-1)
        ours = student_logprobs(model, batch, module_surrogates(model, batch, module))
    torch.testing.assert_close(ours, logits)
    rows = evaluate(model, split, lambda i: module_surrogates(model, split.batches[i], module))
    assert len(rows["kl"]) == int(batch.loss_mask.sum()) and (rows["kl"] >= -1e-6).all()
