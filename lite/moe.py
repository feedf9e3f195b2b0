"""Router and MoE with zero-computation experts (ARCHITECTURE.md section 4).

    s      = softmax(u @ W_router)              over E FFN experts followed by Z zero experts (fp32)
    chosen = top_k(s + b)                       b: RouterBias, moved by `router_bias_update`, not by grads
    weight = s[chosen] * routed_scaling_factor  not renormalised
    MoE(u) = sum_{chosen FFN e} weight_e FFN_e(u) + (sum of chosen zero-expert weights) * u

`MoE(u, token_mask) -> MoEOutput` is the one call. It takes the weights out of the module as arrays
and runs `moe_per_device` (route, dispatch, experts, zero-expert term, counts): directly without a
mesh, inside one shard_map on a mesh (sharding.expert_parallel.moe_on_mesh). The FFN experts of one
device have two forms of the same sum: `grouped_experts` (slots sorted by expert, grouped matmuls)
and `dense_experts` (every expert on every token, for the few tokens of a decode step).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lite.config import ModelConfig
from lite.layers import param
from sharding.expert_parallel import (ExpertsFn, ExpertsOutput, grouped_swiglu, moe_on_mesh, sort_by_expert, unsort,
                                      weighted_slot_sum)
from sharding.mesh import active_mesh


class MoEOutput(NamedTuple):
    output: jax.Array  # [T, D]: MoE(u)
    expert_counts: jax.Array  # float32[E + Z]: routing slots per expert among masked-in tokens
    dropped_slots: jax.Array  # float32[]: FFN slots dropped for expert capacity (0 without a mesh)


class Routing(NamedTuple):
    weights: jax.Array  # float32[T, k]: unbiased scores * routed_scaling_factor of the chosen experts
    chosen: jax.Array  # int32[T, k]: expert ids; ids >= n_routed_experts are zero experts


class RouterWeights(NamedTuple):
    classifier: jax.Array  # float32[D, E + Z]
    bias: jax.Array  # float32[E + Z]


class ExpertWeights(NamedTuple):
    w_gate: jax.Array  # [E, D, I]
    w_up: jax.Array  # [E, D, I]
    w_down: jax.Array  # [E, I, D]


class RouterBias(nnx.Variable):
    """Per-expert routing bias: set by `router_bias_update`, never by the optimizer (not a Param)."""


def route(router: RouterWeights, u: jax.Array, cfg: ModelConfig) -> Routing:
    """u [T, D] -> Routing: top-k of the biased scores, weighted by the unbiased ones."""
    logits = jnp.dot(u.astype(jnp.float32), router.classifier, precision=jax.lax.Precision.HIGHEST)
    scores = jax.nn.softmax(logits, axis=-1)
    _, chosen = jax.lax.top_k(scores + jax.lax.stop_gradient(router.bias), cfg.moe_topk)
    weights = jnp.take_along_axis(scores, chosen, axis=-1) * cfg.routed_scaling_factor
    return Routing(weights, chosen.astype(jnp.int32))


class Router(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        init = nnx.initializers.normal(cfg.initializer_range)
        # The router stays in float32 whatever the parameter dtype (as in the reference).
        self.classifier = param(init(rngs.params(), (cfg.hidden_size, cfg.num_experts), jnp.float32),
                                "router_in", "router_experts")
        self.bias = param(jnp.zeros((cfg.num_experts,), jnp.float32), "router_experts", kind=RouterBias)

    def weights(self) -> RouterWeights:
        return RouterWeights(self.classifier[...], self.bias[...])

    def __call__(self, u: jax.Array) -> Routing:
        """u [T, D] -> Routing(weights float32[T, k], chosen int32[T, k])."""
        return route(self.weights(), u, self.cfg)


# ---------------------------------------------------------------------------------------------
# The FFN experts on one device: two forms of the same sum.

def grouped_experts(x: jax.Array, chosen: jax.Array, weights: jax.Array, w_gate: jax.Array, w_up: jax.Array,
                    w_down: jax.Array, layer: int | None = None) -> jax.Array:
    """Weighted sum of the chosen FFN experts' SwiGLU outputs; zero-expert choices contribute nothing.

    x [T, D], chosen int32[T, k], weights float32[T, k], w_gate/w_up [E, D, I], w_down [E, I, D]
    -> float32[T, D]. Sort the T*k (token, expert) slots by expert, run each projection as one grouped
    matmul over the sorted rows, unsort. Zero experts have ids >= E, so they sort last and fall
    outside every group. layer: the weights are every layer's, [L, E, ., .], read at `layer` in place.
    """
    top_k = chosen.shape[1]
    num_ffn = w_gate.shape[-3]
    keys = chosen.reshape(-1)  # int32[T*k]: the expert of each slot
    by_expert = sort_by_expert(keys, num_ffn)
    out = grouped_swiglu(x[by_expert.order // top_k], by_expert.group_sizes, w_gate, w_up, w_down, layer)  # [T*k, D]
    return weighted_slot_sum(unsort(out, by_expert.order), keys < num_ffn, weights)


def dense_experts(x: jax.Array, chosen: jax.Array, weights: jax.Array, w_gate: jax.Array, w_up: jax.Array,
                  w_down: jax.Array) -> jax.Array:
    """`grouped_experts` for a handful of tokens: every FFN expert runs on every token, weighted 0 where
    not chosen, as three plain matmuls with the experts side by side. All E experts' FLOPs per token
    instead of the chosen ones', but none of the grouped form's sorting, gathers, scatters and tiles."""
    num_ffn, d, i = w_gate.shape
    # [T, E] routing weight per FFN expert; zero experts (ids >= E) match no column.
    per_expert = jnp.sum(jnp.where(chosen[..., None] == jnp.arange(num_ffn), weights[..., None], 0.0), axis=1)
    gate = x @ w_gate.transpose(1, 0, 2).reshape(d, num_ffn * i)  # [T, E * I]
    up = x @ w_up.transpose(1, 0, 2).reshape(d, num_ffn * i)
    hidden = (jax.nn.silu(gate) * up).reshape(-1, num_ffn, i) * per_expert[..., None].astype(x.dtype)
    return jnp.dot(hidden.reshape(-1, num_ffn * i), w_down.reshape(num_ffn * i, d), preferred_element_type=jnp.float32)


# Up to this many tokens (decoding) `dense_experts` is faster than `grouped_experts`; measured on CPU:
# tiny 41 vs 107 us at 64 tokens, demo 2.3 vs 5.9 ms, both break even at a few hundred tokens.
DENSE_EXPERTS_MAX_TOKENS = 128


def local_experts(x: jax.Array, chosen: jax.Array, weights: jax.Array, token_mask: jax.Array | None,
                  w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array, layer: int | None = None) -> ExpertsOutput:
    """The `ExpertsFn` when every expert is on this device: the dense or the grouped form by token
    count; nothing is dropped. Padding tokens are computed like the others (their rows are discarded
    downstream); only the mesh dispatches skip them, since there they would cost communication.
    layer: the weights are every layer's, [L, E, ., .] (decode); the grouped form reads layer `layer`
    in place, the dense form's XLA matmuls take its slice."""
    if x.shape[0] > DENSE_EXPERTS_MAX_TOKENS:
        combined = grouped_experts(x, chosen, weights, w_gate, w_up, w_down, layer)
    else:
        if layer is not None:
            w_gate, w_up, w_down = (w[layer].astype(x.dtype) for w in (w_gate, w_up, w_down))
        combined = dense_experts(x, chosen, weights, w_gate, w_up, w_down)
    return ExpertsOutput(combined, jnp.zeros((), jnp.float32))


