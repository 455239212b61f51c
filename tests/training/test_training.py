"""Training pieces on the tiny random Llama: masks, teacher cache, loss, trainer, resume, DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import make_ruleset, tiny_llama
from vllm_umim.errors import OptionError, TeacherCacheError
from vllm_umim.module.batches import AlignmentError, check_alignment, collate, segment, student_embeddings
from vllm_umim.training.loss import distillation_loss, student_logits, top1_margin_loss
from vllm_umim.training.teacher_cache import TeacherCache, build_cache, teacher_topk
from vllm_umim.training.trainer import TrainConfig, Trainer, lr_factor

RULES = [(2, 3), (5, 6), (7, 8, 9), (10, 11, 12, 13)]


def windows(n=24, seq_len=16, seed=0):
    """Random windows over a small alphabet with rule n-grams planted in them."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        w = []
        while len(w) < seq_len:
            if torch.rand(1, generator=g) < 0.4:
                w.extend(RULES[int(torch.randint(len(RULES), (1,), generator=g))])
            else:
                w.append(int(torch.randint(14, 64, (1,), generator=g)))
        out.append(w[:seq_len])
    return out


def test_app_c_example_masks():
    # [x1..x6] with (x2,x3) and (x5,x6) merged, plus a second sample padded by one element
    rules = make_ruleset([(2, 3), (5, 6)])
    batch = collate(segment([[1, 2, 3, 4, 5, 6], [7, 8, 2, 3, 9, 1]], rules))
    assert batch.attention_mask[0].tolist() == [1, 1, 1, 1, 0]
    assert batch.padding_mask[0].tolist() == [False, False, False, False, True]
    assert batch.loss_mask[0].long().tolist() == [0, 1, 1, 1, 0]
    assert batch.teacher_mask[0].long().tolist() == [0, 0, 1, 1, 0, 1]
    assert batch.index_map[0].tolist() == [0, 1, 1, 2, 3, 3]
    assert batch.last_index[0].tolist() == [0, 2, 3, 5, -1]
    assert batch.loss_mask[1].long().tolist() == [0, 0, 1, 1, 1]
    assert batch.teacher_mask[1].long().tolist() == [0, 0, 0, 1, 1, 1]
    assert batch.element_lengths[0].tolist() == [1, 2, 1, 2, 0]
    assert batch.element_tokens[0, 1].tolist() == [2, 3, -1, -1]


def test_merged_spans_are_the_merged_elements_tokens():
    seg = segment([[1, 2, 3, 4, 7, 8, 9, 5, 6]], make_ruleset(RULES))[0]
    assert seg.merged_spans() == [[2, 3], [7, 8, 9], [5, 6]]


def test_no_merge_means_no_loss_rows():
    batch = collate(segment([[1, 4, 9]], make_ruleset([(2, 3)])))
    assert batch.loss_mask.sum() == 0 and batch.teacher_mask.sum() == 0


def test_misalignment_raises():
    batch = collate(segment([[1, 2, 3, 4, 5, 6]], make_ruleset([(2, 3), (5, 6)])))
    batch.teacher_mask[0, 4] = True  # a covered (non-last) span token
    with pytest.raises(AlignmentError):
        check_alignment(batch)
    batch = collate(segment([[1, 2, 3, 4, 5, 6]], make_ruleset([(2, 3), (5, 6)])))
    batch.teacher_mask[0, 3], batch.teacher_mask[0, 0] = False, True  # same count, wrong rows
    with pytest.raises(AlignmentError):
        check_alignment(batch)


def test_mean_module_student_matches_teacher_before_first_merge(tiny_model):
    """Student rows before the first merge equal the teacher's; aligned rows are well defined."""
    from vllm_umim.module.merge_module import MergeModule, MergeModuleConfig

    rules = make_ruleset(RULES)
    batch = collate(segment([[20, 21, 22, 2, 3, 30, 31]], rules))
    module = MergeModule(MergeModuleConfig(32))
    emb = student_embeddings(batch, tiny_model.get_input_embeddings(), module)
    assert torch.allclose(emb[0, 3], tiny_model.get_input_embeddings()(torch.tensor([2, 3])).mean(0), atol=1e-6)
    with torch.no_grad():
        full = tiny_model(input_ids=batch.raw_ids).logits[0]
        merged = tiny_model(inputs_embeds=emb).logits[0]
    assert torch.allclose(full[:3], merged[:3], atol=1e-5)


