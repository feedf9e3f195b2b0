"""The N-gram gather kernels (TPU and GPU, in interpret mode) against NumPy indexing of lite's ids.

The config has a 40k vocabulary and sub-tables of ~120k rows, so the in-kernel hash needs two
chunks per product (as at the released sizes) while the table stays small (width 4).
"""

import functools
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from flax import nnx
from jax.experimental.pallas import tpu as pltpu

import lite.ngram
from lite.config import get_config
from lite.ngram import NgramEmbedding, ngram_cache, ngram_ids, ngram_windows, row_spec
from pallas_kernels.ngram_gather import kernel_ngram_gather, ngram_gather, scatter_add_rows
from oracles import python_ngram_ids_of
from pallas_kernels.ngram_gather import tpu as tpu_gather

CFG = get_config("tiny", vocab_size=40000, ngram_vocab_ratio=3, hidden_size=16)
SPEC = row_spec(CFG)
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


jitted_windows = jax.jit(ngram_windows, static_argnums=1)


def expected_rows(cfg, tokens, segments):
    """int64[B*L, S] flat rows: the hash in Python integers (tests/oracles.py) plus the sub-table offsets."""
    ids = np.concatenate([python_ngram_ids_of(row, cfg, segs) for row, segs in zip(tokens, segments)])
    return ids + np.asarray(cfg.ngram_table_offsets)


@functools.partial(jax.jit, static_argnums=1)
def spec_rows(windows, cfg):
    return jnp.stack(row_spec(cfg).kernel_rows(lambda c: windows[:, c], "windows"), -1)


@settings(max_examples=30, deadline=None)
@given(batch=batches(cfg=get_config("longcat-flash-lite"), length=16))
def test_in_kernel_hash_equals_python_integers_at_released_sizes(batch):
    """RowSpec.kernel_rows (the int32 form the kernels run) against Python integers, 131k vocab."""
    cfg = get_config("longcat-flash-lite")
    tokens, segments = batch
    windows = jitted_windows(jnp.asarray(tokens), cfg, jnp.asarray(segments)).reshape(-1, cfg.ngram_n)
    rows = spec_rows(windows, cfg)
    np.testing.assert_array_equal(np.asarray(rows), expected_rows(cfg, tokens, segments))


@functools.partial(jax.jit, static_argnames=("backend", "key_kind"))
def kernel_rows(table, keys, *, backend, key_kind):
    return kernel_ngram_gather(table, keys, SPEC, key_kind, backend=backend, block_tokens=16)


def keys_of(tokens, segments):
    windows = ngram_windows(jnp.asarray(tokens), CFG, jnp.asarray(segments)).reshape(-1, CFG.ngram_n)
    ids = ngram_ids(jnp.asarray(tokens), CFG, jnp.asarray(segments)).reshape(-1, CFG.num_ngram_tables)
    return windows, ids


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("backend", ["interpret", "gpu-interpret"])
@settings(max_examples=10, deadline=None)
@given(batch=batches())
def test_kernel_rows_equal_the_table_at_lite_ids(backend, dtype, batch):
    tokens, segments = batch
    windows, ids = keys_of(tokens, segments)
    table = jnp.asarray(TABLE, dtype)
    want = np.asarray(table)[expected_rows(CFG, tokens, segments)]  # [T, S, w]
    for keys, key_kind in ((windows, "windows"), (ids, "ids")):
        got = kernel_rows(table, keys, backend=backend, key_kind=key_kind)
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
            rows = ngram_gather(table, SPEC, windows=windows, implementation="xla")
        else:
            rows = kernel_ngram_gather(table, windows, SPEC, "windows", backend=backend, block_tokens=16)
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


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_tpu_simulator_finds_no_races_or_out_of_bounds_dmas(dtype):
    tokens = np.asarray(np.random.default_rng(4).integers(0, CFG.vocab_size, (B, L)), np.int32)
    segments = np.ones((B, L), np.int32)
    windows, _ = keys_of(tokens, segments)
    rows = expected_rows(CFG, tokens, segments)
    table = jnp.asarray(TABLE, dtype)
    params = pltpu.InterpretParams(detect_races=True, out_of_bounds_reads="raise")
    got = kernel_ngram_gather(table, windows, SPEC, "windows", backend=params, block_tokens=16)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(table)[rows])


