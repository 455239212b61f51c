"""torch.ops.umim matcher ops agree with the paper's pseudocode 3/4 (the *_reference functions)."""

import itertools
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_umim.ops import (
    build_rule_index,
    find_spans,
    find_spans_reference,
    match_suffix,
    match_suffix_reference,
    pack_rules,
)


def rule_table(rules):
    packed = pack_rules(rules)
    return packed, build_rule_index(packed), {tuple(r): i for i, r in enumerate(rules)}


def run_find_spans(sequences, rules, max_n=4):
    """(op output, reference output), both flattened over the batch."""
    packed, index, rule_ids = rule_table(rules)
    tokens = torch.tensor([t for s in sequences for t in s], dtype=torch.int64)
    cu_seqlens = torch.tensor([0, *itertools.accumulate(map(len, sequences))], dtype=torch.int64)
    got = find_spans(tokens, cu_seqlens, packed, index, max_n).tolist()
    want = [x for row in find_spans_reference(sequences, rule_ids, max_n) for x in row]
    return got, want


def run_match_suffix(compressed, rules, max_n=4, garbage=0):
    """compressed: per request, z_merged of pseudocode 4 (ints = tokens, tuples = merged spans)."""
    packed, index, rule_ids = rule_table(rules)
    tails, num_raw = [], []
    for z in compressed:
        plain = list(itertools.takewhile(lambda e: not isinstance(e, tuple), reversed(z)))[:4]
        num_raw.append(len(plain))
        tails.append([garbage] * (4 - len(plain)) + plain[::-1])
    got = match_suffix(
        torch.tensor(tails, dtype=torch.int64).reshape(-1, 4),
        torch.tensor(num_raw, dtype=torch.int32),
        packed,
        index,
        max_n,
    ).tolist()
    return got, [match_suffix_reference(z, rule_ids, max_n) for z in compressed]


def tokens_and_ngrams(draw):
    token = st.integers(0, draw(st.integers(1, 8)) - 1)  # tiny vocabularies, so rules match
    return token, st.lists(token, min_size=2, max_size=4).map(tuple)


def draw_rules(draw, ngram, windows):
    """Unique rules, mostly `windows` of the input (so that they match) plus a few random ones."""
    taken = draw(st.lists(st.sampled_from(windows), min_size=1, max_size=20)) if windows else []
    return list(dict.fromkeys(taken + draw(st.lists(ngram, max_size=10))))


@st.composite
def find_spans_problems(draw):
    token, ngram = tokens_and_ngrams(draw)
    sequences = draw(st.lists(st.lists(token, max_size=40), min_size=1, max_size=6))
    windows = [tuple(s[i : i + n]) for s in sequences for n in (2, 3, 4) for i in range(len(s) - n + 1)]
    return sequences, draw_rules(draw, ngram, windows), draw(st.integers(2, 4))


@st.composite
def match_suffix_problems(draw):
    token, ngram = tokens_and_ngrams(draw)
    element = st.one_of(token, token, ngram)  # plain tokens (ints) or merged spans (tuples)
    compressed = draw(st.lists(st.lists(element, max_size=8), min_size=1, max_size=6))
    garbage = draw(token)
    windows = []  # suffixes as a reader that ignored num_raw would see them
    for z in compressed:
        tail = [garbage] * max(0, 4 - len(z)) + [garbage if isinstance(e, tuple) else e for e in z[-4:]]
        windows += [tuple(tail[-n:]) for n in (2, 3, 4)]
    return compressed, draw_rules(draw, ngram, windows), draw(st.integers(2, 4)), garbage


@settings(max_examples=300, deadline=None)
@given(find_spans_problems())
def test_find_spans_matches_pseudocode3(problem):
    sequences, rules, max_n = problem
    got, want = run_find_spans(sequences, rules, max_n)
    assert got == want


@settings(max_examples=300, deadline=None)
@given(match_suffix_problems())
def test_match_suffix_matches_pseudocode4(problem):
    compressed, rules, max_n, garbage = problem
    got, want = run_match_suffix(compressed, rules, max_n, garbage)
    assert got == want


