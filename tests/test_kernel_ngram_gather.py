"""The N-gram gather kernels (TPU and GPU, in interpret mode) against NumPy indexing of lite's ids.

The config has a 40k vocabulary and sub-tables of ~120k rows, so the in-kernel hash needs two
chunks per product (as at the released sizes) while the table stays small (width 4).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from jax.experimental.pallas import tpu as pltpu

from lite.config import get_config
from lite.ngram import ngram_ids, ngram_windows
from pallas_kernels.ngram_gather import RowSpec, kernel_ngram_gather, ngram_gather, scatter_add_rows

CFG = get_config("tiny", vocab_size=40000, ngram_vocab_ratio=3, hidden_size=16)
B, L = 2, 23
TABLE = np.random.default_rng(0).normal(size=(CFG.ngram_total_rows, CFG.ngram_table_width)).astype(np.float32)


@st.composite
def batches(draw, cfg=CFG, length=L):
    """Tokens with frequent EOS and large ids, and packed segment ids (0 = padding)."""
    token = st.one_of(st.just(cfg.eos_token_id), st.integers(0, 9), st.integers(0, cfg.vocab_size - 1))
    tokens = np.asarray(draw(st.lists(token, min_size=B * length, max_size=B * length)), np.int32).reshape(B, length)
    cuts = draw(st.lists(st.booleans(), min_size=B * length, max_size=B * length))
    segments = np.cumsum(np.asarray(cuts).reshape(B, length), axis=1).astype(np.int32)
    return tokens, segments


jitted_ngram_ids = jax.jit(ngram_ids, static_argnums=1)
jitted_windows = jax.jit(ngram_windows, static_argnums=1)


def expected_rows(cfg, tokens, segments):
    """int64[B*L, S] flat rows from lite.ngram.ngram_ids (the model's hash), by NumPy."""
    ids = np.asarray(jitted_ngram_ids(jnp.asarray(tokens), cfg, jnp.asarray(segments)))
    ids = ids.reshape(-1, cfg.num_ngram_tables)
    return ids.astype(np.int64) + np.asarray(cfg.ngram_table_offsets)


@functools.partial(jax.jit, static_argnums=1)
def spec_rows(windows, cfg):
    return jnp.stack(RowSpec.from_config(cfg, hashed=True).rows(lambda c: windows[:, c]), -1)


@settings(max_examples=30, deadline=None)
@given(batch=batches(cfg=get_config("longcat-flash-lite"), length=16))
def test_in_kernel_hash_equals_lite_ngram_ids_at_released_sizes(batch):
    """RowSpec.rows (the int32 re-expression the kernels run) against lite's uint32 hash, 131k vocab."""
    cfg = get_config("longcat-flash-lite")
    tokens, segments = batch
    windows = jitted_windows(jnp.asarray(tokens), cfg, jnp.asarray(segments)).reshape(-1, cfg.ngram_n)
    rows = spec_rows(windows, cfg)
    np.testing.assert_array_equal(np.asarray(rows), expected_rows(cfg, tokens, segments))


@functools.partial(jax.jit, static_argnames=("backend", "hashed"))
def kernel_rows(table, keys, *, backend, hashed):
    return kernel_ngram_gather(table, keys, CFG, hashed, backend=backend, block_tokens=16)


def keys_of(tokens, segments):
    windows = ngram_windows(jnp.asarray(tokens), CFG, jnp.asarray(segments)).reshape(-1, CFG.ngram_n)
    ids = ngram_ids(jnp.asarray(tokens), CFG, jnp.asarray(segments)).reshape(-1, CFG.num_ngram_tables)
    return windows, ids


@pytest.mark.parametrize("backend", ["interpret", "gpu-interpret"])
@settings(max_examples=10, deadline=None)
@given(batch=batches())
def test_kernel_rows_equal_the_table_at_lite_ids(backend, batch):
    tokens, segments = batch
    windows, ids = keys_of(tokens, segments)
    want = TABLE[expected_rows(CFG, tokens, segments)]  # [T, S, w]
    for keys, hashed in ((windows, True), (ids, False)):
        got = kernel_rows(jnp.asarray(TABLE), keys, backend=backend, hashed=hashed)
        np.testing.assert_array_equal(np.asarray(got), want)


def numpy_table_grad(rows, d_rows):
    grad = np.zeros(TABLE.shape, np.float64)
    np.add.at(grad, rows.reshape(-1), d_rows.reshape(-1, TABLE.shape[1]))
    return grad


@pytest.mark.parametrize("backend", ["interpret", "gpu-interpret", "xla"])
def test_table_gradient_is_the_scatter_add_of_row_gradients(backend):
    tokens = np.asarray(np.random.default_rng(1).integers(0, 4, (B, L)), np.int32)  # few distinct n-grams: repeats
    segments = np.ones((B, L), np.int32)
    windows, _ = keys_of(tokens, segments)
    d_rows = np.random.default_rng(2).normal(size=(B * L, CFG.num_ngram_tables, CFG.ngram_table_width))

    def loss(table):
        if backend == "xla":
            rows = ngram_gather(table, CFG, windows=windows, implementation="xla")
        else:
            rows = kernel_ngram_gather(table, windows, CFG, True, backend=backend, block_tokens=16)
        return jnp.sum(rows * d_rows.astype(np.float32))

    grad = jax.jit(jax.grad(loss))(jnp.asarray(TABLE))
    np.testing.assert_allclose(np.asarray(grad), numpy_table_grad(expected_rows(CFG, tokens, segments), d_rows),
                               rtol=1e-5, atol=1e-5)


def test_scatter_add_is_deterministic_and_exact_for_unique_rows():
    rows = jnp.asarray([5, 1, 5, 5, 0, 1, 7], jnp.int32)
    grads = jnp.asarray(np.random.default_rng(3).normal(size=(7, 3)), jnp.float32)
    first, second = scatter_add_rows(rows, grads, 8), jax.jit(scatter_add_rows, static_argnums=2)(rows, grads, 8)
    np.testing.assert_array_equal(np.asarray(first), np.asarray(second))
    want = np.zeros((8, 3))
    np.add.at(want, np.asarray(rows), np.asarray(grads, np.float64))
    np.testing.assert_allclose(np.asarray(first), want, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(first[7]), np.asarray(grads[6]))


def test_tpu_simulator_finds_no_races_or_out_of_bounds_dmas():
    tokens = np.asarray(np.random.default_rng(4).integers(0, CFG.vocab_size, (B, L)), np.int32)
    segments = np.ones((B, L), np.int32)
    windows, _ = keys_of(tokens, segments)
    params = pltpu.InterpretParams(detect_races=True, out_of_bounds_reads="raise")
    got = kernel_ngram_gather(jnp.asarray(TABLE), windows, CFG, True, backend=params, block_tokens=16)
    np.testing.assert_array_equal(np.asarray(got), TABLE[expected_rows(CFG, tokens, segments)])


def test_dispatch_keeps_leading_dims_and_rejects_bad_keys():
    tokens = np.asarray(np.random.default_rng(5).integers(0, CFG.vocab_size, (B, L)), np.int32)
    ids = ngram_ids(jnp.asarray(tokens), CFG)
    want = TABLE[expected_rows(CFG, tokens, np.ones((B, L), np.int32))].reshape(B, L, CFG.num_ngram_tables, -1)
    for implementation in ("auto", "pallas"):
        got = ngram_gather(jnp.asarray(TABLE), CFG, ids=ids, implementation=implementation)
        np.testing.assert_array_equal(np.asarray(got), want)
    with pytest.raises(ValueError, match="exactly one of windows"):
        ngram_gather(jnp.asarray(TABLE), CFG, ids=ids, windows=ids)
    with pytest.raises(ValueError, match=r"ids must be integers \[\.\.\., 4\]"):
        ngram_gather(jnp.asarray(TABLE), CFG, ids=ids[..., :3])
    with pytest.raises(ValueError, match="table must be"):
        ngram_gather(jnp.asarray(TABLE[:10]), CFG, ids=ids)
