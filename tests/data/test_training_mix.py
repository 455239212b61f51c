"""The training mix (issue 10) with a fake generator: no vLLM engine is started here."""

from __future__ import annotations

import json

import pytest

from vllm_umim.data import DataError, read_documents
from vllm_umim.data.training_mix import build_training_mix, chat_instructions, manifest_path

FAKE_ANSWER = "FAKE ANSWER about the text."


@pytest.fixture(scope="module")
def model_dir():
    from vllm_umim.data.model import fetch_model

    return fetch_model("smollm2-135m")


@pytest.fixture
def corpus_dir(tmp_path):
    """A small train/heldout split whose articles are easy to tell apart."""
    folder = tmp_path / "wiki"
    folder.mkdir()
    train = [f"TRAIN article {i} " + " ".join(f"word{i}x{j}" for j in range(80)) for i in range(40)]
    heldout = [f"HELDOUT article {i} " + " ".join(f"held{i}x{j}" for j in range(80)) for i in range(10)]
    (folder / "train.txt").write_text("".join(doc + "\n" for doc in train), encoding="utf-8")
    (folder / "heldout.txt").write_text("".join(doc + "\n" for doc in heldout), encoding="utf-8")
    return folder


@pytest.fixture
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def fake_generator(tokenizer, calls):
    """Answers every prompt with FAKE_ANSWER and the end-of-sequence token, as vLLM returns it."""
    answer = tokenizer(FAKE_ANSWER, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]

    def generate(prompts, sampling):
        calls.append((prompts, sampling))
        return [list(answer) for _ in prompts]

    return generate


def build(model_dir, corpus_dir, out, generate, **counts):
    return build_training_mix(model_dir, out, corpus_dir=corpus_dir, generate=generate, max_new_tokens=16, **counts)


def read_records(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_mix_has_every_source_from_train_articles_only(model_dir, corpus_dir, tokenizer, tmp_path, monkeypatch):
    import vllm_umim.data.qa as qa

    def no_qa(*args, **kwargs):
        raise AssertionError("the training mix must not read the QA evaluation sets")

    monkeypatch.setattr(qa, "load_task", no_qa)
    monkeypatch.setattr(qa, "load_gsm8k", no_qa)
    calls = []
    out = tmp_path / "mix.jsonl"
    manifest = build(model_dir, corpus_dir, out, fake_generator(tokenizer, calls), chat=8, continuations=5, wiki=4)

    records = read_records(out)
    assert sorted(r["source"] for r in records) == ["chat"] * 8 + ["continuation"] * 5 + ["wiki"] * 4
    assert not any("HELDOUT" in r["text"] or "held" in r["text"] for r in records)
    assert all("TRAIN article" in r["text"] for r in records)
    assert len(calls) == 1 and len(calls[0][0]) == 13 and calls[0][1].max_new_tokens == 16  # one engine for all prompts

    chat = [r["text"] for r in records if r["source"] == "chat"]
    for text in chat:
        assert text.startswith("<|im_start|>system\n") and "<|im_start|>user\n" in text
        assert text.endswith("<|im_start|>assistant\n" + FAKE_ANSWER + "<|im_end|>\n")
    used_templates = {t for t in chat_instructions() if any(t.split("{text}")[0] in text for text in chat)}
    assert len(used_templates) == len(chat_instructions())  # 8 records use all 8 templates in turn

    for r in records:
        if r["source"] == "continuation":
            assert r["text"].endswith(FAKE_ANSWER) and "<|im_end|>" not in r["text"]
    for prompt in calls[0][0][8:]:  # continuation prompts: 32-64 article tokens (SmolLM2 adds no BOS)
        assert 32 <= len(prompt) <= 64

    assert manifest["counts"] == {"chat": 8, "continuation": 5, "wiki": 4}
    assert set(manifest["tokens"]) == {"chat", "continuation", "wiki"} and all(n > 0 for n in manifest["tokens"].values())
    assert manifest["seed"] == 0 and manifest["sampling"]["temperature"] == 0.7 and manifest["model"] == str(model_dir)
    assert json.loads(manifest_path(out).read_text()) == manifest
    assert manifest_path(out).name == "mix.manifest.json"

    assert len(read_documents(out)) == 17  # the corpus reader takes it as is


def test_mix_is_deterministic_given_the_seed(model_dir, corpus_dir, tokenizer, tmp_path):
    generate = fake_generator(tokenizer, [])
    outputs = []
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        build_training_mix(model_dir, tmp_path / f"{name}.jsonl", chat=3, continuations=3, wiki=3, seed=seed,
                           corpus_dir=corpus_dir, generate=generate)
        outputs.append((tmp_path / f"{name}.jsonl").read_bytes())
    assert outputs[0] == outputs[1] != outputs[2]


def test_wiki_count_does_not_change_the_generated_records(model_dir, corpus_dir, tokenizer, tmp_path):
    prompts = []
    for wiki in (0, 5):
        calls = []
        build(model_dir, corpus_dir, tmp_path / f"w{wiki}.jsonl", fake_generator(tokenizer, calls), chat=2, continuations=2, wiki=wiki)
        prompts.append(calls[0][0])
    assert prompts[0] == prompts[1]


def test_mix_errors_name_the_problem(model_dir, corpus_dir, tokenizer, tmp_path):
    generate = fake_generator(tokenizer, [])
    with pytest.raises(DataError, match="ran out of articles after 40 of 41 wiki"):
        build(model_dir, corpus_dir, tmp_path / "mix.jsonl", generate, wiki=41)
    with pytest.raises(DataError, match="not all 0"):
        build(model_dir, corpus_dir, tmp_path / "mix.jsonl", generate)
    with pytest.raises(DataError, match=r"\*\.jsonl"):
        build(model_dir, corpus_dir, tmp_path / "mix.txt", generate, wiki=1)
    with pytest.raises(DataError, match="returned 0 outputs for 1 prompts"):
        build(model_dir, corpus_dir, tmp_path / "mix.jsonl", lambda prompts, sampling: [], chat=1)
    assert not (tmp_path / "mix.jsonl").exists()


def test_training_mix_subcommand_parses():
    from vllm_umim.cli.main import build_parser

    args = build_parser().parse_args(["training-mix", "--model", "m", "-o", "mix.jsonl", "--chat", "4", "--continuations", "5",
                                      "--wiki", "6", "--seed", "7", "--max-new-tokens", "96"])
    assert (args.command, str(args.model), str(args.output)) == ("training-mix", "m", "mix.jsonl")
    assert (args.chat, args.continuations, args.wiki, args.seed, args.max_new_tokens) == (4, 5, 6, 7, 96)
    defaults = build_parser().parse_args(["training-mix", "--model", "m", "-o", "mix.jsonl"])
    assert (defaults.chat, defaults.continuations, defaults.wiki, defaults.seed) == (0, 0, 0, 0)
    assert (defaults.temperature, defaults.top_p) == (0.7, 0.95)
