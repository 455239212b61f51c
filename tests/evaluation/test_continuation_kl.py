"""Per-token KL on scored continuations (``evaluation.continuation_kl``) and its place in the
lm-eval results: exact on full distributions, bounded where the system's top-k misses a token,
paired by item and token, damaged files refused in one line."""

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from vllm_umim.errors import UmimError
from vllm_umim.evaluation import harness
from vllm_umim.evaluation.continuation_kl import (ContinuationRows, RowCollector, bucket_kl, compare, load_rows,
                                                  save_rows, top_rows)


def _row(logprobs: torch.Tensor, k: int, extra: int | None = None) -> dict:
    """A vLLM prompt-logprobs row: the top-k by rank, plus the scored token when outside it."""
    order = torch.argsort(logprobs, descending=True)
    row = {int(t): SimpleNamespace(logprob=float(logprobs[t]), rank=r + 1) for r, t in enumerate(order[:k])}
    if extra is not None and extra not in row:
        rank = int((order == extra).nonzero()) + 1
        row[extra] = SimpleNamespace(logprob=float(logprobs[extra]), rank=rank)
    return row


def test_bucket_kl_is_exact_when_k_covers_the_vocabulary_and_bounded_when_tokens_are_missing():
    g = torch.Generator().manual_seed(0)
    p, q = torch.log_softmax(torch.randn(12, generator=g), -1), torch.log_softmax(torch.randn(12, generator=g), -1)
    exact = float((p.exp() * (p - q)).sum())
    pi, pl = top_rows([0], [None, _row(p, 12)], 12)
    qi, ql = top_rows([0], [None, _row(q, 12)], 12)
    kl, imputed = bucket_kl(pi[0], pl[0], qi[0], ql[0])
    assert kl == pytest.approx(exact, rel=1e-5) and imputed == 0.0
    assert bucket_kl(pi[0], pl[0], pi[0], pl[0])[0] == pytest.approx(0.0, abs=1e-6)
    # top-4 of each: the reference's tokens missing from the system's top-4 are bounded, and counted
    pi, pl = top_rows([0], [None, _row(p, 4)], 4)
    qi, ql = top_rows([0], [None, _row(q, 4)], 4)
    kl4, imputed4 = bucket_kl(pi[0], pl[0], qi[0], ql[0])
    missing = [t for t in pi[0].tolist() if t not in qi[0].tolist()]
    assert missing and imputed4 == pytest.approx(float(p[missing].exp().sum()), rel=1e-5)
    assert math.isfinite(kl4) and kl4 >= 0


def test_top_rows_reads_the_last_rows_and_leaves_out_the_scored_token_beyond_k():
    logprobs = torch.log_softmax(torch.arange(10, dtype=torch.float32), -1)  # token 9 ranks first
    rows = [None, _row(logprobs, 2, extra=0), _row(logprobs, 2, extra=3)]
    ids, values = top_rows([0, 3], rows, 2)
    assert ids.tolist() == [[9, 8], [9, 8]] and values[0, 0] == pytest.approx(float(logprobs[9]))
    ids, _ = top_rows([3], rows, 3)  # fewer entries than k in a row: padded with -1
    assert ids.tolist() == [[9, 8, -1]]


def _rows(docs: dict[int, list[tuple[int, list[float]]]]) -> ContinuationRows:
    collector = RowCollector(3)
    for doc, tokens in docs.items():
        rows = [None] + [_row(torch.log_softmax(torch.tensor(v), -1), 3) for _, v in tokens]
        collector.add(doc, [t for t, _ in tokens], rows)
    return collector.rows()


