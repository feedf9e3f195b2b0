"""Router and MoE with zero-computation experts (ARCHITECTURE.md section 4).

    s      = softmax(u @ W_router)              over E FFN experts followed by Z zero experts (fp32)
    chosen = top_k(s + b)                       b: RouterBias, moved by `router_bias_update`, not by grads
    weight = s[chosen] * routed_scaling_factor  not renormalised
    MoE(u) = sum_{chosen FFN e} weight_e FFN_e(u) + (sum of chosen zero-expert weights) * u
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lite.config import ModelConfig
from pallas_kernels.ragged_matmul import ragged_matmul
from sharding.mesh import active_mesh


class RouterBias(nnx.Variable):
    """Per-expert routing bias: set by `router_bias_update`, never by the optimizer (not a Param)."""


class Router(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        init = nnx.initializers.normal(cfg.initializer_range)
        # The router stays in float32 whatever the parameter dtype (as in the reference).
        self.classifier = nnx.Param(init(rngs.params(), (cfg.hidden_size, cfg.num_experts), jnp.float32))
        self.bias = RouterBias(jnp.zeros((cfg.num_experts,), jnp.float32))

    def __call__(self, u: jax.Array) -> tuple[jax.Array, jax.Array]:
        """u [T, D] -> weights float32[T, k], chosen int32[T, k] (ids >= n_routed_experts are zero experts)."""
        logits = jnp.dot(u.astype(jnp.float32), self.classifier[...], precision=jax.lax.Precision.HIGHEST)
        scores = jax.nn.softmax(logits, axis=-1)
        _, chosen = jax.lax.top_k(scores + jax.lax.stop_gradient(self.bias[...]), self.cfg.moe_topk)
        weights = jnp.take_along_axis(scores, chosen, axis=-1) * self.cfg.routed_scaling_factor
        return weights, chosen.astype(jnp.int32)


def routed_experts(x: jax.Array, chosen: jax.Array, weights: jax.Array, w_gate: jax.Array, w_up: jax.Array,
                   w_down: jax.Array, *, implementation: str = "auto") -> jax.Array:
    """Weighted sum of the chosen FFN experts' SwiGLU outputs; zero-expert choices contribute nothing.

    x [T, D], chosen int32[T, k], weights float32[T, k], w_gate/w_up [E, D, I], w_down [E, I, D]
    -> float32[T, D]. Sort the T*k (token, expert) rows by expert, run each projection as one grouped
    matmul, unsort. Zero experts have ids >= E, so they sort last and fall outside every group.
    """
    num_tokens, top_k = chosen.shape
    num_ffn = w_gate.shape[0]
    flat_expert = chosen.reshape(-1)  # [T*k]
    order = jnp.argsort(flat_expert, stable=True)  # row r of the sorted buffer is flat slot order[r]
    group_sizes = jax.ops.segment_sum(jnp.ones_like(flat_expert), flat_expert, num_segments=num_ffn)
    rows = x[order // top_k]  # [T*k, D]
    hidden = (jax.nn.silu(ragged_matmul(rows, w_gate, group_sizes, implementation=implementation))
              * ragged_matmul(rows, w_up, group_sizes, implementation=implementation))
    out = ragged_matmul(hidden, w_down, group_sizes, implementation=implementation)  # [T*k, D]
    # `where`, not a multiply: a kernel may leave rows past sum(group_sizes) uninitialised.
    is_ffn = flat_expert[order] < num_ffn
    out = jnp.where(is_ffn[:, None], out.astype(jnp.float32) * weights.reshape(-1)[order][:, None], 0.0)
    unsort = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))
    return out[unsort].reshape(num_tokens, top_k, -1).sum(axis=1)


def dense_experts(x: jax.Array, chosen: jax.Array, weights: jax.Array, w_gate: jax.Array, w_up: jax.Array,
                  w_down: jax.Array) -> jax.Array:
    """`routed_experts` for a handful of tokens: every FFN expert runs on every token, weighted 0 where
    not chosen, as three plain matmuls with the experts side by side. All E experts' FLOPs per token
    instead of the chosen ones', but none of the routed form's sorting, gathers, scatters and tiles."""
    num_ffn, d, i = w_gate.shape
    # [T, E] routing weight per FFN expert; zero experts (ids >= E) match no column.
    per_expert = jnp.sum(jnp.where(chosen[..., None] == jnp.arange(num_ffn), weights[..., None], 0.0), axis=1)
    gate = x @ w_gate.transpose(1, 0, 2).reshape(d, num_ffn * i)  # [T, E * I]
    up = x @ w_up.transpose(1, 0, 2).reshape(d, num_ffn * i)
    hidden = (jax.nn.silu(gate) * up).reshape(-1, num_ffn, i) * per_expert[..., None].astype(x.dtype)
    return jnp.dot(hidden.reshape(-1, num_ffn * i), w_down.reshape(num_ffn * i, d), preferred_element_type=jnp.float32)


# Up to this many tokens (decoding) `dense_experts` is faster than `routed_experts`; measured on CPU:
# tiny 41 vs 107 us at 64 tokens, demo 2.3 vs 5.9 ms, both break even at a few hundred tokens.
DENSE_EXPERTS_MAX_TOKENS = 128


class MoE(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        init = nnx.initializers.normal(cfg.initializer_range)
        e, d, i, pdtype = cfg.n_routed_experts, cfg.hidden_size, cfg.expert_ffn_hidden_size, cfg.jnp_param_dtype
        self.router = Router(cfg, rngs=rngs)
        self.w_gate = nnx.Param(init(rngs.params(), (e, d, i), pdtype))
        self.w_up = nnx.Param(init(rngs.params(), (e, d, i), pdtype))
        self.w_down = nnx.Param(init(rngs.params(), (e, i, d), pdtype))

    def __call__(self, u: jax.Array, token_mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """u [T, D] -> (MoE(u) [T, D], float32[E + Z] tokens routed to each expert among masked-in tokens)."""
        out, counts, _ = self.forward(u, token_mask)
        return out, counts

    def forward(self, u: jax.Array, token_mask: jax.Array | None = None,
                expert_fn=None) -> tuple[jax.Array, jax.Array, jax.Array]:
        """`__call__` plus float32[] routing slots dropped for expert capacity (0 without a mesh).

        Under `jax.set_mesh` with more than one device this whole method runs inside one shard_map
        (sharding.expert_parallel), which calls it back per device with `expert_fn(u, chosen,
        weights, token_mask, w_gate, w_up, w_down) -> (FFN sum float32[T, D], dropped)` dispatching
        the slots to the devices that own the experts.
        """
        mesh = active_mesh() if expert_fn is None else None
        if mesh is not None:
            from sharding.expert_parallel import moe_on_mesh

            return moe_on_mesh(self, u, token_mask, mesh)
        cfg = self.cfg
        weights, chosen = self.router(u)
        dtype = cfg.jnp_compute_dtype
        w = (self.w_gate[...].astype(dtype), self.w_up[...].astype(dtype), self.w_down[...].astype(dtype))
        if expert_fn is None:
            experts = dense_experts if u.shape[0] <= DENSE_EXPERTS_MAX_TOKENS else routed_experts
            ffn, dropped = experts(u, chosen, weights, *w), jnp.zeros((), jnp.float32)
        else:
            ffn, dropped = expert_fn(u, chosen, weights, token_mask, *w)
        zero_weight = jnp.sum(jnp.where(chosen >= cfg.n_routed_experts, weights, 0.0), axis=-1)  # [T]
        out = (ffn + zero_weight[:, None] * u.astype(jnp.float32)).astype(u.dtype)
        counted = jnp.ones(chosen.shape, jnp.float32) if token_mask is None else (
            jnp.broadcast_to(token_mask[:, None], chosen.shape).astype(jnp.float32))
        counts = jax.ops.segment_sum(counted.reshape(-1), chosen.reshape(-1), num_segments=cfg.num_experts)
        return out, counts, dropped


# ---------------------------------------------------------------------------------------------
# Load balancing without an auxiliary loss.

def target_expert_shares(cfg: ModelConfig) -> np.ndarray:
    """float32[E + Z]: each expert's target share of the T*k routing slots.

    The FFN experts share `target_ffn_experts_per_token` of the k slots of every token equally, the
    zero experts share the rest, so the average number of FFN experts per token meets the target.
    """
    k, e, z, target = cfg.moe_topk, cfg.n_routed_experts, cfg.zero_expert_num, cfg.target_ffn_experts_per_token
    shares = np.full((cfg.num_experts,), target / (k * e), np.float32)
    if z:
        shares[e:] = (k - target) / (k * z)
    return shares


def router_bias_update(bias: jax.Array, expert_counts: jax.Array, cfg: ModelConfig,
                       rate: float | None = None) -> jax.Array:
    """Move each expert's bias toward its target load: b += rate * (target share - observed share).

    bias, expert_counts: float32[..., E + Z] (per layer); the counts are slots routed to each expert.
    An expert that got more than its share is made less attractive, and vice versa.
    """
    rate = cfg.router_bias_update_rate if rate is None else rate
    observed = expert_counts / jnp.maximum(jnp.sum(expert_counts, axis=-1, keepdims=True), 1.0)
    return bias + rate * (jnp.asarray(target_expert_shares(cfg)) - observed)


def ffn_experts_per_token(expert_counts: jax.Array, cfg: ModelConfig) -> jax.Array:
    """float32[...]: the average number of FFN experts a token used, from per-expert counts [..., E + Z]."""
    tokens = jnp.sum(expert_counts, axis=-1) / cfg.moe_topk
    return jnp.sum(expert_counts[..., : cfg.n_routed_experts], axis=-1) / jnp.maximum(tokens, 1.0)
