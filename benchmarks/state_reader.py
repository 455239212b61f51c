"""A merge module that reads the model's own state: does it reach the oracle's room? (issue 20).

docs/ceiling.md found a free vector per occurrence, fitted on the prompt, worth +5 to +6 tokens of
greedy first divergence over the merge module (paper §3.2), while every trained design that read
only static embeddings (the span's, and context8's preceding tokens) moved it by less than one.
The oracle used what the *model* makes of the prompt, so this script trains the next thing: a
correction read from the frozen model's own hidden state.

For each merged span, ``state`` is the residual stream after the first ``layer`` decoder layers of
the **unmerged** text at the span's last token (it has read the span and everything before it).
The surrogate is the shipped module's plus a correction from that state::

    surrogate = module(span) + down(gelu(up(rmsnorm(state))))      # down starts at zero

so training starts exactly at the module. Trained by the §3.3 distillation (KL against the frozen,
unmerged model on the App. C aligned rows) with the model frozen, on fully merged windows of the
training mix; in training the state comes free with the teacher's forward pass.

What an engine would pay (on paper, not built): at prefill the first ``layer`` layers over the raw
prompt before the merged pass (``layer`` / num_layers of an unmerged prefill, plus the merged one);
while decoding, the state of a span's tokens comes from the passes that fed them before the
rollback (§3.4), except the newest token's, which needs those ``layer`` layers once.

Measured: KL and top-1 on the ceiling's held-out windows (docs/ceiling.md's table rows), and greedy
first divergence on the fidelity suite's prompts merged as the balanced and faithful points merge
them (as ``benchmarks.oracle_divergence``, whose module rows these reproduce). HF fp32.

    python -m benchmarks.state_reader --layer 4 --json artifacts/smollm2-135m/ceiling/state-reader-4.json
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from benchmarks.oracle_divergence import greedy
from vllm_umim.errors import CheckpointError
from vllm_umim.evaluation.ceiling import Split, evaluate, mean_kl, module_surrogates, student_inputs, student_logprobs, summarize
from vllm_umim.evaluation.fidelity import equal_share, first_divergence
from vllm_umim.evaluation.paired import paired_difference
from vllm_umim.module.batches import Batch, collate, segment
from vllm_umim.training.checkpoint import load_checkpoint, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "artifacts" / "smollm2-135m"
POINTS = {"balanced": {"mode": "prompt", "window": 16}, "faithful": {"mode": "prompt", "window": 48}}


class StateReader(nn.Module):
    """The correction added to the module's surrogate, read from the model's hidden state [S, d]."""

    def __init__(self, hidden_size: int, width: int):
        super().__init__()
        self.norm = nn.RMSNorm(hidden_size)
        self.up = nn.Linear(hidden_size, width)
        self.down = nn.Linear(width, hidden_size)
        nn.init.zeros_(self.down.weight)
        nn.init.zeros_(self.down.bias)

    def forward(self, states: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        return base + self.down(nn.functional.gelu(self.up(self.norm(states))))


@dataclass(frozen=True)
class ReaderSettings:
    """Which state is read (after ``layer`` decoder layers), the correction's hidden ``width``, and
    the training run: ``train_windows`` windows of ``seq_len`` tokens of the training mix, in batches
    of ``batch_windows``, ``epochs`` passes, Adam at ``lr`` with ``warmup`` steps then cosine."""

    layer: int = 4
    width: int = 576
    seq_len: int = 256
    train_windows: int = 512
    batch_windows: int = 8
    epochs: int = 2
    lr: float = 2e-4
    warmup: int = 8


def span_states(hidden: torch.Tensor, batch: Batch) -> torch.Tensor:
    """[S, d]: ``hidden`` [B, T, d] (unmerged) at the last raw token of each merged element (row-major)."""
    rows, cols = batch.merged_mask.nonzero(as_tuple=True)
    return hidden[rows, batch.last_index[rows, cols]]


def teacher_and_states(model, batch: Batch, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One unmerged forward pass: the teacher's log-probabilities at the aligned rows [R, V] and the
    spans' states after ``layer`` decoder layers [S, d]."""
    with torch.no_grad():
        out = model(input_ids=batch.raw_ids, output_hidden_states=True)
        return out.logits[batch.teacher_mask].float().log_softmax(-1), span_states(out.hidden_states[layer], batch)


def _warmup_cosine(warmup: int, total: int):
    return lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total))


