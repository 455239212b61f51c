"""Where a training step's time goes: teacher, student forward, backward, optimizer.

    python -m benchmarks.training_profile [--model DIR] [--rules FILE] [--steps 3] [--seq-lens 128 256]

For each setting (sequence length x precision x threads) it times, on the same Wikipedia windows:

* ``teacher``: the frozen teacher's forward and top-k (what ``vllm-umim train`` caches once);
* ``forward``: the student's forward (merged inputs through the frozen LM, loss);
* ``backward``: gradients through the frozen LM into the merge module;
* ``optimizer``: clip + AdamW.

Throughput is in raw tokens per second (windows x seq_len), the unit of ``--max-tokens``.
``bf16`` is CPU autocast (matmuls in bfloat16, the module's weights and the loss in fp32); its
loss is printed beside fp32's on the same batch, so a cut that changes the result shows. Writes
``benchmarks/results/training-profile.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path

import torch
from vllm_umim.files import write_json_atomic

RESULTS = Path(__file__).resolve().parent / "results" / "training-profile.json"


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def profile_setting(model, rules, module, windows, batch_size: int, precision: str, steps: int) -> dict:
    from vllm_umim.module.batches import collate, segment
    from vllm_umim.training.loss import batch_loss
    from vllm_umim.training.teacher_cache import teacher_topk

    optimizer = torch.optim.AdamW(module.parameters(), lr=0.0)  # lr 0: every setting sees the same module
    def autocast():
        return torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()

    times = {"teacher": 0.0, "forward": 0.0, "backward": 0.0, "optimizer": 0.0}
    losses, raw_tokens = [], 0
    for step in range(steps + 1):  # step 0 warms up and is not counted
        batch = collate(segment(windows[step * batch_size : (step + 1) * batch_size], rules))
        with autocast():
            teacher, t_teacher = timed(lambda: teacher_topk(model, batch, 64))
            loss, t_forward = timed(lambda: batch_loss(model, module, batch, teacher))
        _, t_backward = timed(lambda: loss.backward())

        def update():
            torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        _, t_opt = timed(update)
        if step:
            for key, value in zip(times, (t_teacher, t_forward, t_backward, t_opt)):
                times[key] += value
            losses.append(float(loss))
            raw_tokens += batch.num_raw_tokens
    student = times["forward"] + times["backward"] + times["optimizer"]
    return {
        "precision": precision,
        "threads": torch.get_num_threads(),
        "raw_tokens": raw_tokens,
        "seconds": {key: round(value, 3) for key, value in times.items()},
        "teacher_tok_per_s": round(raw_tokens / times["teacher"], 1),
        "student_tok_per_s": round(raw_tokens / student, 1),
        "share": {key: round(times[key] / student, 3) for key in ("forward", "backward", "optimizer")},
        "mean_loss": round(sum(losses) / len(losses), 5),
    }


def main(argv=None) -> list[dict]:
    from vllm_umim.data import fetch_corpus, fetch_model
    from vllm_umim.module.batches import corpus_windows
    from vllm_umim.module.file_format import load_module
    from vllm_umim.module.frozen_model import load_frozen_model

    root = Path(__file__).resolve().parents[1]
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="HF model folder (default: the fetched SmolLM2-135M)")
    p.add_argument("--rules", default=str(root / "artifacts/smollm2-135m/rules.bin"))
    p.add_argument("--module", default=str(root / "artifacts/smollm2-135m/module.safetensors"))
    p.add_argument("--seq-lens", type=int, nargs="+", default=[128, 256])
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--threads", type=int, nargs="+", default=[torch.get_num_threads()])
    p.add_argument("--tokens-per-step", type=int, default=2048, help="raw tokens per batch (batch = this / seq_len)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("-o", "--output", type=Path, default=RESULTS)
    args = p.parse_args(argv)

    frozen = load_frozen_model(args.model or fetch_model("smollm2-135m"), args.rules)
    module = load_module(args.module)[0].train()
    corpus = fetch_corpus("wiki") / "train.txt"
    results = []
    for seq_len in args.seq_lens:
        batch_size = max(1, args.tokens_per_step // seq_len)
        windows, _ = corpus_windows(corpus, frozen.tokenizer, seq_len, batch_size * (args.steps + 1) * seq_len, 0)
        for threads in args.threads:
            torch.set_num_threads(threads)
            for precision in args.precisions:
                row = {"seq_len": seq_len, "batch_size": batch_size,
                       **profile_setting(frozen.model, frozen.rules, module, windows, batch_size, precision, args.steps)}
                results.append(row)
                print(json.dumps(row), flush=True)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(results, args.output)
    print(f"wrote {args.output}")
    return results


if __name__ == "__main__":
    main()