def test_compare_pairs_items_and_tokens_and_counts_mismatches(tmp_path):
    ref = _rows({0: [(1, [3.0, 1.0, 0.0])], 1: [(2, [0.0, 2.0, 1.0]), (0, [1.0, 1.0, 1.0])], 2: [(0, [1.0, 0.0, 0.0])]})
    same = _rows({2: [(0, [1.0, 0.0, 0.0])], 0: [(1, [3.0, 1.0, 0.0])], 1: [(2, [0.0, 2.0, 1.0]), (0, [1.0, 1.0, 1.0])]})
    result = compare(same, ref)
    assert (result["items"], result["tokens"], result["items_mismatched"]) == (3, 4, 0)
    assert result["kl_mean"] == pytest.approx(0.0, abs=1e-6) and result["top1_agreement"] == 1.0
    moved = _rows({0: [(1, [0.0, 3.0, 0.0])], 1: [(2, [0.0, 2.0, 1.0]), (0, [1.0, 1.0, 1.0])], 2: [(1, [1.0, 0.0, 0.0])]})
    result = compare(moved, ref)  # item 0 moved, item 1 equal, item 2 scores another token: not compared
    assert (result["items"], result["tokens"], result["items_mismatched"]) == (2, 3, 1)
    assert result["kl_mean"] > 0.5 and result["top1_agreement"] == pytest.approx(2 / 3)
    save_rows(moved, tmp_path / "a.topk.npz")
    again = load_rows(tmp_path / "a.topk.npz")
    assert np.array_equal(again.top_ids, moved.top_ids) and np.array_equal(again.doc_ids, moved.doc_ids)
    (tmp_path / "b.topk.npz").write_bytes(b"PK\x03\x04 damaged")
    with pytest.raises(UmimError, match="b.topk.npz: not a continuation top-k file"):
        load_rows(tmp_path / "b.topk.npz")


def test_results_carry_the_continuation_kl_where_both_rows_exist(tmp_path):
    config = harness.LmEvalConfig(model="m", output_dir=tmp_path, kl_top_k=3)
    for system, values in ((harness.REFERENCE, [3.0, 1.0, 0.0]), ("balanced", [2.0, 1.0, 0.0]), ("stock-bf16", None)):
        path = harness.item_path(tmp_path, system, "arc_easy")
        path.parent.mkdir(parents=True)
        umim = {"rules": "x"} if system == "balanced" else None
        spec = harness._spec(config, harness.System(system, umim=umim), "arc_easy")
        path.write_text(json.dumps({"spec": spec, "seconds": 1.0, "doc_ids": [0, 1], "scores": {"acc": [1.0, 0.0]},
                                    "merge": {}}))
        if values is not None:
            save_rows(_rows({0: [(0, values)], 1: [(0, values), (1, values)]}), harness.rows_path(tmp_path, system, "arc_easy"))
            assert harness._finished(path, spec)
        else:  # asked for KL rows and has none: not finished
            assert not harness._finished(path, spec)
    results = harness.summarize(tmp_path, [harness.REFERENCE, "stock-bf16", "balanced"], ("arc_easy",))
    systems = results["tasks"][0]["systems"]
    assert "continuation_kl" not in systems["stock-bf16"] and "continuation_kl" not in systems[harness.REFERENCE]
    kl = systems["balanced"]["continuation_kl"]
    assert (kl["items"], kl["tokens"]) == (2, 3) and kl["kl_mean"] > 0 and kl["top1_agreement"] == 1.0
    assert "| arc_easy | balanced | 2 | 3 | " in harness.render_table(results)
    # generative tasks keep no rows and their spec does not ask for them; other specs are unchanged by k = 0
    assert "kl_top_k" not in harness._spec(config, harness.System("x"), "gsm8k")
    assert "kl_top_k" not in harness._spec(harness.LmEvalConfig(model="m", output_dir=tmp_path), harness.System("x"), "arc_easy")


def test_a_top_k_beyond_vllms_max_logprobs_is_one_error(tmp_path):
    with pytest.raises(UmimError, match="kl_top_k must be 0"):
        harness.run_lm_eval(harness.LmEvalConfig(model="m", output_dir=tmp_path, kl_top_k=21, tasks=("arc_easy",)))
