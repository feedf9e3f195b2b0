"""Small building blocks: parameters that name their axes, bias-free linear layers, RMSNorm, the
SwiGLU MLP.

Every variable is created with its logical axis names (`param`), one per dimension; sharding specs
(sharding.rules), the weight-decay mask (lite.training) and the parameter-count components
(lite.params) are all read from them. The names:

    embed            the model dimension D           vocab         LM-head outputs
    token_rows       token-table rows (lookup)       ngram_rows    flat N-gram table rows (lookup)
    ngram_width      D / S of an N-gram row          ngram_tables  the S sub-tables
    q_lora, kv_lora  MLA latent ranks                heads         heads x head dim
    mlp              dense MLP width                 experts       FFN experts (E)
    expert_mlp       expert FFN width                router_in, router_experts   router (E + Z)
    norm             a norm's scale or bias          layers        the scanned stack's [num_layers]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from lite.config import ModelConfig
from sharding.rules import LOGICAL_AXES

# A token reads one row of these: they are not multiplied with (not activated) and not decayed.
LOOKUP_AXES = ("token_rows", "ngram_rows")


def param(value: jax.Array, *axes: str, kind: type[nnx.Variable] = nnx.Param) -> nnx.Variable:
    """value as an nnx.Param (or `kind`) that names its dimensions."""
    if len(axes) != value.ndim:
        raise ValueError(f"{len(axes)} logical axes {axes} for a parameter of shape {value.shape}")
    return kind(value, **{LOGICAL_AXES: axes})


def axes_metadata(*axes: str) -> dict:
    """`param`'s metadata, for flax layers that create their own parameters (kernel_metadata=...)."""
    return {LOGICAL_AXES: axes}


def add_leading_axis(module: nnx.Module, name: str) -> None:
    """Prepend `name` to the logical axes of every variable of a module made by nnx.vmap (whose
    variables gained a leading axis the names do not know of yet)."""
    for _, node in nnx.iter_graph(module):
        if isinstance(node, nnx.Variable):
            node.set_metadata(**{LOGICAL_AXES: (name, *node.get_metadata()[LOGICAL_AXES])})


def is_lookup(axes: tuple[str, ...]) -> bool:
    return any(axis in LOOKUP_AXES for axis in axes)


def linear(cfg: ModelConfig, in_features: int, out_features: int, axes: tuple[str, str], *,
           rngs: nnx.Rngs) -> nnx.Linear:
    """A bias-free projection; kernel stored [in, out] (Hugging Face stores [out, in]) with logical
    axes `axes` (in, out)."""
    return nnx.Linear(in_features, out_features, use_bias=False, dtype=cfg.jnp_compute_dtype,
                      param_dtype=cfg.jnp_param_dtype, kernel_init=nnx.initializers.normal(cfg.initializer_range),
                      kernel_metadata=axes_metadata(*axes), rngs=rngs)


class RMSNorm(nnx.Module):
    """x / rms(x) * weight, normalised in float32, returned in the input dtype."""

    def __init__(self, cfg: ModelConfig, dim: int, eps: float):
        self.eps = eps
        self.weight = param(jnp.ones((dim,), cfg.jnp_param_dtype), "norm")

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (self.weight[...] * normed.astype(x.dtype)).astype(x.dtype)


class SwiGLU(nnx.Module):
    """down(silu(gate(x)) * up(x)): the dense MLP of every attention block."""

    def __init__(self, cfg: ModelConfig, hidden: int, *, rngs: nnx.Rngs):
        self.gate_proj = linear(cfg, cfg.hidden_size, hidden, ("embed", "mlp"), rngs=rngs)
        self.up_proj = linear(cfg, cfg.hidden_size, hidden, ("embed", "mlp"), rngs=rngs)
        self.down_proj = linear(cfg, hidden, cfg.hidden_size, ("mlp", "embed"), rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))