def train_reader(model, module, reader: StateReader, train: list[Batch], settings: ReaderSettings, checkpoint: Path | None = None, log=print) -> list[float]:
    """Fit ``reader`` (Adam, warm-up then cosine) on ``train``; the frozen model and module stay
    fixed. Resumes from ``checkpoint`` (safetensors, :mod:`vllm_umim.training.checkpoint`, written
    after each epoch; one from other settings is refused). Returns the mean training KL per epoch."""
    optimizer = torch.optim.Adam(reader.parameters(), lr=settings.lr)
    total = settings.epochs * len(train)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_cosine(settings.warmup, total))
    done, curve = 0, []
    if checkpoint is not None and checkpoint.exists():
        counters = load_checkpoint(checkpoint, reader, optimizer, schedule)
        if counters.get("settings") != asdict(settings):
            raise CheckpointError(f"{checkpoint}: written by a run with other settings ({counters.get('settings')}); "
                                  "remove it or rerun with those settings")
        done, curve = int(counters["epochs"]), list(counters["curve"])
    for epoch in range(done, settings.epochs):
        began, losses = time.time(), []
        for batch in train:
            teacher, states = teacher_and_states(model, batch, settings.layer)
            loss = mean_kl(teacher, student_logprobs(model, batch, reader(states, module_surrogates(model, batch, module))))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(float(loss.detach()))
        curve.append(sum(losses) / len(losses))
        if checkpoint is not None:
            checkpoint.parent.mkdir(parents=True, exist_ok=True)
            save_checkpoint(checkpoint, reader, optimizer, schedule, {"epochs": epoch + 1, "curve": curve, "settings": asdict(settings)})
        log(f"epoch {epoch + 1}: training KL {curve[-1]:.4f} ({time.time() - began:.0f} s)")
    return curve


def heldout_summary(model, module, reader: StateReader, heldout: Split, layer: int) -> dict:
    """KL and top-1 over the held-out split's aligned rows, all and at merged elements, for the module
    alone and with the reader (the ceiling's :func:`~vllm_umim.evaluation.ceiling.evaluate`; one
    unmerged pass per batch gives both the teacher and the states)."""
    teachers, surrogates = {}, {"module": [], "reader": []}
    for i, batch in enumerate(heldout.batches):
        teachers[i], states = teacher_and_states(model, batch, layer)
        with torch.no_grad():
            base = module_surrogates(model, batch, module)
            surrogates["module"].append(base)
            surrogates["reader"].append(reader(states, base))
    merged = torch.cat(heldout.row_merged).numpy()
    out = {}
    for name, vectors in surrogates.items():
        rows = evaluate(model, heldout, vectors.__getitem__, teachers)
        every, at_merged = summarize(rows), summarize(rows, merged)
        out[name] = {"kl_all": every["kl"], "top1_all": every["top1"], "kl_merged": at_merged["kl"], "top1_merged": at_merged["top1"]}
    out["rows"] = len(merged)
    return out


def unmerged_path(model, prompt: list[int], max_tokens: int) -> list[int]:
    """The unmerged greedy continuation every variant is compared against."""
    return greedy(model, model.get_input_embeddings()(torch.tensor(prompt)), max_tokens)


def prompt_divergence(model, module, reader: StateReader, policy, prompt: list[int], raw: list[int], layer: int) -> dict:
    """First divergence from ``raw`` (:func:`unmerged_path`) with the module's and the reader's surrogates."""
    max_tokens = len(raw)
    seg = policy.segment([prompt])[0]
    result = {"tokens": len(prompt), "elements": seg.num_elements}
    if seg.num_merged == 0:
        return {**result, "module": max_tokens, "reader": max_tokens}
    batch = collate([seg])
    _, states = teacher_and_states(model, batch, layer)
    with torch.no_grad():
        base = module_surrogates(model, batch, module)
        for name, vectors in (("module", base), ("reader", reader(states, base))):
            result[name] = first_divergence(raw, greedy(model, student_inputs(model, batch, vectors)[0], max_tokens))
    return result


