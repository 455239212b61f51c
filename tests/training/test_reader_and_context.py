"""The two reader designs on the tiny random Llama: a context-aware merge module
(module/context.py) and an adapted reader (LoRA co-trained with the module, training/reader.py)."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import make_ruleset, tiny_llama
from tests.training.test_training import RULES, _setup, windows
from vllm_umim.errors import CheckpointError, MismatchError, OptionError
from vllm_umim.files import file_sha256
from vllm_umim.module.batches import collate, segment, span_context, student_embeddings
from vllm_umim.module.context import context_windows
from vllm_umim.module.file_format import READER_KEY, check_reader, load_module, read_metadata, save_module
from vllm_umim.module.merge_module import MergeModule, MergeModuleConfig
from vllm_umim.training.reader import ReaderConfig, merge_reader
from vllm_umim.training.teacher_cache import TeacherCache
from vllm_umim.training.trainer import TrainConfig, Trainer, reader_folder


def trained_like(hidden=32, seed=3, **kw):
    torch.manual_seed(seed)
    module = MergeModule(MergeModuleConfig(hidden, **kw))
    for p in module.parameters():
        p.data.add_(0.1 * torch.randn_like(p))
    return module


def test_context_windows_are_left_padded_raw_tokens():
    raw = torch.arange(100, 130).view(2, 15)
    tokens, lengths = context_windows(raw, starts=torch.tensor([0, 2, 9]), rows=torch.tensor([0, 1, 1]), k=4)
    assert tokens.tolist() == [[-1, -1, -1, -1], [-1, -1, 115, 116], [120, 121, 122, 123]]
    assert lengths.tolist() == [0, 2, 4]


def test_batch_context_is_the_raw_tokens_before_each_merged_span():
    rules = make_ruleset([(2, 3), (5, 6)])
    batch = collate(segment([[1, 2, 3, 4, 5, 6], [2, 3, 9, 9, 9, 9]], rules))
    embedding = torch.nn.Embedding(64, 8)
    embeds, lengths = span_context(batch, embedding, k=3)
    assert lengths.tolist() == [1, 3, 0]  # (2,3) at raw 1; (5,6) at raw 4; (2,3) at the start of window 2
    assert torch.equal(embeds[1], embedding(torch.tensor([2, 3, 4])))
    assert span_context(batch, embedding, k=0) is None


def test_context_branch_starts_as_the_context_free_module_and_learns_from_context():
    base = trained_like()
    module = base.with_context(4)
    assert module.config.context_tokens == 4 and base.config.context_tokens == 0
    spans, lengths = torch.randn(6, 4, 32), torch.tensor([2, 3, 4, 2, 2, 3])
    context = (torch.randn(6, 4, 32), torch.tensor([0, 1, 4, 4, 2, 3]))
    assert torch.equal(base(spans, lengths), module(spans, lengths, context=context))
    with pytest.raises(OptionError, match="pass context"):
        module(spans, lengths)
    # after a step the surrogate depends on the context (and never reads padded slots)
    torch.nn.init.normal_(module.context.mix_out.weight, std=0.1)
    other = (context[0].clone(), context[1])
    other[0][0] += 5.0  # span 0 has no valid context: its slots are padding
    out, out2 = module(spans, lengths, context=context), module(spans, lengths, context=other)
    assert torch.equal(out[0], out2[0]) and torch.equal(out[1:], out2[1:])
    other[0][2, 0] += 5.0
    assert not torch.equal(module(spans, lengths, context=context)[2], module(spans, lengths, context=other)[2])
    with pytest.raises(OptionError, match="context_tokens"):
        MergeModuleConfig(32, context_tokens=65)


def test_context_module_file_round_trip(tmp_path):
    module = trained_like(context_tokens=6)
    identity = {"architecture": "LlamaForCausalLM", "hidden_size": 32, "vocab_size": 64, "num_hidden_layers": 2, "name": "tiny"}
    save_module(module, tmp_path / "m.safetensors", identity, "tok", "rules", {})
    loaded, _ = load_module(tmp_path / "m.safetensors", identity, "tok")
    assert loaded.config.context_tokens == 6
    for a, b in zip(module.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)


def test_context_module_trains_from_the_shipped_start(tmp_path):
    model, rules = _setup(tmp_path)
    base = trained_like()
    cfg = TrainConfig(max_tokens=16 * 4 * 16, batch_size=4, lr=1e-2, eval_every=4, patience=0, checkpoint_every=0, progress=False)
    trainer = Trainer(model, rules, TeacherCache(tmp_path / "cache" / "train"), TeacherCache(tmp_path / "cache" / "val"),
                      tmp_path / "run", cfg, module=base.with_context(4))
    plain = Trainer(model, rules, TeacherCache(tmp_path / "cache" / "train"), TeacherCache(tmp_path / "cache" / "val"),
                    tmp_path / "plain", TrainConfig(progress=False), module=base).validate()
    start = trainer.validate()
    assert start == pytest.approx(plain, abs=1e-6)
    meta = trainer.fit()
    assert meta["best_val_loss"] < start - 1e-3
    assert trainer.module.context.mix_out.weight.abs().sum() > 0


def _reader_trainer(tmp_path, model, rules, module, out="run", **kw):
    cfg = dict(max_tokens=16 * 4 * 8, batch_size=4, lr=5e-3, eval_every=4, patience=0, checkpoint_every=4, progress=False)
    cfg.update(kw)
    return Trainer(model, rules, TeacherCache(tmp_path / "cache" / "train"), TeacherCache(tmp_path / "cache" / "val"),
                   tmp_path / out, TrainConfig(**cfg), module=module, reader=ReaderConfig(rank=4, raw_windows=2))


def test_adapted_reader_starts_at_the_frozen_model_and_resumes_exactly(tmp_path):
    _, rules = _setup(tmp_path)
    base = trained_like()
    frozen = Trainer(tiny_llama(), rules, TeacherCache(tmp_path / "cache" / "train"), TeacherCache(tmp_path / "cache" / "val"),
                     tmp_path / "plain", TrainConfig(progress=False), module=base).validate()
    ref = _reader_trainer(tmp_path, tiny_llama(), rules, trained_like(), out="a")
    assert ref.validate() == pytest.approx(frozen, abs=1e-6)  # zero-initialised adapters: the frozen model
    assert ref.val_raw is not None and ref.val_raw < frozen  # the unadapted model on raw text: the teacher itself
    ref.fit()
    lora = {n: p for n, p in ref.model.named_parameters() if "lora_B" in n}
    assert lora and all(p.abs().sum() > 0 for p in lora.values())
    log = [json.loads(line) for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert all("val_raw_loss" in r for r in log if "val_loss" in r)
    # an interrupted run resumed from its checkpoint ends where the uninterrupted one did
    part = _reader_trainer(tmp_path, tiny_llama(), rules, trained_like(), out="b")
    part.cfg.max_tokens = 16 * 4 * 4
    part.fit()
    resumed = _reader_trainer(tmp_path, tiny_llama(), rules, trained_like(), out="b")
    assert resumed.resume() and resumed.step == 4
    resumed.fit()
    for (name, a), b in zip(ref.model.named_parameters(), resumed.model.parameters()):
        if "lora_" in name:
            assert torch.allclose(a, b, atol=1e-6), name
    # a reader checkpoint does not load into a run without a reader
    plain = Trainer(tiny_llama(), rules, TeacherCache(tmp_path / "cache" / "train"), TeacherCache(tmp_path / "cache" / "val"),
                    tmp_path / "b", resumed.cfg, module=trained_like())
    with pytest.raises(CheckpointError, match="reader"):
        plain.resume()


def test_adapted_reader_is_saved_in_peft_layout_and_merges_into_the_weights(tmp_path):
    from peft import PeftModel

    _, rules = _setup(tmp_path)
    trainer = _reader_trainer(tmp_path, tiny_llama(), rules, trained_like(), checkpoint_every=0, eval_every=0)
    trainer.fit()
    base_dir = tmp_path / "base"
    tiny_llama().save_pretrained(base_dir)
    (base_dir / "chat_template.jinja").write_text("{{ messages }}")  # a model's chat template travels with it
    trainer.cfg.extra["model_dir"] = str(base_dir)
    trainer.save_snapshot(tmp_path / "module.safetensors")
    adapter = reader_folder(tmp_path / "module.safetensors")
    assert (adapter / "adapter_model.safetensors").exists() and (adapter / "adapter_config.json").exists()
    ids = torch.tensor([windows(1, seq_len=12, seed=9)[0]])
    with torch.no_grad():
        trained = trainer.model(input_ids=ids).logits
        peft_model = PeftModel.from_pretrained(tiny_llama(), str(adapter))
        assert torch.allclose(peft_model(input_ids=ids).logits, trained, atol=1e-5)
        from transformers import AutoModelForCausalLM

        merged = AutoModelForCausalLM.from_pretrained(merge_reader(base_dir, adapter, tmp_path / "merged"))
        assert torch.allclose(merged(input_ids=ids).logits, trained, atol=1e-4)
        assert (tmp_path / "merged" / "chat_template.jinja").read_text() == "{{ messages }}"
        assert not torch.allclose(tiny_llama()(input_ids=ids).logits, trained, atol=1e-4)
    # the module is bound to these adapters; the engine's check refuses it on another model, and a
    # frozen-model module on the adapted one
    meta = read_metadata(tmp_path / "module.safetensors")
    assert meta["training"][READER_KEY] == merged.config.umim_reader_sha256 == file_sha256(adapter / "adapter_model.safetensors")
    check_reader(meta, merged.config, "module.safetensors")
    with pytest.raises(MismatchError, match="trained with an adapted reader"):
        check_reader(meta, tiny_llama().config, "module.safetensors")
    with pytest.raises(MismatchError, match="is an adapted reader"):
        check_reader({"training": {}}, merged.config, "other.safetensors")
    check_reader({"training": {}}, tiny_llama().config, "other.safetensors")


def test_student_embeddings_use_context(tmp_path):
    rules = make_ruleset(RULES)
    batch = collate(segment(windows(4, seed=4), rules))
    embedding = tiny_llama().get_input_embeddings()
    module = trained_like(context_tokens=3)
    torch.nn.init.normal_(module.context.mix_out.weight, std=0.1)
    with torch.no_grad():
        out = student_embeddings(batch, embedding, module)
        merged = batch.merged_mask
        spans = embedding(batch.element_tokens[merged].clamp(min=0))
        expect = module(spans, batch.element_lengths[merged], batch.element_tokens[merged], context=span_context(batch, embedding, 3))
    assert torch.allclose(out[merged], expect)