# ---------------------------------------------------------------------------------------------
# The MoE.

def moe_per_device(router: RouterWeights, experts: ExpertWeights, u: jax.Array, token_mask: jax.Array | None,
                   dispatch: ExpertsFn | None = None, *, cfg: ModelConfig, layer: int | None = None) -> MoEOutput:
    """The whole MoE on one device's tokens: route, run the FFN experts through `dispatch` (None:
    `local_experts`; on a mesh, sharding.expert_parallel's all-to-all dispatch, with `experts` this
    device's E / n_ep), add the zero experts' identity term, count.

    u [T, D], token_mask bool[T] or None (all real) -> MoEOutput (counts of this device's tokens only).
    layer: `experts` holds every layer's weights, [L, E, ., .] (decode), and layer `layer` is used;
    they are read in place and rounded to the compute dtype where used (`dispatch` was made for it).
    """
    weights, chosen = route(router, u, cfg)
    if layer is None:
        experts = ExpertWeights(*(w.astype(cfg.jnp_compute_dtype) for w in experts))
    experts_fn = dispatch or functools.partial(local_experts, layer=layer)
    ffn, dropped = experts_fn(u, chosen, weights, token_mask, *experts)
    zero_weight = jnp.sum(jnp.where(chosen >= cfg.n_routed_experts, weights, 0.0), axis=-1)  # [T]
    out = (ffn + zero_weight[:, None] * u.astype(jnp.float32)).astype(u.dtype)
    counted = jnp.ones(chosen.shape, jnp.float32) if token_mask is None else (
        jnp.broadcast_to(token_mask[:, None], chosen.shape).astype(jnp.float32))
    counts = jax.ops.segment_sum(counted.reshape(-1), chosen.reshape(-1), num_segments=cfg.num_experts)
    return MoEOutput(out, counts, dropped)


class MoE(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        init = nnx.initializers.normal(cfg.initializer_range)
        e, d, i, pdtype = cfg.n_routed_experts, cfg.hidden_size, cfg.expert_ffn_hidden_size, cfg.jnp_param_dtype
        self.router = Router(cfg, rngs=rngs)
        self.w_gate = param(init(rngs.params(), (e, d, i), pdtype), "experts", "embed", "expert_mlp")
        self.w_up = param(init(rngs.params(), (e, d, i), pdtype), "experts", "embed", "expert_mlp")
        self.w_down = param(init(rngs.params(), (e, i, d), pdtype), "experts", "expert_mlp", "embed")

    def expert_weights(self) -> ExpertWeights:
        return ExpertWeights(self.w_gate[...], self.w_up[...], self.w_down[...])

    def __call__(self, u: jax.Array, token_mask: jax.Array | None = None, layer: int | None = None) -> MoEOutput:
        """u [T, D], token_mask bool[T] or None (all real) -> MoEOutput.

        Under `jax.set_mesh` with more than one device, `moe_per_device` runs inside one shard_map
        (sharding.expert_parallel.moe_on_mesh, dispatching by `cfg.expert_dispatch`); else directly.
        layer: this module's expert weights are every layer's, stacked [L, E, ., .], and this is
        layer `layer` (`LongcatModel.decode_step`, which reads them in place).
        """
        per_device = functools.partial(moe_per_device, cfg=self.cfg, layer=layer)
        router, experts = self.router.weights(), self.expert_weights()
        mesh = active_mesh()
        if mesh is None:
            return per_device(router, experts, u, token_mask)
        return MoEOutput(*moe_on_mesh(per_device, router, experts, u, token_mask, mesh, self.cfg, layer))


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