def test_distillation_loss_values():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    tl, ti = torch.tensor([[3.0, 1.0]]), torch.tensor([[1, 0]])
    q = torch.softmax(tl, -1)
    logp = torch.log_softmax(logits, -1)
    expected = -(q[0, 0] * logp[0, 1] + q[0, 1] * logp[0, 0])
    assert torch.allclose(distillation_loss(logits, tl, ti), expected)
    # bucket with full-vocab top-k equals the exact cross-entropy
    t_full = torch.tensor([[0.5, 3.0, -2.0, 1.0]])
    vals, ids = t_full.topk(4)
    ce = -(torch.softmax(t_full, -1) * logp).sum()
    assert torch.allclose(distillation_loss(logits, vals, ids, t_full.logsumexp(-1), "bucket"), ce, atol=1e-5)
    # minimised (to the teacher's entropy) when the student equals the teacher
    vals2, ids2 = t_full.topk(2)
    exact = distillation_loss(t_full, vals2, ids2, t_full.logsumexp(-1), "bucket")
    assert exact < distillation_loss(logits, vals2, ids2, t_full.logsumexp(-1), "bucket")
    with pytest.raises(AlignmentError, match="misaligned"):
        distillation_loss(logits, torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.long))


def test_top1_margin_loss_values():
    """Zero where the student ranks the teacher's top-1 first by the teacher's margin (capped); a
    hinge on the shortfall elsewhere; never more than the teacher's own margin asked."""
    teacher_vals, teacher_ids = torch.tensor([[5.0, 4.5, 1.0]]), torch.tensor([[2, 0, 1]])  # margin 0.5
    agrees = torch.tensor([[1.0, 0.0, 2.0]])  # top-1 (id 2) first by 1.0 >= 0.5
    assert float(top1_margin_loss(agrees, teacher_vals, teacher_ids)) == 0.0
    flipped = torch.tensor([[3.0, 0.0, 2.0]], requires_grad=True)  # id 0 first by 1.0: shortfall 0.5 + 1.0
    loss = top1_margin_loss(flipped, teacher_vals, teacher_ids)
    assert torch.isclose(loss, torch.tensor(1.5))
    loss.backward()
    assert flipped.grad[0, 2] < 0 < flipped.grad[0, 0]  # raise the teacher's top-1, lower the runner-up
    confident = torch.tensor([[9.0, 0.0, 1.0]])  # teacher margin 9 capped at 1: student margin 1.0 is enough
    assert float(top1_margin_loss(torch.tensor([[0.0, 0.0, 1.0]]), confident, torch.tensor([[2, 0, 1]]), cap=1.0)) == 0.0
    assert float(top1_margin_loss(torch.tensor([[0.0, 0.0, 1.0]]), confident, torch.tensor([[2, 0, 1]]), cap=3.0)) == 2.0
    with pytest.raises(AlignmentError, match="misaligned"):
        top1_margin_loss(agrees, torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.long))


def test_gradients_flow_through_frozen_lm(tiny_model):
    from vllm_umim.module.merge_module import MergeModule, MergeModuleConfig
    from vllm_umim.training.trainer import freeze

    model = freeze(tiny_llama())
    rules = make_ruleset(RULES)
    batch = collate(segment(windows(4), rules))
    vals, ids, lse = teacher_topk(model, batch, 8)
    module = MergeModule(MergeModuleConfig(32))
    loss = distillation_loss(student_logits(model, module, batch), vals, ids, lse)
    loss.backward()
    assert all(p.grad is None for p in model.parameters())
    assert module.query.grad is not None and module.query.grad.abs().sum() > 0
    assert module.output_proj.weight.grad.abs().sum() > 0


def _setup(tmp_path, n_train=24, n_val=4):
    model = tiny_llama()
    rules = make_ruleset(RULES)
    build_cache(model, rules, windows(n_train, seed=1), tmp_path / "cache" / "train", k=8, batch_size=4, shard_windows=10, progress=False)
    build_cache(model, rules, windows(n_val, seed=2), tmp_path / "cache" / "val", k=8, batch_size=4, progress=False)
    return model, rules