def test_bf16_rows_and_table_gradient_equal_the_xla_reference():
    """bf16 tables go through row pairs on TPU (tpu.py): forward and VJP against the XLA reference,
    bit for bit, with ids that hit the first and the last row of the table (both halves of a pair)."""
    rng = np.random.default_rng(6)
    ids = rng.integers(0, min(CFG.ngram_table_sizes) - 1, (B * L, CFG.num_ngram_tables)).astype(np.int32)
    ids[0, 0], ids[1, -1] = 0, CFG.ngram_table_sizes[-1] - 1  # flat rows 0 and R - 1
    ids[2:6] = ids[6:10] ^ 1  # adjacent rows: both halves of row pairs
    table = jnp.asarray(TABLE, jnp.bfloat16)
    d_rows = jnp.asarray(rng.normal(size=(B * L, CFG.num_ngram_tables, CFG.ngram_table_width)), jnp.float32)

    @functools.partial(jax.jit, static_argnums=1)
    @functools.partial(jax.value_and_grad, has_aux=True)
    def loss(table, backend):
        if backend == "xla":
            rows = ngram_gather(table, SPEC, ids=ids, implementation="xla")
        else:
            rows = kernel_ngram_gather(table, jnp.asarray(ids), SPEC, "ids", backend=backend, block_tokens=16)
        return jnp.sum(rows.astype(jnp.float32) * d_rows), rows

    (_, want), want_grad = loss(table, "xla")
    for backend in ("interpret", pltpu.InterpretParams(out_of_bounds_reads="raise")):
        (_, got), grad = loss(table, backend)
        assert got.dtype == grad.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
        np.testing.assert_array_equal(np.asarray(grad), np.asarray(want_grad))


def test_tpu_kernel_refuses_tables_it_cannot_copy():
    keys = jnp.zeros((4, CFG.num_ngram_tables), jnp.int32)
    with pytest.raises(ValueError, match="even number of rows"):
        tpu_gather.gather(jnp.zeros((7, 4), jnp.bfloat16), keys, jnp.int32(0), SPEC, "ids", interpret=True)
    with pytest.raises(ValueError, match="float16 tables are not supported"):
        tpu_gather.gather(jnp.zeros((8, 4), jnp.float16), keys, jnp.int32(0), SPEC, "ids", interpret=True)


