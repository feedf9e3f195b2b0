"""Hashed N-gram embedding (ARCHITECTURE.md section 2).

Token t_i is embedded as the average of its own row E_0(t_i) and S = (N-1)K projected rows, one per
sub-table, each found by hashing the n-gram t_{i-n+1..i} (n = 2..N) with a sub-table's modulus:

    H_s = ( sum_{j<n} t_{i-j} * (V0^j mod V_s) ) mod V_s

Everything below is built on one object, the *window*: `window[..., j] = t_{i-j}` for j = 0..N-1,
with 0 wherever t_{i-j} lies before the start of token i's segment. A token of 0 adds nothing to the
hash, so "before the segment start" and "before the sequence start" are the same thing. The full
sequence form builds windows by shifting; the decode form keeps the last N-1 window entries per
sequence (the N-gram cache). Both hand windows to the same gather, which hashes them (inside the
Pallas kernel on TPU/GPU, with `hash_windows` in XLA), so they agree by construction.

Segment starts: position 0, every change of `segment_ids`, and the position after every EOS
(an EOS is never left context; at the EOS itself its n-grams still see the tokens before it).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lite.config import ModelConfig
from lite.layers import axes_metadata, param
from sharding.mesh import active_mesh


# ---------------------------------------------------------------------------------------------
# Hash, exact in 32-bit integers.

def hash_coefficients(cfg: ModelConfig) -> tuple[np.ndarray, np.ndarray]:
    """coefficients[j, s] = V0^j mod V_s for j < order(s), else 0; moduli[s] = V_s (both uint32)."""
    sizes, orders = cfg.ngram_table_sizes, cfg.ngram_table_orders
    coefficients = np.zeros((cfg.ngram_n, len(sizes)), np.uint32)
    for s, (size, order) in enumerate(zip(sizes, orders)):
        for j in range(order):
            coefficients[j, s] = pow(cfg.vocab_size, j, size)  # reduced first: no overflow
    return coefficients, np.asarray(sizes, np.uint32)


def _mulmod(a, b, modulus, *, a_bits: int, modulus_bits: int):
    """(a * b) mod modulus for uint32 a < 2^a_bits and b < modulus < 2^modulus_bits.

    The product reaches 2^41 at the released sizes, so it is formed by Horner's rule over chunks
    of a that are narrow enough that no intermediate leaves 32 bits:
    r < m and chunk < 2^w give r * 2^w < 2^32 and chunk * b < 2^32 when m <= 2^(32-w).
    """
    chunk_bits = 32 - modulus_bits
    chunk_mask = jnp.uint32((1 << chunk_bits) - 1)
    r = jnp.zeros(jnp.broadcast_shapes(a.shape, b.shape, modulus.shape), jnp.uint32)
    for shift in reversed(range(0, a_bits, chunk_bits)):
        chunk = (a >> jnp.uint32(shift)) & chunk_mask
        r = ((r << jnp.uint32(chunk_bits)) % modulus + (chunk * b) % modulus) % modulus
    return r


def hash_windows(windows: jax.Array, cfg: ModelConfig) -> jax.Array:
    """int32[..., N] windows -> int32[..., S] row ids, local to each sub-table."""
    coefficients, moduli = hash_coefficients(cfg)
    modulus_bits = int(moduli.max()).bit_length()
    a_bits = max(cfg.vocab_size - 1, 1).bit_length()
    t = windows.astype(jnp.uint32)[..., :, None]  # [..., N, 1]
    terms = _mulmod(t, jnp.asarray(coefficients), jnp.asarray(moduli),
                    a_bits=a_bits, modulus_bits=modulus_bits)  # [..., N, S], each < V_s
    ids = jnp.zeros(terms.shape[:-2] + terms.shape[-1:], jnp.uint32)
    for j in range(cfg.ngram_n):  # residues < 2^31: the sum of two cannot wrap
        ids = (ids + terms[..., j, :]) % jnp.asarray(moduli)
    return ids.astype(jnp.int32)


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
    return hash_windows(ngram_windows(tokens, cfg, segment_ids), cfg)


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

    The windows are the new tokens' rows of `ngram_windows`; `hash_windows` turns them into ids.
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
    `cfg.ngram_table_offsets[s]`) so that a lookup is one gather, as in the serving engines.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        init = nnx.initializers.normal(cfg.initializer_range)
        pdtype = cfg.jnp_param_dtype
        d = cfg.hidden_size
        self.token_table = param(init(rngs.params(), (cfg.vocab_size, d), pdtype), "token_rows", "embed")  # [V0, D]
        if cfg.has_ngram:
            s, w = cfg.num_ngram_tables, cfg.ngram_table_width
            self.ngram_table = param(init(rngs.params(), (cfg.ngram_total_rows, w), pdtype),  # [R, D/S]
                                     "ngram_rows", "ngram_width")
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
        # Imported here: pallas_kernels imports this module.
        from pallas_kernels.ngram_gather import ngram_gather

        mesh = active_mesh()  # under jax.set_mesh: the table's rows are split over the devices
        if mesh is not None:
            from sharding.ngram import gather_rows

            gathered = gather_rows(self.ngram_table[...], cfg, mesh, windows=windows).astype(dtype)
        else:
            gathered = ngram_gather(self.ngram_table[...], cfg, windows=windows).astype(dtype)  # [..., S, D/S]
        projected = jnp.einsum("...sw,swd->...d", gathered, self.ngram_proj[...].astype(dtype))
        out = (out + projected) / (cfg.num_ngram_tables + 1)
        if cfg.embedding_amplification == "sqrt_d":
            out = out * math.sqrt(cfg.hidden_size)
        elif cfg.embedding_amplification == "layernorm":
            out = self.amplification_norm(out).astype(dtype)
        return out
