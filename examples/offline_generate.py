"""Offline ``LLM(...).generate`` with UMIM: merged, opted out, and a gentler policy, side by side.

    python examples/offline_generate.py [--model DIR] [--rules rules.bin] [--max-tokens 48] [--eager]

vLLM's defaults (torch.compile; bf16 on CPU) unless ``--eager`` (fp32, no compile: faster start).
Prints each continuation with its merge figures (``vllm_umim.merge_stats``).
"""

import argparse
import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

PROMPTS = [
    "The history of the United States of America began",
    "In mathematics, a prime number is a natural number greater than 1 that",
]
SETTINGS = {  # extra_args={"umim": ...} per request
    "merged (engine settings)": True,
    "opted out": False,
    "raw window 16, confident decode merges only": {"window": 16, "min_confidence": 0.5},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=os.path.expanduser("~/.cache/vllm_umim/models/smollm2-135m"))
    parser.add_argument("--rules", default=str(REPO / "artifacts" / "smollm2-135m" / "rules.bin"))
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--eager", action="store_true", help="fp32 without torch.compile (quick start)")
    args = parser.parse_args()

    from vllm import LLM, SamplingParams

    from vllm_umim import merge_stats

    engine_args = dict(dtype="float32", enforce_eager=True) if args.eager else {}
    llm = LLM(args.model, max_model_len=1024, seed=0, additional_config={"umim": {"rules": args.rules, "max_window": 16}},
              **engine_args)
    for name, choice in SETTINGS.items():
        params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, extra_args={"umim": choice})
        print(f"\n== {name}")
        for output in llm.generate(PROMPTS, params, use_tqdm=False):
            stats = merge_stats(output)
            figures = "unmerged" if stats is None else (
                f"{stats['raw_tokens']} raw tokens in {stats['positions']} positions "
                f"({stats['prefill_merges']} prompt merges, {stats['decode_merges']} decode merges)")
            print(f"{output.prompt!r} -> {output.outputs[0].text!r}\n   {figures}")


if __name__ == "__main__":
    main()
