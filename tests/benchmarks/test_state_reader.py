"""benchmarks/state_reader.py on the tiny random Llama: the state is the unmerged hidden state at each
span's last token, an untrained reader is exactly the module, training lowers the KL, a resumed
run ends where an uninterrupted one does (and one with other settings is refused), and the table."""

from __future__ import annotations

import pytest
import torch

from benchmarks.state_reader import (
    ReaderSettings,
    heldout_summary,
    main,
    StateReader,
    prompt_divergence,
    span_states,
    state_reader_table,
    teacher_and_states,
    train_reader,
    unmerged_path,
)
from tests.conftest import make_ruleset, tiny_llama
from vllm_umim.errors import CheckpointError
from vllm_umim.evaluation.ceiling import Split, module_surrogates
from vllm_umim.module.batches import collate, segment
from vllm_umim.module.merge_module import MergeModule, MergeModuleConfig
from vllm_umim.policies import MergeSettings

WINDOWS = [[20, 1, 2, 21, 3, 4, 22, 5, 6, 7, 23, 1, 2], [24, 3, 4, 25, 26, 1, 2, 27, 28, 5, 6, 7, 29]]
SETTINGS = ReaderSettings(layer=1, width=16, batch_windows=2, epochs=3, lr=1e-2, warmup=1)


@pytest.fixture(scope="module")
def toy():
    model = tiny_llama().requires_grad_(False)
    torch.manual_seed(0)
    rules = make_ruleset([(1, 2), (3, 4), (5, 6, 7)])
    return model, MergeModule(MergeModuleConfig(32)).eval().requires_grad_(False), rules, collate(segment(WINDOWS, rules))


def test_the_state_is_the_unmerged_hidden_state_at_each_spans_last_token(toy):
    model, _, _, batch = toy
    _, states = teacher_and_states(model, batch, layer=1)
    hidden = model(input_ids=batch.raw_ids, output_hidden_states=True).hidden_states[1]
    ends = [(0, 2), (0, 5), (0, 9), (0, 12), (1, 2), (1, 6), (1, 11)]  # (window, last raw index) of each span, row-major
    assert torch.equal(states, torch.stack([hidden[w, t] for w, t in ends]))
    assert torch.equal(span_states(hidden, batch), states)


def test_an_untrained_reader_is_the_module(toy):
    model, module, rules, batch = toy
    _, states = teacher_and_states(model, batch, layer=1)
    base = module_surrogates(model, batch, module)
    assert torch.equal(StateReader(32, 16)(states, base), base)
    policy = MergeSettings(mode="prompt").build(rules)
    result = prompt_divergence(model, module, StateReader(32, 16), policy, WINDOWS[0], unmerged_path(model, WINDOWS[0], 8), 1)
    assert result["module"] == result["reader"] and result["elements"] < result["tokens"]


def test_training_lowers_the_kl_and_resumes_to_the_same_reader(toy, tmp_path):
    model, module, _, batch = toy
    torch.manual_seed(1)
    whole = StateReader(32, 16)
    curve = train_reader(model, module, whole, [batch], SETTINGS, log=lambda _: None)
    assert curve[-1] < 0.9 * curve[0]

    torch.manual_seed(1)
    checkpoint = tmp_path / "reader.safetensors"

    def killed_after_first_epoch(_):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_reader(model, module, StateReader(32, 16), [batch], SETTINGS, checkpoint, log=killed_after_first_epoch)
    resumed = StateReader(32, 16)
    assert train_reader(model, module, resumed, [batch], SETTINGS, checkpoint, log=lambda _: None) == curve
    assert all(torch.equal(a, b) for a, b in zip(resumed.state_dict().values(), whole.state_dict().values()))
    with pytest.raises(CheckpointError, match="other settings"):
        train_reader(model, module, StateReader(32, 16), [batch], ReaderSettings(**{**SETTINGS.__dict__, "lr": 1e-3}), checkpoint)


def test_the_table_has_a_row_per_reader_and_the_paired_difference():
    kind = {"prompt_tr": 0.25, "module_mean": 4.0, "reader_mean": 6.5, "difference": {"estimate": 2.5, "low": 0.5, "high": 4.5}}
    held = {"kl_all": 0.7, "top1_all": 0.6, "kl_merged": 1.3, "top1_merged": 0.46}
    settings = {"layer": 4, "width": 576, "lr": 2e-4, "epochs": 2, "seq_len": 256}
    result = {"settings": settings, "parameters": 1000, "train_tokens": 2048, "train_seconds": 12.0,
              "heldout": {"module": held, "reader": {**held, "kl_all": 0.5}},
              "points": {"balanced": {"kinds": {"wiki": kind, "gsm8k": kind}}, "faithful": {"kinds": {"wiki": kind, "gsm8k": kind}}}}
    table = state_reader_table({"state-reader-4": result, "state-reader-30": {**result, "settings": {**settings, "layer": 30}}})
    lines = table.splitlines()
    assert len(lines) == 4 and "state after 4 layers; width 576, lr 0.0002; 2 epochs × 4 windows" in lines[2] and "state after 30 layers" in lines[3]
    assert "0.700 / 60.0 % → 0.500 / 60.0 %" in lines[2] and "4.0 → 6.5 / 4.0 → 6.5" in lines[2]
    assert lines[2].count("+2.5 [+0.5, +4.5] / +2.5 [+0.5, +4.5]") == 2 and "balanced: prompt TR % (wiki / gsm8k)" in lines[0]


def test_a_missing_training_text_is_one_clear_error_before_any_model_loads(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--corpus", str(tmp_path / "absent.jsonl"), "--json", str(tmp_path / "out.json")])
    assert "absent.jsonl is missing: build it with vllm-umim training-mix" in capsys.readouterr().err
    assert not (tmp_path / "out.json").exists()


def test_the_heldout_summary_counts_every_aligned_row_and_an_untrained_reader_scores_as_the_module(toy):
    model, module, rules, _ = toy
    summary = heldout_summary(model, module, StateReader(32, 16), Split.build(WINDOWS, rules, 1), layer=1)
    assert summary["rows"] == 7 + 8 and summary["module"] == summary["reader"]  # elements from each window's first merge on
    assert summary["module"]["kl_merged"] > 0 and 0 <= summary["module"]["top1_all"] <= 1
