"""Throughput of the prefill span search (find_spans), native op vs the Python reference.

Zipfian random tokens in sequences of 512, merge rules = random 2..4-grams drawn from the same
token stream (so that they match). Single thread: the target is >= 20M tokens/s per core.

    python -m benchmarks.bench_matcher [--tokens 1048576] [--rules 100000]
"""

import argparse
import time

import numpy as np
import torch

from vllm_umim.ops import build_rule_index, find_spans, find_spans_reference, pack_rules


def zipf_tokens(rng, num_tokens, vocab, exponent):
    weights = 1.0 / np.arange(1, vocab + 1) ** exponent
    return rng.choice(vocab, size=num_tokens, p=weights / weights.sum())


def ngrams_from(rng, tokens, num_rules):
    rules = {}
    while len(rules) < num_rules:
        for start, n in zip(rng.integers(0, len(tokens) - 4, num_rules), rng.integers(2, 5, num_rules)):
            rules.setdefault(tuple(tokens[start : start + n].tolist()), len(rules))
    return list(rules)[:num_rules]


def best_time(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1 << 20)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--rules", type=int, default=100_000)
    parser.add_argument("--vocab", type=int, default=32_000)
    parser.add_argument("--zipf", type=float, default=1.1)
    parser.add_argument("--py-seqs", type=int, default=32, help="sequences timed in Python")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)

    num_seqs = args.tokens // args.seq_len
    stream = zipf_tokens(rng, num_seqs * args.seq_len, args.vocab, args.zipf)
    rule_list = ngrams_from(rng, stream, args.rules)
    rules = pack_rules(rule_list)
    index = build_rule_index(rules)
    tokens = torch.from_numpy(stream).long()
    cu_seqlens = torch.arange(0, len(stream) + 1, args.seq_len, dtype=torch.int64)

    find_spans(tokens, cu_seqlens, rules, index)  # warm-up
    native_s = best_time(lambda: find_spans(tokens, cu_seqlens, rules, index), args.repeats)
    spans = find_spans(tokens, cu_seqlens, rules, index)

    sequences = stream[: args.py_seqs * args.seq_len].reshape(-1, args.seq_len).tolist()
    rule_ids = {r: i for i, r in enumerate(rule_list)}
    start = time.perf_counter()
    reference = find_spans_reference(sequences, rule_ids)
    python_s = time.perf_counter() - start
    assert sum(reference, []) == spans[: len(sequences) * args.seq_len].tolist()

    native_tps = len(stream) / native_s
    python_tps = len(sequences) * args.seq_len / python_s
    kept = (spans != -2).sum().item() / len(stream)
    print(f"{num_seqs} seqs x {args.seq_len} tokens, {len(rule_list)} rules, "
          f"index capacity {index.numel()}, sequence length after merging {kept:.1%}")
    print(f"C++    find_spans:           {native_tps / 1e6:8.2f} M tokens/s (1 thread)")
    print(f"Python find_spans_reference: {python_tps / 1e6:8.4f} M tokens/s "
          f"({len(sequences)} seqs)")
    print(f"speed-up: {native_tps / python_tps:,.0f}x")


if __name__ == "__main__":
    main()
