"""Small building blocks: bias-free linear layers, RMSNorm, the SwiGLU MLP."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from lite.config import ModelConfig


def linear(cfg: ModelConfig, in_features: int, out_features: int, *, rngs: nnx.Rngs) -> nnx.Linear:
    """A bias-free projection; kernel stored [in, out] (Hugging Face stores [out, in])."""
    return nnx.Linear(in_features, out_features, use_bias=False, dtype=cfg.jnp_compute_dtype,
                      param_dtype=cfg.jnp_param_dtype,
                      kernel_init=nnx.initializers.normal(cfg.initializer_range), rngs=rngs)


class RMSNorm(nnx.Module):
    """x / rms(x) * weight, normalised in float32, returned in the input dtype."""

    def __init__(self, cfg: ModelConfig, dim: int, eps: float):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((dim,), cfg.jnp_param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (self.weight[...] * normed.astype(x.dtype)).astype(x.dtype)


class SwiGLU(nnx.Module):
    """down(silu(gate(x)) * up(x)): the dense MLP of every attention block."""

    def __init__(self, cfg: ModelConfig, hidden: int, *, rngs: nnx.Rngs):
        self.gate_proj = linear(cfg, cfg.hidden_size, hidden, rngs=rngs)
        self.up_proj = linear(cfg, cfg.hidden_size, hidden, rngs=rngs)
        self.down_proj = linear(cfg, hidden, cfg.hidden_size, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))
