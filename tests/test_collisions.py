"""The collision study against brute force and against the model's own N-gram hash."""

import numpy as np
import pytest

from lite.config import get_config
from lite.experiments.collisions import (collision_rate, distinct_windows, hashed_rows, random_hash_rate,
                                         recommend)
from lite.ngram import ngram_ids, ngram_windows


def test_collision_rate_matches_brute_force():
    rng = np.random.default_rng(0)
    windows = np.unique(rng.integers(0, 50, (300, 2)), axis=0)
    for size in (64, 97, 1000):
        rows = {}
        for t0, t1 in windows.tolist():
            rows.setdefault((t0 + t1 * pow(50, 1, size)) % size, []).append((t0, t1))
        shared = sum(len(v) for v in rows.values() if len(v) > 1)
        assert collision_rate(windows, 50, size) == pytest.approx(shared / len(windows))


def test_windows_and_rows_agree_with_the_model_hash():
    cfg = get_config("tiny")
    doc = np.array([1, 5, 9, 5, 9, cfg.eos_token_id, 5, 9, 7, 5, 9, 300, 0, 5], np.int64)
    want = {tuple(w) for w in np.asarray(ngram_windows(doc[None], cfg))[0, :, :2].tolist()}
    got = distinct_windows([doc], 2, cfg.eos_token_id)
    assert {tuple(w) for w in got.tolist()} == want
    ids = np.asarray(ngram_ids(doc[None], cfg))[0]  # sub-tables 0 and 1 hash bigrams
    windows = np.asarray(ngram_windows(doc[None], cfg))[0, :, :2]
    for s in range(cfg.ngram_k):
        np.testing.assert_array_equal(hashed_rows(windows, cfg.vocab_size, cfg.ngram_table_sizes[s]), ids[:, s])


def test_random_rate_and_recommendation():
    assert random_hash_rate(1, 10) == 0.0
    assert random_hash_rate(1001, 1000) == pytest.approx(1 - 0.999**1000)
    size = recommend(4096, 78.0)
    assert all(size % p for p in range(2, int(size**0.5) + 1))  # prime
    assert 78.5 * 4096 <= size < 78.5 * 4096 + 200  # from halfway between two multiples of V0
