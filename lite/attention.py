"""Multi-head latent attention (MLA) with LongCat-Flash's latent scale corrections (section 5)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from lite.config import ModelConfig
from lite.layers import RMSNorm, linear
from lite.rope import apply_rope, softmax_scale

# The q / kv latent norms use a fixed epsilon in the reference, not the config's rms_norm_eps.
LATENT_NORM_EPS = 1e-6


def attention_mask(segment_ids: jax.Array) -> jax.Array:
    """bool[B, 1, L, L]: causal and within one segment."""
    length = segment_ids.shape[1]
    causal = jnp.tril(jnp.ones((length, length), bool))
    same_segment = segment_ids[:, :, None] == segment_ids[:, None, :]
    return (causal & same_segment)[:, None]


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float) -> jax.Array:
    """q, k [B, L, H, qk], v [B, L, H, v], mask bool[B, 1, L, L] from `attention_mask` -> [B, L, H, v].

    Softmax attention in float32 scores. With L even, the queries go in two halves and the first
    half's scores stop at key L/2: the mask is causal, so the quarter of the square above it is never
    computed (the demo's attention, forward and backward on CPU: 1.7x faster).
    """
    length = q.shape[1]
    halves = [(0, length)] if length % 2 else [(0, length // 2), (length // 2, length)]
    outs = []
    for start, end in halves:  # queries [start, end) see keys [0, end) at most
        scores = jnp.einsum("bqhd,bkhd->bhqk", q[:, start:end], k[:, :end], preferred_element_type=jnp.float32)
        scores = jnp.where(mask[:, :, start:end, :end], scores * scale, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        outs.append(jnp.einsum("bhqk,bkhd->bqhd", probs, v[:, :end]))
    return jnp.concatenate(outs, axis=1)


class MLAttention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, h = cfg.hidden_size, cfg.num_heads
        self.q_a_proj = linear(cfg, d, cfg.q_lora_rank, ("embed", "q_lora"), rngs=rngs)
        self.q_a_norm = RMSNorm(cfg, cfg.q_lora_rank, LATENT_NORM_EPS)
        self.q_b_proj = linear(cfg, cfg.q_lora_rank, h * cfg.qk_head_dim, ("q_lora", "heads"), rngs=rngs)
        self.kv_a_proj = linear(cfg, d, cfg.kv_lora_rank + cfg.qk_rope_head_dim, ("embed", "kv_lora"), rngs=rngs)
        self.kv_a_norm = RMSNorm(cfg, cfg.kv_lora_rank, LATENT_NORM_EPS)
        self.kv_b_proj = linear(cfg, cfg.kv_lora_rank, h * (cfg.qk_nope_head_dim + cfg.v_head_dim), ("kv_lora", "heads"),
                                rngs=rngs)
        self.o_proj = linear(cfg, h * cfg.v_head_dim, d, ("heads", "embed"), rngs=rngs)

    def queries(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> tuple[jax.Array, jax.Array]:
        """[B, L, D] -> q_nope [B, L, H, nope], q_rope [B, L, H, rope] (scaled, rotated)."""
        cfg = self.cfg
        q = self.q_b_proj(self.q_a_norm(self.q_a_proj(x)))
        q = q.reshape(*x.shape[:-1], cfg.num_heads, cfg.qk_head_dim) * math.sqrt(cfg.hidden_size / cfg.q_lora_rank)
        q_nope, q_rope = q[..., : cfg.qk_nope_head_dim], q[..., cfg.qk_nope_head_dim:]
        return q_nope, apply_rope(q_rope, cos[..., None, :], sin[..., None, :])

    def latents(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> tuple[jax.Array, jax.Array]:
        """[B, L, D] -> latent c [B, L, kv_lora] and shared RoPE key [B, L, rope]: all a decode cache holds."""
        cfg = self.cfg
        ckv = self.kv_a_proj(x)
        latent, k_rope = ckv[..., : cfg.kv_lora_rank], ckv[..., cfg.kv_lora_rank:]
        latent = self.kv_a_norm(latent) * math.sqrt(cfg.hidden_size / cfg.kv_lora_rank)
        return latent, apply_rope(k_rope, cos, sin)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array) -> jax.Array:
        """x [B, L, D], cos/sin [B, L, rope/2], mask bool[B, 1, L, L] (`attention_mask`) -> [B, L, D]."""
        cfg = self.cfg
        q_nope, q_rope = self.queries(x, cos, sin)
        latent, k_rope = self.latents(x, cos, sin)
        kv = self.kv_b_proj(latent).reshape(*latent.shape[:-1], cfg.num_heads, cfg.qk_nope_head_dim + cfg.v_head_dim)
        k_nope, v = kv[..., : cfg.qk_nope_head_dim], kv[..., cfg.qk_nope_head_dim:]
        # One product over the joined head dims (nope + rope), the shared RoPE key repeated per head: two
        # products and their sum would make XLA write, read and add two [B, H, L, L] score arrays.
        q = jnp.concatenate([q_nope, q_rope], axis=-1)  # [B, L, H, qk_head_dim]
        k = jnp.concatenate([k_nope, jnp.broadcast_to(k_rope[..., None, :], (*k_nope.shape[:-1], k_rope.shape[-1]))],
                            axis=-1)
        out = causal_attention(q, k, v, mask, softmax_scale(cfg))
        return self.o_proj(out.reshape(*x.shape[:-1], cfg.num_heads * cfg.v_head_dim))

    def cache_entries(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
        """[..., D] -> [..., kv_lora + rope]: per token the latent c, then the rotated RoPE key (a decode cache row)."""
        return jnp.concatenate(self.latents(x, cos, sin), axis=-1)

    def decode(self, x: jax.Array, cos: jax.Array, sin: jax.Array, cache: jax.Array,
               lengths: jax.Array) -> tuple[jax.Array, jax.Array]:
        """One new token per sequence: appended to the cache, then attended over it with kv_b absorbed.

        x [B, D], cos/sin [B, rope/2]; cache [B, T, kv_lora + rope] (`cache_entries` rows) of which the
        first lengths[b] are valid -> (out [B, D], the cache with the new token's row at lengths[b]).
        Scores use q_nope . (W_k c) = (W_k^T q_nope) . c and the output W_v (sum_t p_t c_t), so per step
        the cache is read at kv_lora + rope numbers per token instead of expanding H * (nope + v) per
        token; latent and RoPE key share one row, so one product gives both halves of every score.
        """
        cfg = self.cfg
        q_nope, q_rope = self.queries(x, cos, sin)  # [B, H, nope], [B, H, rope]
        # Written before reading: the new token attends to itself through the cache like any other.
        cache = cache.at[jnp.arange(x.shape[0]), lengths].set(self.cache_entries(x, cos, sin))
        kv_b = self.kv_b_proj.kernel[...].astype(cache.dtype).reshape(
            cfg.kv_lora_rank, cfg.num_heads, cfg.qk_nope_head_dim + cfg.v_head_dim)
        w_k, w_v = kv_b[..., : cfg.qk_nope_head_dim], kv_b[..., cfg.qk_nope_head_dim:]  # [C, H, nope], [C, H, v]
        q = jnp.concatenate([jnp.einsum("bhd,chd->bhc", q_nope, w_k), q_rope], axis=-1)  # [B, H, C + rope]
        scores = jnp.einsum("bhc,btc->bht", q, cache, preferred_element_type=jnp.float32)
        valid = jnp.arange(cache.shape[1]) <= lengths[:, None]  # [B, T]: padding and stale slots excluded
        scores = jnp.where(valid[:, None, :], scores * softmax_scale(cfg), jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(cache.dtype)
        # Over whole rows, then the latent half kept: slicing the cache first would copy it every step.
        context = jnp.einsum("bht,btc->bhc", probs, cache)[..., : cfg.kv_lora_rank]  # [B, H, C]: weighted latent
        out = jnp.einsum("bhc,chv->bhv", context, w_v)  # [B, H, v]
        return self.o_proj(out.reshape(x.shape[0], cfg.num_heads * cfg.v_head_dim)), cache
