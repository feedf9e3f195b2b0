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

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from lite.config import ModelConfig
from pallas_kernels.backend import target_platform
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
                      kernel_metadata=axes_metadata(*axes), dot_general=projection, rngs=rngs)


def projection(x: jax.Array, kernel: jax.Array, dimension_numbers, precision=None, preferred_element_type=None,
               out_sharding=None) -> jax.Array:
    """`linear`'s product, x [..., in] @ kernel [in, out] (nnx.Linear's dot_general). On CPU its
    gradient is `_cpu_projection`'s; elsewhere, and for any other product, jax.lax.dot_general's."""
    standard = dimension_numbers == (((x.ndim - 1,), (0,)), ((), ())) and kernel.ndim == 2
    if standard and out_sharding is None and target_platform() == "cpu" and x.dtype == kernel.dtype:
        return _cpu_projection(x, kernel, precision, preferred_element_type)
    return jax.lax.dot_general(x, kernel, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type, out_sharding=out_sharding)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _cpu_projection(x, kernel, precision, preferred_element_type):
    """x [..., in] @ kernel [in, out] whose kernel gradient is x^T [in, T] @ dy [T, out], with x^T
    written into a buffer of its own first (an optimization barrier keeps XLA from folding the
    transpose back into the product). Left to itself, XLA:CPU transposes inside the product's fusion
    whichever operand its layout assignment picks, often the larger one (the LM head's [T, vocab]
    logit gradient: 34 MB for the demo step, against 2 MB for x): the demo training step runs 1.2x
    faster this way."""
    return jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=precision,
                               preferred_element_type=preferred_element_type)


def _cpu_projection_forward(x, kernel, precision, preferred_element_type):
    return _cpu_projection(x, kernel, precision, preferred_element_type), (x, kernel)


def _cpu_projection_backward(precision, preferred_element_type, residuals, dy):
    x, kernel = residuals
    dy = dy.astype(x.dtype)
    d_x = jax.lax.dot_general(dy, kernel, (((dy.ndim - 1,), (1,)), ((), ())), precision=precision)  # [..., in]
    x_t = jax.lax.optimization_barrier(x.reshape(-1, x.shape[-1]).T)  # [in, T]
    d_kernel = jax.lax.dot_general(x_t, dy.reshape(-1, dy.shape[-1]), (((1,), (0,)), ((), ())), precision=precision,
                                   preferred_element_type=jnp.float32)  # [in, out]
    return d_x.astype(x.dtype), d_kernel.astype(kernel.dtype)


_cpu_projection.defvjp(_cpu_projection_forward, _cpu_projection_backward)


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
