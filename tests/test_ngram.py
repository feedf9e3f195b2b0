"""N-gram hash and embedding against an independent Python-integer / NumPy reference."""

import math

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings

from lite.config import get_config
from lite import ngram
from lite.ngram import NgramEmbedding
from oracles import python_ngram_ids_of

# Jitted once per config (configs are hashable) so the many small cases stay fast.
ngram_ids = jax.jit(ngram.ngram_ids, static_argnums=1)
ngram_windows = jax.jit(ngram.ngram_windows, static_argnums=1)
ngram_step = jax.jit(ngram.ngram_step, static_argnums=2)
ngram_cache = jax.jit(ngram.ngram_cache, static_argnums=1)

REAL = get_config("longcat-flash-lite")  # V0 = 131072, ratio 78, N = K = 4
V0, EOS = REAL.vocab_size, REAL.eos_token_id


def check(rows, cfg=REAL, segments=None):
    rows = np.asarray(rows)
    got = np.asarray(ngram_ids(jnp.asarray(rows, jnp.int32), cfg,
                               None if segments is None else jnp.asarray(segments, jnp.int32)))
    for b in range(rows.shape[0]):
        want = python_ngram_ids_of(rows[b], cfg, None if segments is None else segments[b])
        np.testing.assert_array_equal(got[b], want, err_msg=f"row {b}: {rows[b].tolist()}")


BIG = V0 - 1


@pytest.mark.parametrize("row", [
    [EOS, 5, 6, 7, 8, 9, 10, 11],                 # EOS at the start
    [5, 6, 7, EOS, 8, 9, 10, 11],                 # EOS in the middle
    [5, 6, 7, 8, 9, 10, 11, EOS],                 # EOS at the end
    [5, 6, EOS, EOS, 7, 8, EOS, EOS],             # adjacent EOS
    [BIG, BIG, BIG, BIG, BIG - 1, BIG, 3, BIG],   # ids near V0 - 1: products near 2^41
    [0, 0, 0, 7, 0, 0, 9, 0],                     # token 0
    [1, 131000, 2, 65536, 99999, 0, 131071, 2],
], ids=["eos-start", "eos-middle", "eos-end", "eos-adjacent", "near-v0", "token-0", "mixed"])
def test_ids_match_python_integers_at_real_sizes(row):
    check([row])


def test_products_would_overflow_int32():
    # The test above is only meaningful if naive int32 arithmetic would be wrong.
    largest = max(pow(V0, j, size) for size in REAL.ngram_table_sizes for j in range(1, 4))
    assert BIG * largest > 2**40


def test_segment_ids_restart_the_window():
    rows = [[10, 11, 12, 13, 14, 15, 16, 17], [0, 0, 0, 20, 21, EOS, 22, 23]]
    segments = [[1, 1, 1, 2, 2, 2, 3, 3], [0, 0, 0, 1, 1, 1, 1, 1]]  # packed; left padding
    check(rows, segments=segments)
    got = np.asarray(ngram_ids(jnp.asarray(rows), REAL, jnp.asarray(segments)))
    alone = np.asarray(ngram_ids(jnp.asarray([[13, 14, 15]]), REAL))
    np.testing.assert_array_equal(got[0, 3:6], alone[0])  # a packed document hashes as if alone


@settings(max_examples=25, deadline=None)
@given(st.lists(st.lists(st.sampled_from([0, 1, EOS, 3, 77, 4096, BIG - 5, BIG]) | st.integers(0, BIG),
                         min_size=12, max_size=12), min_size=1, max_size=3))
def test_ids_match_python_integers_random(rows):
    check(rows)


def test_small_config_hash_matches_reference():
    cfg = get_config("tiny")
    rng = np.random.default_rng(0)
    rows = rng.integers(0, cfg.vocab_size, (3, 20))
    rows[0, 4] = rows[1, 0] = rows[2, 19] = cfg.eos_token_id
    check(rows, cfg)


