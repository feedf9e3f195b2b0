"""Hashed N-gram embedding (ARCHITECTURE.md section 2).

Token t_i is embedded as the average of its own row E_0(t_i) and S = (N-1)K projected rows, one per
sub-table, each found by hashing the n-gram t_{i-n+1..i} (n = 2..N) with a sub-table's modulus:

    H_s = ( sum_{j<n} t_{i-j} * (V0^j mod V_s) ) mod V_s

Everything below is built on one object, the *window*: `window[..., j] = t_{i-j}` for j = 0..N-1,
with 0 wherever t_{i-j} lies before the start of token i's segment. A token of 0 adds nothing to the
hash, so "before the segment start" and "before the sequence start" are the same thing. The full
sequence form builds windows by shifting; the decode form keeps the last N-1 window entries per
sequence (the N-gram cache). Both hand windows to the same gather, which hashes them (inside the
Pallas kernel on TPU/GPU, with `RowSpec.hash_windows` in XLA), so they agree by construction.

Segment starts: position 0, every change of `segment_ids`, and the position after every EOS
(an EOS is never left context; at the EOS itself its n-grams still see the tokens before it).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from lite.config import ModelConfig
from lite.layers import axes_metadata, param
from pallas_kernels.ngram_gather import RowSpec, ngram_gather
from sharding.mesh import active_mesh
from sharding.ngram import gather_rows


# ---------------------------------------------------------------------------------------------
# The hashed table: its spec (the hash itself is the gather op's, pallas_kernels.ngram_gather.rows).

@functools.cache
def row_spec(cfg: ModelConfig) -> RowSpec:
    """The flat N-gram table of a config: sub-table sizes V_s and orders, the window of N tokens."""
    if not cfg.has_ngram:
        raise ValueError(f"{cfg.name} has no N-gram embedding (ngram_n >= 2 is needed)")
    return RowSpec(cfg.vocab_size, cfg.ngram_n, cfg.ngram_table_sizes, cfg.ngram_table_orders)


# ---------------------------------------------------------------------------------------------
# Windows: full sequence and incremental.

def segment_starts(tokens: jax.Array, eos_token_id: int, segment_ids: jax.Array | None = None) -> jax.Array:
    """int32[B, L]: for every position, the first position of its segment."""
    _, length = tokens.shape
    after_previous = ((0, 0), (1, 0))  # compare each position with the one before it
    is_start = jnp.pad(tokens[:, :-1] == eos_token_id, after_previous, constant_values=True)
    if segment_ids is not None:
        is_start |= jnp.pad(segment_ids[:, 1:] != segment_ids[:, :-1], after_previous)
    positions = jnp.arange(length, dtype=jnp.int32)
    return jax.lax.cummax(jnp.where(is_start, positions, 0), axis=1)


def ngram_windows(tokens: jax.Array, cfg: ModelConfig, segment_ids: jax.Array | None = None) -> jax.Array:
    """int32[B, L] tokens -> int32[B, L, N] windows (see the module docstring)."""
    tokens = tokens.astype(jnp.int32)
    _, length = tokens.shape
    start = segment_starts(tokens, cfg.eos_token_id, segment_ids)
    positions = jnp.arange(length, dtype=jnp.int32)
    lags = []
    for j in range(cfg.ngram_n):
        shifted = jnp.pad(tokens, ((0, 0), (j, 0)))[:, :length]
        lags.append(jnp.where(positions - j >= start, shifted, 0))
    return jnp.stack(lags, axis=-1)


def ngram_ids(tokens: jax.Array, cfg: ModelConfig, segment_ids: jax.Array | None = None) -> jax.Array:
    """int32[B, L] tokens -> int32[B, L, S] sub-table row ids (local to each sub-table)."""
    return row_spec(cfg).hash_windows(ngram_windows(tokens, cfg, segment_ids))


def ngram_cache(tokens: jax.Array, cfg: ModelConfig, segment_ids: jax.Array | None = None,
                lengths: jax.Array | None = None) -> jax.Array:
    """The N-gram cache after the first `lengths[b]` tokens of each row (default: all of them).

    int32[B, N-1]: cache[:, j-1] = t_{i-j} for the next position i; zeros after an EOS or when the
    row is empty, exactly like a segment start.
    """
    tokens = tokens.astype(jnp.int32)
    batch, length = tokens.shape
    if lengths is None:
        lengths = jnp.full((batch,), length, jnp.int32)
    last = jnp.maximum(lengths - 1, 0)
    window = jnp.take_along_axis(ngram_windows(tokens, cfg, segment_ids), last[:, None, None], axis=1)[:, 0]
    reset = (lengths == 0) | (window[:, 0] == cfg.eos_token_id)
    return jnp.where(reset[:, None], 0, window[:, : cfg.ngram_n - 1])


def ngram_step(new_tokens: jax.Array, cache: jax.Array, cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """One decode step: int32[B] tokens, int32[B, N-1] cache -> (int32[B, N] windows, new cache).

    The windows are the new tokens' rows of `ngram_windows`; `row_spec(cfg).hash_windows` turns them into ids.
    """
    new_tokens = new_tokens.astype(jnp.int32)
    window = jnp.concatenate([new_tokens[:, None], cache], axis=1)  # [B, N]
    new_cache = jnp.where((new_tokens == cfg.eos_token_id)[:, None], 0, window[:, :-1])
    return window, new_cache


# ---------------------------------------------------------------------------------------------
# The embedding module.

class NgramEmbedding(nnx.Module):
    """Token embedding plus hashed N-gram embedding, averaged; a plain embedding when ngram_n = 0.

    All sub-tables live in one flat table (`ngram_table`, rows of sub-table s start at
    `cfg.ngram_table_offsets[s]`) so that a lookup is one gather, as in the serving engines. Its
    `cfg.ngram_padded_rows` rows end in zero rows that pad it to a multiple every mesh divides; no
    hash reaches them, so they get no gradient and AdamW (zero gradient, zero value) keeps them zero.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        init = nnx.initializers.normal(cfg.initializer_range)
        pdtype = cfg.jnp_param_dtype
        d = cfg.hidden_size
        self.token_table = param(init(rngs.params(), (cfg.vocab_size, d), pdtype), "token_rows", "embed")  # [V0, D]
        if cfg.has_ngram:
            s, w = cfg.num_ngram_tables, cfg.ngram_table_width
            table = init(rngs.params(), (cfg.ngram_total_rows, w), pdtype)  # [R, D/S]
            padding = jnp.zeros((cfg.ngram_padded_rows - cfg.ngram_total_rows, w), pdtype)  # see NGRAM_ROW_MULTIPLE
            self.ngram_table = param(jnp.concatenate([table, padding]), "ngram_rows", "ngram_width")  # [R_pad, D/S]
            self.ngram_proj = param(init(rngs.params(), (s, w, d), pdtype),  # [S, D/S, D]
                                    "ngram_tables", "ngram_width", "embed")
            if cfg.embedding_amplification == "layernorm":
                self.amplification_norm = nnx.LayerNorm(d, epsilon=1e-5, dtype=jnp.float32, param_dtype=pdtype,
                                                        scale_metadata=axes_metadata("norm"),
                                                        bias_metadata=axes_metadata("norm"), rngs=rngs)

    def __call__(self, tokens: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
        """int32[B, L] -> [B, L, D] in the compute dtype."""
        windows = ngram_windows(tokens, self.cfg, segment_ids) if self.cfg.has_ngram else None
        return self.embed(tokens, windows)

    def step(self, new_tokens: jax.Array, cache: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Decode form: int32[B] tokens and int32[B, N-1] cache -> ([B, D], new cache)."""
        if not self.cfg.has_ngram:
            return self.embed(new_tokens, None), cache
        windows, cache = ngram_step(new_tokens, cache, self.cfg)
        return self.embed(new_tokens, windows), cache

    def embed(self, tokens: jax.Array, windows: jax.Array | None) -> jax.Array:
        """int32[...] tokens and their int32[..., N] n-gram windows -> [..., D].

        The windows go to the fused kernel, which hashes them on the fly (XLA's hash and `jnp.take`
        on CPU); under a mesh to the row-sharded gather, which runs the same kernel on each
        device's table shard (sharding.ngram).
        """
        cfg = self.cfg
        dtype = cfg.jnp_compute_dtype
        out = jnp.take(self.token_table[...], tokens, axis=0).astype(dtype)
        if not cfg.has_ngram:
            return out
        mesh = active_mesh()  # under jax.set_mesh: the table's rows are split over the devices
        if mesh is not None:
            gathered = gather_rows(self.ngram_table[...], row_spec(cfg), mesh, windows=windows).astype(dtype)
        else:
            gathered = ngram_gather(self.ngram_table[...], row_spec(cfg), windows=windows).astype(dtype)  # [..., S, D/S]
        projected = jnp.einsum("...sw,swd->...d", gathered, self.ngram_proj[...].astype(dtype))
        out = (out + projected) / (cfg.num_ngram_tables + 1)
        if cfg.embedding_amplification == "sqrt_d":
            out = out * math.sqrt(cfg.hidden_size)
        elif cfg.embedding_amplification == "layernorm":
            out = self.amplification_norm(out).astype(dtype)
        return out
