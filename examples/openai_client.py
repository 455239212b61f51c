"""The OpenAI client against ``vllm serve MODEL --umim-rules rules.bin``: completions and chat,
streamed with ``stream_options.include_usage``, reading ``usage.umim``.

    vllm serve ~/.cache/vllm_umim/models/smollm2-135m --umim-rules artifacts/smollm2-135m/rules.bin --umim-max-window 16
    python examples/openai_client.py [--base-url http://localhost:8000/v1]
"""

import argparse

from openai import OpenAI

PROMPT = "The history of the United States of America began"


def umim_figures(usage) -> dict | None:
    """``usage.umim`` (the client keeps unknown fields in ``model_extra``)."""
    return (usage.model_extra or {}).get("umim") if usage is not None else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://localhost:8000/v1")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--window", type=int, default=16, help="raw window to ask for (at most the server's --umim-max-window)")
    args = parser.parse_args()
    client = OpenAI(base_url=args.base_url, api_key="EMPTY")
    model = client.models.list().data[0].id

    completion = client.completions.create(model=model, prompt=PROMPT, max_tokens=args.max_tokens, temperature=0)
    print("completion:", repr(completion.choices[0].text), "\n  usage.umim:", umim_figures(completion.usage))

    opted_out = client.completions.create(model=model, prompt=PROMPT, max_tokens=args.max_tokens, temperature=0,
                                          extra_body={"vllm_xargs": {"umim": False}})
    print("opted out: usage.umim:", umim_figures(opted_out.usage))

    windowed = client.completions.create(model=model, prompt=PROMPT, max_tokens=args.max_tokens, temperature=0,
                                         extra_body={"vllm_xargs": {"umim_window": args.window, "umim_min_confidence": 0.5}})
    print(f"window {args.window} + confidence gate: usage.umim:", umim_figures(windowed.usage))

    stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Name three countries in Europe."}],
                                            max_tokens=args.max_tokens, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    text, usage = "", None
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        usage = chunk.usage or usage
    print("streamed chat:", repr(text), "\n  usage.umim (final chunk):", umim_figures(usage))


if __name__ == "__main__":
    main()
