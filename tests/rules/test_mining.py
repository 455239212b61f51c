import numpy as np

from vllm_umim.rules import mine_rules
from vllm_umim.rules.mining import count_ngrams, filter_contained, SEPARATOR


def test_count_ngrams_does_not_cross_documents():
    stream = np.array([1, 2, SEPARATOR, 1, 2, 3, SEPARATOR], dtype=np.int64)
    grams, counts = count_ngrams(stream, 2)
    assert dict(zip(map(tuple, grams.tolist()), counts.tolist())) == {(1, 2): 2, (2, 3): 1}


def test_threshold_and_counts(word_tokenizer):
    docs = ["united states of a city"] * 3 + ["new york city"] * 2
    rules, report = mine_rules(docs, word_tokenizer, threshold=3, filter_overlaps=False, progress=False)
    v = word_tokenizer.vocab
    assert rules.count(2) == 4  # united states / states of / of a / a city, each 3 times
    assert (v["new"], v["york"]) not in rules.rule_ids  # only 2 occurrences
    assert report.num_tokens == 3 * 5 + 2 * 3
    assert rules.count(4) == 2 and rules.count(3) == 3


def test_overlap_filter_keeps_only_longest(word_tokenizer):
    docs = ["united states of a city"] * 3
    rules, _ = mine_rules(docs, word_tokenizer, threshold=3, filter_overlaps=True, progress=False)
    # every 2- and 3-gram lies inside one of the two 4-grams: pseudocode 1 drops them
    assert (rules.count(2), rules.count(3), rules.count(4)) == (0, 0, 2)


def test_filter_contained_keeps_uncovered_shorter():
    ngrams = {2: np.array([[1, 2], [7, 8]], np.int32), 3: np.array([[0, 1, 2]], np.int32)}
    counts = {2: np.array([9, 9]), 3: np.array([5])}
    filter_contained(ngrams, counts)
    assert ngrams[2].tolist() == [[7, 8]] and counts[2].tolist() == [9]
