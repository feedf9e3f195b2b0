"""The LongCat-Flash(-Lite) language model: N-gram embedding, shortcut-connected MoE layers, head.

Layers are created with `nnx.vmap` and applied with `jax.lax.scan`, so compile time does not grow
with depth; every parameter of `model.layers` has a leading [num_layers] axis.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from lite import moe as moe_lib
from lite.attention import MLAttention, attention_mask
from lite.config import ModelConfig
from lite.layers import RMSNorm, SwiGLU, linear
from lite.ngram import NgramEmbedding
from lite.rope import rope_angles


class ShortcutLayer(nnx.Module):
    """Two attention + dense MLP blocks; the MoE reads after the first attention, joins at the end.

        h   = x + Attn0(RMSNorm(x));  u = RMSNorm(h)
        h   = h + MLP0(u);            h = h + Attn1(RMSNorm(h))
        out = h + MLP1(RMSNorm(h)) + MoE(u)
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        eps = cfg.rms_norm_eps
        # Index 0 / 1: first / second half of the layer (HF: input_layernorm.{0,1}, self_attn.{0,1}, ...).
        self.attn_norms = nnx.List([RMSNorm(cfg, cfg.hidden_size, eps) for _ in range(2)])
        self.attns = nnx.List([MLAttention(cfg, rngs=rngs) for _ in range(2)])
        self.mlp_norms = nnx.List([RMSNorm(cfg, cfg.hidden_size, eps) for _ in range(2)])
        self.mlps = nnx.List([SwiGLU(cfg, cfg.ffn_hidden_size, rngs=rngs) for _ in range(2)])
        self.moe = moe_lib.MoE(cfg, rngs=rngs)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array,
                 token_mask: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """x [B, L, D] -> ([B, L, D], (float32[E + Z] routed slots per expert, float32[] slots dropped
        for expert capacity on a mesh))."""
        out, routing, _ = self.wire(x, lambda i, y: (self.attns[i](y, cos, sin, mask), None), token_mask)
        return out, routing

    def wire(self, x: jax.Array, attend, token_mask: jax.Array):
        """The layer's data flow, shared by the full forward, prefill and decode.

        x [..., D]; attend(i, normed input of attention block i) -> (block output [..., D], anything the
        caller wants back from that block, e.g. its cache entries) -> (out [..., D], (float32[E + Z]
        routed slots per expert, float32[] slots dropped for expert capacity on a mesh), (what block 0
        gave back, what block 1 gave back)).
        """
        attended, kept0 = attend(0, self.attn_norms[0](x))
        h = x + attended
        u = self.mlp_norms[0](h)
        moe_out, counts, dropped = self.moe.forward(u.reshape(-1, u.shape[-1]), token_mask.reshape(-1))
        h = h + self.mlps[0](u)
        attended, kept1 = attend(1, self.attn_norms[1](h))
        h = h + attended
        out = h + self.mlps[1](self.mlp_norms[1](h)) + moe_out.reshape(x.shape)
        return out, (counts, dropped), (kept0, kept1)

    def prefill(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array,
                token_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The full forward that also returns each block's decode cache rows:
        x [B, L, D] -> (out [B, L, D], [2, B, L, kv_lora + rope] `MLAttention.cache_entries`)."""
        def attend(i, y):  # cache_entries() repeats work inside attention; XLA's CSE merges the two
            return self.attns[i](y, cos, sin, mask), self.attns[i].cache_entries(y, cos, sin)

        out, _, kept = self.wire(x, attend, token_mask)
        return out, jnp.stack(kept)

    def decode(self, x: jax.Array, cos: jax.Array, sin: jax.Array, caches: tuple[jax.Array, jax.Array],
               lengths: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """One token per sequence: x [B, D], cos/sin [B, rope/2], the two blocks' caches [B, T, kv_lora + rope]
        (first lengths[b] rows valid) -> (out [B, D], the caches with the new token's rows appended)."""
        out, _, caches = self.wire(x, lambda i, y: self.attns[i].decode(y, cos, sin, caches[i], lengths),
                                   jnp.ones(x.shape[:-1], bool))
        return out, caches


class ModelOutput(NamedTuple):
    logits: jax.Array  # [B, L, V] in the compute dtype
    expert_counts: jax.Array  # float32[num_layers, E + Z]: routing slots per expert, padding excluded
    dropped_slots: jax.Array  # float32[num_layers]: routing slots dropped for expert capacity (sharding/)


def positions_from_segments(segment_ids: jax.Array) -> jax.Array:
    """int32[B, L]: position within each segment (packed documents and left padding restart at 0)."""
    length = segment_ids.shape[1]
    index = jnp.arange(length, dtype=jnp.int32)
    changed = jnp.pad(segment_ids[:, 1:] != segment_ids[:, :-1], ((0, 0), (1, 0)), constant_values=True)
    return index - jax.lax.cummax(jnp.where(changed, index, 0), axis=1)


class LongcatModel(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = NgramEmbedding(cfg, rngs=rngs)

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_layers(rngs: nnx.Rngs) -> ShortcutLayer:
            return ShortcutLayer(cfg, rngs=rngs)

        self.layers = make_layers(rngs)
        self.final_norm = RMSNorm(cfg, cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = linear(cfg, cfg.hidden_size, cfg.vocab_size, rngs=rngs)

    def __call__(self, tokens: jax.Array, segment_ids: jax.Array | None = None,
                 positions: jax.Array | None = None) -> ModelOutput:
        """tokens int32[B, L]; segment_ids int32[B, L] (0 = padding, else document number);
        positions int32[B, L] (default: restart at every segment)."""
        cfg = self.cfg
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [batch, length], got shape {tokens.shape}")
        for name, value in (("segment_ids", segment_ids), ("positions", positions)):
            if value is not None and value.shape != tokens.shape:
                raise ValueError(f"{name} shape {value.shape} does not match tokens shape {tokens.shape}")
        if segment_ids is None:
            token_mask = jnp.ones(tokens.shape, bool)
            mask = attention_mask(jnp.zeros(tokens.shape, jnp.int32))
            if positions is None:
                positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
        else:
            token_mask = segment_ids > 0
            mask = attention_mask(segment_ids)
            if positions is None:
                positions = positions_from_segments(segment_ids)
        cos, sin = rope_angles(positions, cfg)  # [B, L, rope/2]

        h = self.embed(tokens, segment_ids)
        graphdef, layer_state = nnx.split(self.layers)

        def apply_layer(h, state):
            return nnx.merge(graphdef, state)(h, cos, sin, mask, token_mask)

        h, (expert_counts, dropped_slots) = jax.lax.scan(apply_layer, h, layer_state)
        logits = self.lm_head(self.final_norm(h))
        return ModelOutput(logits, expert_counts, dropped_slots)

    def update_router_bias(self, expert_counts: jax.Array, rate: float | None = None) -> None:
        """The training loop's load-balancing step: float32[num_layers, E + Z] counts from a batch."""
        bias = self.layers.moe.router.bias
        bias[...] = moe_lib.router_bias_update(bias[...], expert_counts, self.cfg, rate)


def next_token_loss(logits: jax.Array, tokens: jax.Array, segment_ids: jax.Array | None = None,
                    loss_mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Mean cross-entropy of predicting tokens[:, i+1] from position i -> (loss, number of targets).

    A target counts when it is in the same (non-padding) segment as its input position and, if given,
    loss_mask[:, i+1] is true. Computed in float32.
    """
    targets = tokens[:, 1:]
    valid = jnp.ones(targets.shape, bool)
    if segment_ids is not None:
        valid &= (segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, 1:] > 0)
    if loss_mask is not None:
        valid &= loss_mask[:, 1:].astype(bool)
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    count = jnp.sum(valid)
    return jnp.sum(jnp.where(valid, nll, 0.0)) / jnp.maximum(count, 1), count