def test_dispatch_keeps_leading_dims_and_rejects_bad_keys():
    tokens = np.asarray(np.random.default_rng(5).integers(0, CFG.vocab_size, (B, L)), np.int32)
    ids = ngram_ids(jnp.asarray(tokens), CFG)
    want = TABLE[expected_rows(CFG, tokens, np.ones((B, L), np.int32))].reshape(B, L, CFG.num_ngram_tables, -1)
    for implementation in ("auto", "pallas"):
        got = ngram_gather(jnp.asarray(TABLE), SPEC, ids=ids, implementation=implementation)
        np.testing.assert_array_equal(np.asarray(got), want)
    with pytest.raises(ValueError, match="exactly one of windows"):
        ngram_gather(jnp.asarray(TABLE), SPEC, ids=ids, windows=ids)
    with pytest.raises(ValueError, match=r"ids must be integers \[\.\.\., 4\]"):
        ngram_gather(jnp.asarray(TABLE), SPEC, ids=ids[..., :3])
    with pytest.raises(ValueError, match="table must be"):
        ngram_gather(jnp.asarray(TABLE[:10]), SPEC, ids=ids)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_embedding_hands_windows_to_the_kernel_and_matches_xla(dtype, monkeypatch):
    """NgramEmbedding's prefill (`__call__`) and decode (`step`) give the gather token windows (the
    fused path); with the gather forced onto the TPU kernel (interpret mode) the embeddings and the
    table gradient equal the XLA reference's bit for bit."""
    cfg = CFG.replace(param_dtype=dtype, compute_dtype=dtype)
    emb = NgramEmbedding(cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(7)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (B, 9)), jnp.int32).at[0, 4].set(cfg.eos_token_id)
    segments = jnp.asarray([[1] * 9, [1] * 5 + [2] * 4], jnp.int32)

    def run():  # traced afresh on every call, so the gather is looked up again
        @nnx.jit
        def prefill_and_table_grad(emb):
            grads = nnx.grad(lambda emb: jnp.sum(emb(tokens, segments).astype(jnp.float32) ** 2))(emb)
            return emb(tokens, segments), grads["ngram_table"][...]

        step = nnx.jit(lambda emb, new_tokens, cache: emb.step(new_tokens, cache))
        cache = ngram_cache(tokens[:1, :3], cfg)
        steps = []
        for i in range(3, tokens.shape[1]):
            out, cache = step(emb, tokens[:1, i], cache)
            steps.append(out)
        prefill, table_grad = prefill_and_table_grad(emb)
        return prefill, jnp.stack(steps), table_grad

    want = run()  # CPU: "auto" is the XLA reference
    keys = []

    def forced(table, spec, **kwargs):
        keys.append(tuple(kwargs))
        return ngram_gather(table, spec, **kwargs, implementation="pallas")

    monkeypatch.setattr(lite.ngram, "ngram_gather", forced)
    got = run()
    assert keys and set(keys) == {("windows",)}, keys
    for name, a, b in zip(("prefill", "decode", "table gradient"), got, want):
        assert a.dtype == b.dtype == jnp.dtype(dtype), name
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32), err_msg=name)
    assert np.abs(np.asarray(want[2], np.float32)).sum() > 0


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("backend", ["interpret", "gpu-interpret", "xla", "simulator"])
def test_a_table_shard_gives_its_own_rows_and_zeros_elsewhere(backend, dtype):
    """One device's shard (sharding.ngram): flat rows row_start .. row_start + n - 1 come from the
    shard, every other row is zeros, and only owned rows get gradient; the shard holds about
    a third of the lookups."""
    tokens = np.asarray(np.random.default_rng(8).integers(0, CFG.vocab_size, (B, L)), np.int32)
    segments = np.ones((B, L), np.int32)
    windows, _ = keys_of(tokens, segments)
    rows = expected_rows(CFG, tokens, segments)  # [T, S]
    start, size = 2 * (int(np.median(rows)) // 2), 2 * (CFG.ngram_total_rows // 6)  # even: bf16 row pairs
    windows = np.asarray(windows)
    shard = jnp.asarray(TABLE[start:start + size], dtype)
    owned = (rows >= start) & (rows < start + size)
    assert 0.2 < owned.mean() < 0.8
    want = np.where(owned[..., None], np.asarray(jnp.asarray(TABLE, dtype))[np.clip(rows, start, start + size - 1)], 0)
    d_rows = np.random.default_rng(9).normal(size=want.shape).astype(np.float32)
    want_grad = np.zeros((size, TABLE.shape[1]))
    np.add.at(want_grad, rows[owned] - start, d_rows[owned])

    def loss(shard):
        if backend == "xla":
            got = ngram_gather(shard, SPEC, windows=jnp.asarray(windows), row_start=start, implementation="xla")
        else:
            kind = pltpu.InterpretParams(detect_races=True, out_of_bounds_reads="raise") if backend == "simulator" \
                else backend
            got = kernel_ngram_gather(shard, jnp.asarray(windows), SPEC, "windows", backend=kind, row_start=start,
                                      block_tokens=16)
        return jnp.sum(got.astype(jnp.float32) * d_rows), got

    (_, got), grad = jax.jit(jax.value_and_grad(loss, has_aux=True))(shard)
    np.testing.assert_array_equal(np.asarray(got, np.float32), want.astype(np.float32))
    np.testing.assert_allclose(np.asarray(grad, np.float32), want_grad, rtol=1e-2 if dtype == "bfloat16" else 1e-5,
                               atol=1e-2 if dtype == "bfloat16" else 1e-5)


def test_compile_check_tables_are_the_presets():
    """pallas_kernels.tpu_compile_check spells the demo's and the released layout's tables out (the
    kernels may not import lite): they must be what the configs give. In its own process: importing
    it sets libtpu's environment."""
    check = """
from lite.config import get_config
from lite.ngram import row_spec
from pallas_kernels import tpu_compile_check as c
demo, lite = get_config("demo"), get_config("longcat-flash-lite", ngram_vocab_ratio=1)
assert (c.DEMO, c.DEMO_WIDTH) == (row_spec(demo), demo.ngram_table_width)
assert (c.LITE, c.LITE_WIDTH) == (row_spec(lite), lite.ngram_table_width)
"""
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def test_key_kinds_are_named():
    with pytest.raises(ValueError, match="keys must be one of"):
        SPEC.num_keys("hashed")
