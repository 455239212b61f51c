"""``vllm-umim generate --engine vllm``: the same prompt through a vLLM engine with UMIM."""

from __future__ import annotations

from vllm_umim.reference import Generation
from vllm_umim.policies import GreedyLongestMatch
from vllm_umim.reference.runtime import replay_merges
from vllm_umim.rules import load_rules


def engine_generate(args, tokenizer, prompt_ids) -> Generation:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from vllm_umim.engine.stats import merge_stats

    options = {"rules": str(args.rules), "mode": "dynamic" if args.dynamic else "prompt"}
    if args.module:
        options["module"] = args.module
    # vLLM's defaults (torch.compile) in fp32, so the output can be compared with --engine reference
    llm = LLM(model=str(args.model), dtype="float32", max_model_len=2048, additional_config={"umim": options})
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    output = llm.generate([TokensPrompt(prompt_token_ids=prompt_ids)], params, use_tqdm=False)[0]
    result = replay_merges(prompt_ids, list(output.outputs[0].token_ids), GreedyLongestMatch(load_rules(args.rules)), args.dynamic)
    stats = merge_stats(output)
    if stats and stats["positions"] != len(result.elements):
        print(f"warning: engine reports {stats['positions']} positions, replay gives {len(result.elements)}")
    return result
