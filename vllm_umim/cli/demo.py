"""``vllm-umim demo``: the shipped SmolLM2 rules and module, reference runtime vs vLLM engine.

Generates greedily for a few held-out Wikipedia openings with dynamic merging, prints the
bracketed view of the engine's output, the token reduction, and whether the engine's tokens equal
the reference runtime's (the paper's App. D algorithms on plain HF transformers).
"""

from __future__ import annotations

import os
from pathlib import Path

ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts" / "smollm2-135m"


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="shipped SmolLM2 rules + module: vLLM engine vs reference")
    p.add_argument("--prompts", type=int, default=3, help="held-out Wikipedia openings to continue")
    p.add_argument("--max-tokens", type=int, default=40, help="tokens to generate per prompt")


def run(args) -> None:
    run_demo(args.prompts, args.max_tokens)


def run_demo(num_prompts: int, max_tokens: int) -> None:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0-1")
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from vllm_umim import merge_stats
    from vllm_umim.evaluation.generate import eos_token_ids, load_reference
    from vllm_umim.data.corpus import fetch_corpus, read_documents
    from vllm_umim.data.model import fetch_model
    from vllm_umim.reference import bracketed
    from vllm_umim.reference.runtime import replay_merges

    model_dir = fetch_model("smollm2-135m")
    rules_path = ARTIFACTS / "rules.bin"
    module = str(ARTIFACTS / "module.safetensors") if (ARTIFACTS / "module.safetensors").is_file() else "mean"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    documents = read_documents(fetch_corpus("wiki") / "heldout.txt")[:num_prompts]
    prompts = [tokenizer(d, add_special_tokens=False)["input_ids"][:40] for d in documents]

    llm = LLM(  # vLLM's defaults (torch.compile) but fp32, to compare token for token with the fp32 reference
        model=str(model_dir),
        dtype="float32",
        max_model_len=1024,
        additional_config={"umim": {"rules": str(rules_path), "module": module}},
    )
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], SamplingParams(temperature=0, max_tokens=max_tokens), use_tqdm=False)
    reference = load_reference(model_dir, rules_path, module, tokenizer, dynamic=True)
    print(f"merge module: {module}\n")
    for prompt, output in zip(prompts, outputs):
        tokens = list(output.outputs[0].token_ids)
        view = replay_merges(prompt, tokens, reference.policy, dynamic=True)
        expected = reference.generate(prompt, max_new_tokens=max_tokens, eos_token_ids=eos_token_ids(reference.model, tokenizer))
        stats = merge_stats(output)
        print(bracketed(view.elements, tokenizer))
        print(
            f"-- {stats['raw_tokens']} tokens in {stats['positions']} positions "
            f"(TR {100 * stats['tokens_merged_away'] / stats['raw_tokens']:.1f} %, "
            f"{stats['prefill_merges']} prefill + {stats['decode_merges']} decode merges); "
            f"engine == reference: {tokens == expected.output_token_ids}\n"
        )
