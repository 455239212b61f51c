"""What reads a merged span: trained designs side by side on the ceiling's held-out windows.

``vllm-umim ceiling`` bounds what one frozen input position can carry (docs/ceiling.md). This
measurement scores *trained* designs on the same held-out windows and rows (App. C alignment),
each against the frozen, unadapted model (the teacher):

* a merge module file (the paper's §3.2 module, or a context-aware one, module/context.py);
* a module with an adapted reader (LoRA folder in PEFT's layout, training/reader.py): the student
  runs the adapted model, the teacher stays the base model. An adapted reader also changes what
  unmerged requests see, so it gets a *drift* line: the adapted model on the raw windows against
  the base model (KL, top-1) and greedy first divergence from held-out prompts.

Per design: KL(teacher || student) and top-1 agreement over all aligned rows and at merged
elements, the paired difference to the first design with a 95 % interval from resampling whole
windows (``ceiling.paired_difference``), and two-stage perplexity (App. F.1) on ``ppl_windows``
windows against the base model's.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from vllm_umim.errors import OptionError
from vllm_umim.evaluation.ceiling import Split, evaluate, module_surrogates, paired_difference, summarize
from vllm_umim.evaluation.fidelity import first_divergence


@dataclass
class ReadersConfig:
    """Fields with a ``help`` are ``vllm-umim readers`` flags."""

    model: str = field(metadata={"help": "base model folder (the teacher, and the student's model unless a design adapts it)"})
    rules: str = field(metadata={"help": "rules file"})
    heldout_corpus: str = field(metadata={"help": "held-out text (the windows scored)"})
    designs: tuple[str, ...] = field(metadata={
        "help": "NAME=MODULE or NAME=MODULE+READER_DIR, comma-separated; the first is the baseline of the paired differences",
        "type": lambda s: tuple(s.split(","))})
    out: str = field(metadata={"help": "result JSON"})
    seq_len: int = field(default=64, metadata={"help": "tokens per scored window (the ceiling's)"})
    heldout_windows: int = field(default=96, metadata={"help": "held-out windows scored (the ceiling's)"})
    batch_windows: int = 8
    ppl_windows: int = field(default=32, metadata={"help": "256-token held-out windows for two-stage perplexity (0: skip)"})
    drift_prompts: int = field(default=24, metadata={"help": "held-out prompts whose greedy continuation an adapted reader is checked on"})
    drift_tokens: int = 32
    seed: int = 0
    threads: int | None = field(default=None, metadata={"help": "torch threads"})

    def parsed(self) -> list[tuple[str, str, str | None]]:
        out = []
        for item in self.designs:
            name, sep, spec = item.partition("=")
            if not sep or not name or not spec:
                raise OptionError(f"design {item!r}: expected NAME=MODULE or NAME=MODULE+READER_DIR")
            module, _, reader = spec.partition("+")
            out.append((name, module, reader or None))
        if len({n for n, _, _ in out}) != len(out):
            raise OptionError(f"design names repeat: {self.designs}")
        return out


def load_student(base_dir: str, reader: str | None):
    """The base model (None: the student is the teacher), or base + LoRA folded into the weights."""
    if reader is None:
        return None
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32)
    return PeftModel.from_pretrained(base, reader).merge_and_unload().eval()


@torch.no_grad()
def drift(teacher_model, student_model, split: Split, prompts: list[list[int]], new_tokens: int) -> dict:
    """The adapted model on raw text against the base model: KL and top-1 over every raw position
    of the held-out windows, and greedy first divergence from ``prompts``."""
    kl, top1, n = 0.0, 0.0, 0
    for batch in split.batches:
        t = teacher_model(input_ids=batch.raw_ids).logits.float().log_softmax(-1).flatten(0, 1)
        s = student_model(input_ids=batch.raw_ids).logits.float().log_softmax(-1).flatten(0, 1)
        kl += float((t.exp() * (t - s)).sum(-1).sum())
        top1 += float((t.argmax(-1) == s.argmax(-1)).sum())
        n += t.shape[0]
    divergences = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        a = teacher_model.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)[0, len(prompt):].tolist()
        b = student_model.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)[0, len(prompt):].tolist()
        divergences.append(first_divergence(a, b))
    return {"raw_kl": kl / n, "raw_top1": top1 / n, "raw_positions": n, "first_divergence": float(np.mean(divergences)),
            "equal_all": float(np.mean([d >= new_tokens for d in divergences])), "prompts": len(prompts), "new_tokens": new_tokens}


@torch.no_grad()
def two_stage_ppl(teacher_model, student_model, module, segs) -> dict:
    from vllm_umim.evaluation.perplexity import base_token_nll, two_stage_token_nll

    base, merged = [], []
    for seg in segs:
        base.append(base_token_nll(teacher_model, seg.tokens)[0])
        merged.append(two_stage_token_nll(student_model, module, seg))
    b, m = torch.cat(base), torch.cat(merged)
    return {"base": math.exp(float(b.mean())), "merged": math.exp(float(m.mean())),
            "increase": math.exp(float(m.mean())) / math.exp(float(b.mean())) - 1, "tokens": int(b.numel())}


def run_readers(config: ReadersConfig, log=print) -> dict:
    from vllm_umim.files import file_sha256, write_json_atomic
    from vllm_umim.module.batches import corpus_windows, segment
    from vllm_umim.module.file_format import load_module, model_identity
    from vllm_umim.module.frozen_model import load_frozen_model
    from vllm_umim.training.reader import adapter_parameters

    if config.threads:
        torch.set_num_threads(config.threads)
    designs = config.parsed()
    frozen = load_frozen_model(config.model, config.rules)
    teacher = frozen.model.eval()
    heldout, _ = corpus_windows(config.heldout_corpus, frozen.tokenizer, config.seq_len, config.heldout_windows * config.seq_len, 0,
                                config.seed)
    split = Split.build(heldout, frozen.rules, config.batch_windows)
    long_windows, _ = corpus_windows(config.heldout_corpus, frozen.tokenizer, 256, config.ppl_windows * 256, 0, config.seed)
    ppl_segs = segment(long_windows, frozen.rules) if config.ppl_windows else []
    prompts = [w[:48] for w in long_windows[: config.drift_prompts]]
    row_merged = torch.cat(split.row_merged).numpy()
    row_window = np.repeat(np.arange(len(split.segs)), [s.num_elements - s.first_merge for s in split.segs])
    resample = np.random.default_rng(config.seed).multinomial(len(split.segs), np.full(len(split.segs), 1 / len(split.segs)),
                                                              size=2000)
    result = {"settings": {k: v for k, v in asdict(config).items() if k not in ("out", "threads")},
              "data": split.counts(), "designs": {}}
    teacher_cache: dict = {}
    rows: dict[str, dict[str, np.ndarray]] = {}
    for name, module_path, reader in designs:
        log(f"design {name}: {module_path}{' + ' + reader if reader else ''}")
        module = load_module(module_path, model_identity(teacher.config), frozen.rules.tokenizer_fingerprint)[0].float().eval()
        student = load_student(config.model, reader)
        rows[name] = evaluate(teacher, split, lambda i: module_surrogates(teacher, split.batches[i], module), teacher_cache, student)
        entry = {"module": module_path, "module_sha256": file_sha256(module_path), "reader": reader,
                 "context_tokens": module.config.context_tokens, "module_parameters": module.num_parameters(),
                 "all": summarize(rows[name]), "merged": summarize(rows[name], row_merged)}
        if ppl_segs:
            entry["two_stage_ppl"] = two_stage_ppl(teacher, student or teacher, module, ppl_segs)
        if student is not None:
            entry["drift"] = drift(teacher, student, split, prompts, config.drift_tokens)
            entry["reader_parameters"] = adapter_parameters(reader)
        baseline = designs[0][0]
        if name != baseline:
            entry["vs_" + baseline] = {
                subset: {m: paired_difference(rows[name][m] - rows[baseline][m], mask, row_window, resample) for m in ("kl", "top1")}
                for subset, mask in (("all", np.ones(len(row_merged), bool)), ("merged", row_merged))}
        result["designs"][name] = entry
        log(json.dumps({name: {k: entry[k] for k in ("all", "merged")}}, default=str))
        write_json_atomic(result, Path(config.out))
    return result