# ---------------------------------------------------------------------------------------------
# Incremental (decode) form.

def test_cache_continuation_equals_full_sequence_for_every_split():
    rows = np.array([[7, 8, 9, EOS, 10, 11, 12, 13, 14, EOS, EOS, 15],
                     [BIG, 3, 0, 4, 5, 6, EOS, 7, 8, 9, 10, 11]], np.int32)
    full = np.asarray(ngram_windows(jnp.asarray(rows), REAL))
    for split in range(rows.shape[1] + 1):
        cache = ngram_cache(jnp.asarray(rows[:, :split]), REAL)
        for i in range(split, rows.shape[1]):
            windows, cache = ngram_step(jnp.asarray(rows[:, i]), cache, REAL)
            np.testing.assert_array_equal(np.asarray(windows), full[:, i], err_msg=f"split {split}, position {i}")


def test_cache_respects_lengths_and_segments():
    rows = jnp.asarray([[5, 6, 7, 8, 0, 0], [0, 0, 9, 10, 11, 12]], jnp.int32)
    segments = jnp.asarray([[1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1]], jnp.int32)
    cache = ngram_cache(rows, REAL, segments, lengths=jnp.asarray([4, 6]))
    np.testing.assert_array_equal(np.asarray(cache), [[8, 7, 6], [12, 11, 10]])
    empty = ngram_cache(rows, REAL, lengths=jnp.asarray([0, 1]))
    np.testing.assert_array_equal(np.asarray(empty), [[0, 0, 0], [0, 0, 0]])


# ---------------------------------------------------------------------------------------------
# The embedding module against NumPy.

def numpy_embedding(emb, tokens, cfg):
    token_table = np.asarray(emb.token_table[...], np.float64)
    table = np.asarray(emb.ngram_table[...], np.float64)
    proj = np.asarray(emb.ngram_proj[...], np.float64)
    out = np.zeros(tokens.shape + (cfg.hidden_size,))
    for b in range(tokens.shape[0]):
        ids = python_ngram_ids_of(tokens[b], cfg)
        for i in range(tokens.shape[1]):
            acc = token_table[tokens[b, i]].copy()
            for s in range(cfg.num_ngram_tables):
                acc += table[cfg.ngram_table_offsets[s] + ids[i, s]] @ proj[s]
            out[b, i] = acc / (cfg.num_ngram_tables + 1)
    if cfg.embedding_amplification == "sqrt_d":
        out *= math.sqrt(cfg.hidden_size)
    elif cfg.embedding_amplification == "layernorm":
        mean = out.mean(-1, keepdims=True)
        var = out.var(-1, keepdims=True)
        scale = np.asarray(emb.amplification_norm.scale[...])
        bias = np.asarray(emb.amplification_norm.bias[...])
        out = (out - mean) / np.sqrt(var + 1e-5) * scale + bias
    return out


@pytest.mark.parametrize("amplification", ["none", "sqrt_d", "layernorm"])
def test_embedding_matches_numpy(amplification):
    cfg = get_config("tiny", embedding_amplification=amplification)
    emb = NgramEmbedding(cfg, rngs=nnx.Rngs(1))
    if amplification == "layernorm":  # non-trivial affine parameters
        emb.amplification_norm.scale[...] = jnp.linspace(0.5, 1.5, cfg.hidden_size)
        emb.amplification_norm.bias[...] = jnp.linspace(-0.1, 0.1, cfg.hidden_size)
    rng = np.random.default_rng(2)
    tokens = rng.integers(0, cfg.vocab_size, (2, 9)).astype(np.int32)
    tokens[0, 3] = cfg.eos_token_id
    got = np.asarray(emb(jnp.asarray(tokens)))
    np.testing.assert_allclose(got, numpy_embedding(emb, tokens, cfg), rtol=1e-5, atol=1e-5)