def state_reader_table(results: dict[str, dict]) -> str:
    """Markdown: one row per trained reader (name -> this script's JSON): what it reads and cost to
    train, held-out KL / top-1 against the module alone, and per operating point the mean first
    divergence (wiki / gsm8k) of the module and the reader, paired [95 %]."""
    from vllm_umim.bench.tables import markdown_table

    first = next(iter(results.values()))
    points = list(first["points"])
    kinds = list(first["points"][points[0]]["kinds"])
    what = " / ".join(kinds)
    header = ["reader", "trained parameters", "training tokens (seconds)", "held-out KL / top-1 all rows: module → reader",
              "merged rows: module → reader"]
    for point in points:
        header += [f"{point}: prompt TR % ({what})", f"{point}: 1st divergence module → reader ({what})", f"{point}: reader − module, paired [95 %]"]
    rows = []
    for result in sorted(results.values(), key=lambda r: (r["settings"]["layer"], r["settings"]["width"], r["train_tokens"])):
        held, s = result["heldout"], result["settings"]
        cells = [f"state after {s['layer']} layers; width {s['width']}, lr {s['lr']:g}; "
                 f"{s['epochs']} epochs × {result['train_tokens'] // (s['epochs'] * s['seq_len'])} windows",
                 f"{result['parameters']:,}",
                 f"{result['train_tokens']:,} ({result['train_seconds']:.0f})",
                 f"{held['module']['kl_all']:.3f} / {100 * held['module']['top1_all']:.1f} % → {held['reader']['kl_all']:.3f} / {100 * held['reader']['top1_all']:.1f} %",
                 f"{held['module']['kl_merged']:.3f} / {100 * held['module']['top1_merged']:.1f} % → {held['reader']['kl_merged']:.3f} / {100 * held['reader']['top1_merged']:.1f} %"]
        for point in points:
            per = [result["points"][point]["kinds"][k] for k in kinds]
            cells += [" / ".join(f"{100 * k['prompt_tr']:.1f}" for k in per),
                      " / ".join(f"{k['module_mean']:.1f} → {k['reader_mean']:.1f}" for k in per),
                      " / ".join("{estimate:+.1f} [{low:+.1f}, {high:+.1f}]".format(**k["difference"]) for k in per)]
        rows.append(cells)
    return markdown_table(header, rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layer", type=int, default=4, help="decoder layers whose output the reader reads")
    parser.add_argument("--width", type=int, default=576)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--train-windows", type=int, default=512)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--prompts", type=int, default=20, help="fidelity prompts per kind")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--corpus", default="~/.cache/vllm_umim/corpora/mix/train-mix.jsonl", help="training text (the training mix)")
    parser.add_argument("--checkpoint", default=None, help="reader checkpoint, .safetensors (resumed; not a result to commit)")
    parser.add_argument("--json", required=True)
    args = parser.parse_args(argv)
    mix = Path(args.corpus).expanduser()
    if not mix.is_file():
        parser.error(f"--corpus {mix} is missing: build it with vllm-umim training-mix --model smollm2-135m -o {mix}")
    torch.set_num_threads(args.threads)
    settings = ReaderSettings(args.layer, args.width, args.seq_len, args.train_windows, 8, args.epochs, args.lr)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vllm_umim.data.corpus import fetch_corpus
    from vllm_umim.data.model import fetch_model
    from vllm_umim.evaluation.fidelity_prompts import build_prompts, prompts_digest
    from vllm_umim.module import model_identity, resolve_module
    from vllm_umim.module.batches import corpus_windows
    from vllm_umim.policies import MergeSettings
    from vllm_umim.rules import load_rules

    model_dir = fetch_model("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval().requires_grad_(False)
    if not 1 <= settings.layer <= model.config.num_hidden_layers:
        parser.error(f"--layer must be in 1..{model.config.num_hidden_layers}")
    rules = load_rules(str(ARTIFACTS / "rules.bin"))
    module, _ = resolve_module(str(ARTIFACTS / "module.safetensors"), model.config.hidden_size, model_identity(model.config), rules.tokenizer_fingerprint)
    module = module.float().eval().requires_grad_(False)
    train_windows, _ = corpus_windows(mix, tokenizer, settings.seq_len, settings.train_windows * settings.seq_len, 32, 0)
    train = [collate(segment(train_windows[i : i + settings.batch_windows], rules)) for i in range(0, len(train_windows), settings.batch_windows)]
    heldout_windows, _ = corpus_windows(fetch_corpus("wiki") / "heldout.txt", tokenizer, 64, 96 * 64, 0, 0)  # the ceiling's windows
    heldout = Split.build(heldout_windows, rules, 8)

    torch.manual_seed(0)
    reader = StateReader(model.config.hidden_size, settings.width)
    began = time.time()
    curve = train_reader(model, module, reader, train, settings, Path(args.checkpoint) if args.checkpoint else None)
    result = {"model": "smollm2-135m", "rules": "artifacts/smollm2-135m/rules.bin", "module": "artifacts/smollm2-135m/module.safetensors",
              "train_corpus": Path(args.corpus).name, "settings": asdict(settings), "train_tokens": sum(b.num_raw_tokens for b in train) * settings.epochs,
              "train_seconds": round(time.time() - began, 1), "train_kl": curve,
              "parameters": sum(p.numel() for p in reader.parameters())}
    reader.eval()
    result["heldout"] = heldout_summary(model, module, reader, heldout, settings.layer)
    print(json.dumps(result["heldout"]), flush=True)
    prompts = {kind: build_prompts(kind, tokenizer, args.prompts) for kind in ("wiki", "gsm8k")}
    raw = {kind: [unmerged_path(model, p.token_ids, 32) for p in prompts[kind]] for kind in prompts}  # the same for every point
    result["points"] = {}
    for point, options in POINTS.items():
        policy = MergeSettings(**options).build(rules)
        result["points"][point] = {"settings": options, "kinds": {}}
        for kind in prompts:
            per = [prompt_divergence(model, module, reader, policy, p.token_ids, path, settings.layer) for p, path in zip(prompts[kind], raw[kind])]
            fd = {name: [p[name] for p in per] for name in ("module", "reader")}
            diff = paired_difference(fd["reader"], fd["module"])
            result["points"][point]["kinds"][kind] = {
                "prompts": len(per), "prompts_digest": prompts_digest(prompts[kind]),
                "prompt_tr": 1 - sum(p["elements"] for p in per) / sum(p["tokens"] for p in per),
                "first_divergence": fd, "module_mean": sum(fd["module"]) / len(per), "reader_mean": sum(fd["reader"]) / len(per),
                "reader_equal_share": equal_share(fd["reader"], 32),
                "difference": {"estimate": diff.estimate, "low": diff.low, "high": diff.high}}
            print(point, kind, {k: v for k, v in result["points"][point]["kinds"][kind].items() if k != "first_divergence"}, flush=True)
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
