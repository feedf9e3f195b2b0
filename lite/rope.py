"""Rotary position embedding on interleaved pairs, with YaRN scaling.

Frequencies and YaRN factors follow `transformers` (its `_compute_yarn_parameters`) so that
imported checkpoints reproduce the reference logits.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from lite.config import ModelConfig


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_frequencies(cfg: ModelConfig) -> tuple[np.ndarray, float]:
    """float32[rope_dim / 2] inverse frequencies and the factor cos/sin are multiplied by."""
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    exponents = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    pos_freqs = np.float32(base) ** exponents
    y = cfg.rope_scaling
    if y is None:
        return (1.0 / pos_freqs).astype(np.float32), 1.0
    if y.attention_factor is not None:
        attention_factor = y.attention_factor
    elif y.mscale and y.mscale_all_dim:
        attention_factor = _yarn_mscale(y.factor, y.mscale) / _yarn_mscale(y.factor, y.mscale_all_dim)
    else:
        attention_factor = _yarn_mscale(y.factor)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(y.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(y.beta_fast), correction_dim(y.beta_slow)
    if y.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
    extrapolation_weight = 1 - ramp
    inv_freq = (1.0 / (y.factor * pos_freqs)) * (1 - extrapolation_weight) + (1.0 / pos_freqs) * extrapolation_weight
    return inv_freq.astype(np.float32), float(attention_factor)


def softmax_scale(cfg: ModelConfig) -> float:
    """1/sqrt(qk_head_dim), times YaRN's mscale(factor, mscale_all_dim)^2 when scaling is on."""
    scale = cfg.qk_head_dim ** -0.5
    y = cfg.rope_scaling
    if y is not None and y.mscale_all_dim:
        scale *= _yarn_mscale(y.factor, y.mscale_all_dim) ** 2
    return scale


def rope_angles(positions: jax.Array, cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """int32[...] positions -> (cos, sin), each float32[..., rope_dim / 2]."""
    inv_freq, attention_factor = rope_frequencies(cfg)
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    return jnp.cos(angles) * attention_factor, jnp.sin(angles) * attention_factor


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate interleaved pairs (x0, x1), (x2, x3), ... of x[..., rope_dim].

    The rotated evens are returned first, then the rotated odds (as `transformers` does). Queries and
    keys get the same permutation, so their dot products equal the interleaved layout's.
    cos/sin broadcast against x[..., ::2] (insert head axes before calling).
    """
    dtype = x.dtype
    even, odd = x[..., 0::2], x[..., 1::2]
    cos, sin = cos.astype(dtype), sin.astype(dtype)
    return jnp.concatenate([even * cos - odd * sin, odd * cos + even * sin], axis=-1)