def test_step_embeddings_equal_full_embeddings_for_every_split():
    cfg = get_config("tiny", embedding_amplification="sqrt_d")
    emb = NgramEmbedding(cfg, rngs=nnx.Rngs(3))
    tokens = jnp.asarray([[4, 5, cfg.eos_token_id, 6, 7, 8, 9], [10, 0, 11, 12, cfg.eos_token_id, 13, 14]])
    full = np.asarray(emb(tokens))
    for split in range(tokens.shape[1] + 1):
        cache = ngram_cache(tokens[:, :split], cfg)
        for i in range(split, tokens.shape[1]):
            out, cache = emb.step(tokens[:, i], cache)
            np.testing.assert_allclose(np.asarray(out), full[:, i], rtol=1e-6, atol=1e-6)


def test_without_ngram_it_is_a_plain_embedding():
    cfg = get_config("tiny", ngram_n=0)
    emb = NgramEmbedding(cfg, rngs=nnx.Rngs(0))
    tokens = jnp.asarray([[3, 4, 5]])
    np.testing.assert_array_equal(np.asarray(emb(tokens)), np.asarray(emb.token_table[...])[[[3, 4, 5]]])
    assert not hasattr(emb, "ngram_table")


def test_padded_rows_are_never_hashed_into_at_the_released_sizes():
    """The flat table's padding (ModelConfig.ngram_padded_rows) lies past every row the hash can give:
    sub-table s holds ids < V_s (Python integers, extreme and random windows), starts at its offset,
    and the sub-tables end exactly at ngram_total_rows, the rows Hugging Face stores."""
    sizes = [REAL.ngram_vocab_ratio * V0 + 2 * s + 1 for s in range(REAL.num_ngram_tables)]
    assert list(REAL.ngram_table_sizes) == sizes
    offsets = [sum(sizes[:s]) for s in range(len(sizes))]
    assert list(REAL.ngram_table_offsets) == offsets and offsets[-1] + sizes[-1] == REAL.ngram_total_rows
    assert REAL.ngram_total_rows == 122_683_536 and REAL.ngram_padded_rows % 6144 == 0
    assert 0 <= REAL.ngram_padded_rows - REAL.ngram_total_rows < 6144
    rng = np.random.default_rng(7)
    rows = [[V0 - 1] * 6, [V0 - 1, V0 - 2, V0 - 3, V0 - 4, V0 - 5, V0 - 6], rng.integers(3, V0, 6).tolist(),
            rng.integers(V0 - 1000, V0, 6).tolist()]
    want = np.concatenate([python_ngram_ids_of(row, REAL) for row in rows])  # [positions, S]
    check(rows)  # the model's hash gives exactly these ids
    highest = want.max(axis=0)
    assert all(int(highest[s]) < sizes[s] for s in range(len(sizes)))
    assert max(offsets[s] + int(highest[s]) for s in range(len(sizes))) < REAL.ngram_total_rows


def test_padding_rows_start_zero_and_the_table_splits_over_meshes():
    cfg = get_config("tiny")
    emb = NgramEmbedding(cfg, rngs=nnx.Rngs(0))
    table = np.asarray(emb.ngram_table[...])
    assert table.shape == (cfg.ngram_padded_rows, cfg.ngram_table_width) and cfg.ngram_padded_rows > cfg.ngram_total_rows
    assert not table[cfg.ngram_total_rows:].any() and table[: cfg.ngram_total_rows].std() > 0
    # Every mesh of 2^a or 3 x 2^a devices up to 1024 (3072) splits the released table evenly, into an
    # even number of rows per device (the TPU gather's bf16 row pairs) up to 1024 devices.
    for devices in [2**a for a in range(11)] + [3 * 2**a for a in range(11)]:
        assert REAL.ngram_padded_rows % devices == 0, devices
        if devices <= 1024:
            assert REAL.ngram_padded_rows // devices % 2 == 0, devices
