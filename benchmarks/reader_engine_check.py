"""Engine == reference for an adapted reader served as merged weights.

    python -m benchmarks.reader_engine_check --model ~/.cache/vllm_umim/models/smollm2-135m \\
        --reader RUN/module.reader --module RUN/module.safetensors --merged RUN/model \\
        --json artifacts/smollm2-135m/readers/engine-check.json

Folds the adapters into the weights (``vllm-umim merge-reader``, skipped when ``--merged`` exists),
starts one fp32 eager vLLM engine on that folder with the reader's module, and compares its greedy
continuations of held-out Wikipedia prompts with the HF reference runtime on the same merged model:
prompt-only and dynamic merging, and requests that opt out (``extra_args={"umim": False}``), which
run the adapted model unmerged. A difference is only accepted at a near-tie of the reference
(top-2 margin below ``TIE``), as in ``tests/engine/test_engine_matches_reference.py``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

TIE = 1e-3


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--rules", default=str(Path(__file__).resolve().parents[1] / "artifacts" / "smollm2-135m" / "rules.bin"))
    parser.add_argument("--reader", required=True)
    parser.add_argument("--module", required=True)
    parser.add_argument("--merged", required=True)
    parser.add_argument("--prompts", type=int, default=20)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--json", required=True)
    args = parser.parse_args(argv)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0-1")

    import torch
    from transformers import AutoModelForCausalLM
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from vllm_umim.data.model import load_tokenizer
    from vllm_umim.evaluation.fidelity import first_divergence
    from vllm_umim.evaluation.fidelity_prompts import build_prompts
    from vllm_umim.files import file_sha256, write_json_atomic
    from vllm_umim.module import model_identity, resolve_module
    from vllm_umim.reference import ReferenceRuntime
    from vllm_umim.rules import load_rules
    from vllm_umim.training.reader import adapter_sha256, merge_reader

    merged = Path(args.merged)
    if not (merged / "config.json").is_file():
        merge_reader(args.model, args.reader, merged)
    tokenizer = load_tokenizer(str(merged))
    prompts = [p.token_ids for p in build_prompts("wiki", tokenizer, args.prompts)]
    rules = load_rules(args.rules)
    hf = AutoModelForCausalLM.from_pretrained(str(merged), torch_dtype=torch.float32).eval()
    module, _ = resolve_module(args.module, hf.config.hidden_size, model_identity(hf.config), rules.tokenizer_fingerprint)
    eos = (tokenizer.eos_token_id,)

    llm = LLM(model=str(merged), dtype="float32", enforce_eager=True, max_model_len=1024, seed=0,
              additional_config={"umim": {"rules": args.rules, "module": args.module}})
    result = {"model": args.model, "reader_sha256": adapter_sha256(args.reader),
              "module_sha256": file_sha256(args.module), "prompts": len(prompts), "max_tokens": args.max_tokens, "tie": TIE, "modes": {}}
    for mode in ("prompt", "dynamic", "off"):
        choice = False if mode == "off" else mode
        params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, extra_args={"umim": choice})
        outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        runtime = ReferenceRuntime(hf, rules, module, dynamic=mode == "dynamic")
        exact, ties, differ = 0, [], []
        for i, (output, prompt) in enumerate(zip(outputs, prompts)):
            if mode == "off":
                reference = hf.generate(torch.tensor([prompt]), max_new_tokens=args.max_tokens, do_sample=False, pad_token_id=0,
                                        eos_token_id=list(eos), output_scores=True, return_dict_in_generate=True)
                ref_tokens = reference.sequences[0, len(prompt):].tolist()
                margins = [float(s[0].float().topk(2).values.diff().abs()) for s in reference.scores]
            else:
                reference = runtime.generate(prompt, args.max_tokens, eos_token_ids=eos)
                ref_tokens, margins = reference.output_token_ids, reference.margins
            engine_tokens = list(output.outputs[0].token_ids)
            step = first_divergence(ref_tokens, engine_tokens)
            if engine_tokens == ref_tokens:
                exact += 1
            elif step < len(margins) and margins[step] < TIE:
                ties.append([i, step, margins[step]])
            else:
                differ.append([i, step, margins[step] if step < len(margins) else None])
        result["modes"][mode] = {"exact": exact, "near_ties": ties, "differ": differ}
        print(mode, result["modes"][mode], flush=True)
    llm.llm_engine.engine_core.shutdown()
    write_json_atomic(result, Path(args.json))
    return result


if __name__ == "__main__":
    main()