def test_teacher_cache_rows_and_resume(tmp_path):
    model, rules = _setup(tmp_path)
    cache = TeacherCache(tmp_path / "cache" / "train", require_complete=True)
    assert len(cache) == 24 and cache.k == 8
    batch = collate(segment([cache.window(i) for i in (3, 17)], rules))
    vals, ids, lse = teacher_topk(model, batch, 8)
    cv, ci, cl = cache.rows([3, 17])
    assert torch.equal(ci, ids.long()) and torch.allclose(cv, vals) and torch.allclose(cl, lse)
    # an interrupted build resumes: remove the last shard and rebuild only it
    last = sorted((tmp_path / "cache" / "train").glob("shard-*.safetensors"))[-1]
    first_mtime = sorted((tmp_path / "cache" / "train").glob("shard-*.safetensors"))[0].stat().st_mtime_ns
    last.unlink()
    assert len(TeacherCache(tmp_path / "cache" / "train")) == 20
    build_cache(model, rules, windows(24, seed=1), tmp_path / "cache" / "train", k=8, batch_size=4, shard_windows=10, progress=False)
    assert len(TeacherCache(tmp_path / "cache" / "train", require_complete=True)) == 24
    assert sorted((tmp_path / "cache" / "train").glob("shard-*.safetensors"))[0].stat().st_mtime_ns == first_mtime
    with pytest.raises(TeacherCacheError, match="holds different windows"):
        build_cache(model, rules, windows(24, seed=5), tmp_path / "cache" / "train", k=8, shard_windows=10, progress=False)
    with pytest.raises(TeacherCacheError, match="was built with k=8, not 4"):
        build_cache(model, rules, windows(24, seed=1), tmp_path / "cache" / "train", k=4, shard_windows=10, progress=False)


def _trainer(tmp_path, model, rules, **kw):
    cfg = dict(max_tokens=16 * 4 * 12, batch_size=4, lr=5e-3, eval_every=4, patience=0, checkpoint_every=4, progress=False)
    cfg.update(kw)
    return Trainer(model, rules, TeacherCache(tmp_path / "cache" / "train"), TeacherCache(tmp_path / "cache" / "val"),
                   tmp_path / "run", TrainConfig(**cfg))


def test_loss_decreases(tmp_path):
    model, rules = _setup(tmp_path)
    trainer = _trainer(tmp_path, model, rules, max_tokens=16 * 4 * 30, lr=1e-2)
    meta = trainer.fit()
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    vals = [r["val_loss"] for r in log if "val_loss" in r]
    assert vals[-1] < vals[0] - 1e-3
    assert meta["tokens_seen"] == 16 * 4 * 30 and meta["best_val_loss"] < vals[0]
    assert (tmp_path / "run" / "best.safetensors").exists() and (tmp_path / "run" / "ckpt-last.safetensors").exists()


def test_top1_term_trains_and_logs_agreement(tmp_path):
    """--top1-weight: the run trains with the margin term, validation records top-1 agreement,
    and top-1 agreement on the validation rows does not fall."""
    model, rules = _setup(tmp_path)
    trainer = _trainer(tmp_path, model, rules, max_tokens=16 * 4 * 30, lr=1e-2, top1_weight=1.0)
    meta = trainer.fit()
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    top1 = [r["val_top1"] for r in log if "val_loss" in r]
    assert len(top1) > 2 and all(0.0 <= t <= 1.0 for t in top1) and top1[-1] >= top1[0]
    assert meta["top1_weight"] == 1.0 and meta["best_val_loss"] < log[0]["val_loss"]
    for bad in ({"top1_weight": -1.0}, {"top1_cap": 0.0}):
        with pytest.raises(OptionError, match="top-1 term"):
            _trainer(tmp_path, model, rules, **bad)


def test_resume_continues_exactly(tmp_path):
    model, rules = _setup(tmp_path)
    # reference: 12 uninterrupted steps
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "cache").symlink_to(tmp_path / "cache")
    ref = _trainer(tmp_path / "a", model, rules)
    ref.fit()
    # interrupted after 8 steps (budget), then resumed with the full budget
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "cache").symlink_to(tmp_path / "cache")
    part = _trainer(tmp_path / "b", model, rules, max_tokens=16 * 4 * 12)
    part.cfg.max_tokens = 16 * 4 * 8  # stop early, schedule unchanged
    part.fit()
    assert part.step == 8
    resumed = _trainer(tmp_path / "b", model, rules)
    assert resumed.resume() and resumed.step == 8 and resumed.tokens_seen == 16 * 4 * 8
    resumed.fit()
    assert resumed.step == 12
    for a, b in zip(ref.module.state_dict().values(), resumed.module.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6)