def test_many_rules_with_collisions():
    rng = random.Random(0)
    rules = list({tuple(rng.randrange(12) for _ in range(rng.randint(2, 4))) for _ in range(3000)})
    sequences = [[rng.randrange(12) for _ in range(rng.randint(0, 64))] for _ in range(40)]
    got, want = run_find_spans(sequences, rules)
    assert got == want and min(got) == -2


def test_descending_n_beats_leftmost_longest():
    # Leftmost-longest would merge (1, 2) at 0; the paper tries all 3-grams before any 2-gram.
    got, want = run_find_spans([[1, 2, 3, 4, 5]], [(1, 2), (2, 3, 4)])
    assert got == want == [-1, 1, -2, -2, -1]


def test_leftmost_first_within_one_n():
    assert run_find_spans([[1, 1, 1]], [(1, 1)])[0] == [0, -2, -1]


def test_max_n_below_4():
    rules = [(1, 2, 3, 4), (1, 2, 3), (3, 4)]
    assert run_find_spans([[1, 2, 3, 4]], rules, max_n=4)[0] == [0, -2, -2, -2]
    assert run_find_spans([[1, 2, 3, 4]], rules, max_n=3)[0] == [1, -2, -2, -1]
    assert run_find_spans([[1, 2, 3, 4]], rules, max_n=2)[0] == [-1, -1, 2, -2]
    assert run_match_suffix([[1, 2, 3, 4]], rules, max_n=2)[0] == [2]


def test_no_rules_and_empty_batch():
    assert run_find_spans([[1, 2], [], [3]], [])[0] == [-1, -1, -1]
    assert run_find_spans([], [(1, 2)])[0] == []
    assert run_match_suffix([[1, 2, 3, 4], []], [])[0] == [-1, -1]


def test_spans_stay_inside_sequences():
    assert run_find_spans([[1], [2], [1, 2]], [(1, 2)])[0] == [-1, -1, 0, -2]


def test_match_suffix_does_not_read_merged_elements():
    rules = [(7, 1, 2), (1, 2)]
    # (7, 1, 2) would match if the merged (5, 6) slot (filled with garbage 7) were read.
    assert run_match_suffix([[(5, 6), 1, 2]], rules, garbage=7)[0] == [1]
    assert run_match_suffix([[7, 1, 2]], rules)[0] == [0]


def test_token_ids_compare_as_int64():
    assert run_find_spans([[2**32 + 1, 2]], [(1, 2)])[0] == [-1, -1]


def test_duplicate_rules_raise():
    with pytest.raises(RuntimeError, match="duplicate rule: rule 2 equals rule 0"):
        build_rule_index(pack_rules([(1, 2), (1, 2, 3), (1, 2)]))


def test_malformed_rules_raise():
    with pytest.raises(RuntimeError, match="padded with -1"):
        build_rule_index(torch.tensor([[1, -1, 2, -1]], dtype=torch.int32))
    with pytest.raises(RuntimeError, match="has length 1"):
        build_rule_index(torch.tensor([[1, -1, -1, -1]], dtype=torch.int32))
    with pytest.raises(ValueError, match="rule 0 has 5 tokens"):
        pack_rules([(1, 2, 3, 4, 5)])


def test_wrappers_validate_arguments():
    packed, index, _ = rule_table([(1, 2)])
    tokens, cu_seqlens = torch.tensor([1, 2]), torch.tensor([0, 2])
    with pytest.raises(ValueError, match="tokens must be torch.int64"):
        find_spans(tokens.int(), cu_seqlens, packed, index)
    with pytest.raises(ValueError, match="max_n must be in"):
        find_spans(tokens, cu_seqlens, packed, index, max_n=5)
    with pytest.raises(ValueError, match="not built by build_rule_index"):
        find_spans(tokens, cu_seqlens, packed, index[:8])
    with pytest.raises(ValueError, match=r"tails must have shape \[\*, 4\]"):
        match_suffix(torch.zeros(2, 3, dtype=torch.int64), torch.zeros(2, dtype=torch.int32), packed, index)
    with pytest.raises(RuntimeError, match="cu_seqlens must be non-decreasing"):
        find_spans(tokens, torch.tensor([0, 3, 2]), packed, index)