def test_refinement_trains_only_the_residuals(tmp_path):
    """--refine-rules: step 0 is the base module exactly; only the residuals move; val loss falls."""
    from vllm_umim.module.merge_module import MergeModule, MergeModuleConfig
    from vllm_umim.module.refinement import most_frequent_spans

    model, rules = _setup(tmp_path)
    torch.manual_seed(3)
    base_module = MergeModule(MergeModuleConfig(32))
    for p in base_module.parameters():
        p.data.normal_(0, 0.1)
    ngrams = most_frequent_spans([list(r) for r in RULES[:3]], 3, 4)
    trainer = Trainer(model, rules, TeacherCache(tmp_path / "cache" / "train"), TeacherCache(tmp_path / "cache" / "val"),
                      tmp_path / "run", TrainConfig(max_tokens=16 * 4 * 20, batch_size=4, lr=2e-2, eval_every=4,
                                                    patience=0, checkpoint_every=0, progress=False, train_part="refinement"),
                      module=base_module.refined(ngrams))
    start = trainer.validate()
    plain = Trainer(model, rules, TeacherCache(tmp_path / "cache" / "train"), TeacherCache(tmp_path / "cache" / "val"),
                    tmp_path / "plain", TrainConfig(progress=False), module=base_module).validate()
    assert start == pytest.approx(plain, abs=1e-6)
    before = {k: v.clone() for k, v in trainer.module.state_dict().items()}
    meta = trainer.fit()
    after = trainer.module.state_dict()
    assert meta["train_part"] == "refinement" and meta["best_val_loss"] < start - 1e-3
    assert all(torch.equal(before[k], after[k]) for k in before if not k.startswith("refinement.residuals"))
    assert after["refinement.residuals"].abs().sum() > 0


def test_bf16_autocast_step_runs_and_stays_close(tmp_path):
    model, rules = _setup(tmp_path)
    fp32 = _trainer(tmp_path, model, rules).validate()
    bf16 = _trainer(tmp_path, model, rules, precision="bf16").validate()
    assert bf16 == pytest.approx(fp32, rel=0.05) and bf16 != fp32
    trainer = _trainer(tmp_path, model, rules, precision="bf16", max_tokens=16 * 4 * 2, eval_every=0, checkpoint_every=0)
    trainer.fit()
    assert trainer.step == 2 and all(p.dtype == torch.float32 for p in trainer.module.parameters())
    with pytest.raises(OptionError, match="precision"):
        _trainer(tmp_path, model, rules, precision="fp16")


def test_lr_schedule():
    assert lr_factor(0, 100, 10, "cosine") == pytest.approx(0.1)
    assert lr_factor(9, 100, 10, "cosine") == pytest.approx(1.0)
    assert lr_factor(10, 100, 10, "cosine") == pytest.approx(1.0)
    assert lr_factor(100, 100, 10, "cosine") == pytest.approx(0.0, abs=1e-9)
    assert lr_factor(55, 100, 10, "linear") == pytest.approx(0.5)


DDP_SCRIPT = r"""
import os, sys, json, torch
sys.path.insert(0, os.environ["REPO"])
torch.set_num_threads(1)
from tests.conftest import make_ruleset, tiny_llama
from vllm_umim.errors import OptionError, TeacherCacheError
from tests.training.test_training import RULES
from vllm_umim.training.teacher_cache import TeacherCache
from vllm_umim.training.trainer import TrainConfig, Trainer
root = os.environ["ROOT"]
t = Trainer(tiny_llama(), make_ruleset(RULES), TeacherCache(root + "/cache/train"), TeacherCache(root + "/cache/val"),
            root + "/run", TrainConfig(max_tokens=16 * 4 * 2 * 6, batch_size=4, eval_every=3, patience=0,
                                         checkpoint_every=3, progress=False))
t.fit()
print("RESULT", json.dumps({"rank": t.rank, "world": t.world, "step": t.step, "tokens": t.tokens_seen,
      "q": t.module.query.detach().flatten()[:4].tolist(), "w": float(t.module.output_proj.weight.sum())}))
"""


def test_ddp_two_gloo_processes(tmp_path):
    _setup(tmp_path)
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    repo = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "REPO": repo, "ROOT": str(tmp_path), "OMP_NUM_THREADS": "1", "PYTHONPATH": repo}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script)],
        env=env, capture_output=True, text=True, timeout=170,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(line.split("RESULT ", 1)[1]) for line in proc.stdout.splitlines() if "RESULT " in line]
    assert sorted(r["rank"] for r in results) == [0, 1]
    assert all(r["world"] == 2 and r["step"] == 6 and r["tokens"] == 16 * 4 * 2 * 6 for r in results)
    assert results[0]["q"] == pytest.approx(results[1]["q"], abs=1e-6)  # replicas stay in sync
    assert results[0]["w"] == pytest.approx(results[1]["w"], abs=1e-5)
    assert any(abs(x) > 0 for x in results[0]["q"])  # and they did train
