"""The LongCat-Flash(-Lite) language model: N-gram embedding, shortcut-connected MoE layers, head,
and its three modes:

    model(tokens, segment_ids, positions)      the full forward (training, evaluation) -> ModelOutput
    model.prefill(prompts, cache_len)          packed prompts -> DecodeOutput(logits, DecodeCache)
    model.decode_step(cache, tokens)           one new token per sequence -> DecodeOutput

All three run the layer's one data flow (`ShortcutLayer.wire`); the full forward and prefill also
share the input preamble (`layer_inputs`) and the layer scan (`LongcatModel.scan_layers`). Sampling
and the generation loop built on prefill and the decode step live in lite/decode.py.

Layers are created with `nnx.vmap` and applied with `jax.lax.scan`, so compile time does not grow
with depth; every parameter of `model.layers` has a leading [num_layers] axis. The decode step is the
exception: it unrolls the layers (see `decode_step`).

The decode cache holds, per token and per attention block, only what MLA needs (ARCHITECTURE.md
section 5): one row of the normalised kv latent (kv_lora numbers) followed by the rotated RoPE key
(qk_rope numbers); kv_b is absorbed into the query and output side (`MLAttention.decode`). The N-gram
embedding keeps the last N-1 tokens per sequence (section 8, `lite.ngram.ngram_step`).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lite import moe as moe_lib
from lite.attention import MLAttention, attention_mask
from lite.config import ModelConfig
from lite.layers import RMSNorm, SwiGLU, add_leading_axis, linear
from lite.ngram import NgramEmbedding, ngram_cache
from lite.rope import rope_angles
from sharding.expert_parallel import dropless


# ---------------------------------------------------------------------------------------------
# The input preamble of the full forward and prefill.

class LayerInputs(NamedTuple):
    """What every layer reads besides the hidden state; made once per forward from the token layout."""

    cos: jax.Array  # float32[B, L, rope/2]: RoPE angles at each token's position
    sin: jax.Array  # float32[B, L, rope/2]
    mask: jax.Array  # bool[B, 1, L, L]: causal and within one segment
    token_mask: jax.Array  # bool[B, L]: real tokens (padding is neither routed to experts nor counted)


def positions_from_segments(segment_ids: jax.Array) -> jax.Array:
    """int32[B, L]: position within each segment (packed documents and left padding restart at 0)."""
    length = segment_ids.shape[1]
    index = jnp.arange(length, dtype=jnp.int32)
    changed = jnp.pad(segment_ids[:, 1:] != segment_ids[:, :-1], ((0, 0), (1, 0)), constant_values=True)
    return index - jax.lax.cummax(jnp.where(changed, index, 0), axis=1)


def layer_inputs(cfg: ModelConfig, tokens: jax.Array, segment_ids: jax.Array | None = None,
                 positions: jax.Array | None = None) -> LayerInputs:
    """tokens int32[B, L]; segment_ids int32[B, L] (0 = padding, else document number; default: one
    document per row); positions int32[B, L] (default: restart at every segment) -> LayerInputs."""
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
    cos, sin = rope_angles(positions, cfg)
    return LayerInputs(cos, sin, mask, token_mask)


# ---------------------------------------------------------------------------------------------
# One layer.

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

    def __call__(self, x: jax.Array, inputs: LayerInputs) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """x [B, L, D] -> ([B, L, D], (float32[E + Z] routed slots per expert, float32[] slots dropped
        for expert capacity on a mesh))."""
        def attend(i, y):
            return self.attns[i](y, inputs.cos, inputs.sin, inputs.mask), None

        out, routing, _ = self.wire(x, attend, inputs.token_mask)
        return out, routing

    def wire(self, x: jax.Array, attend, token_mask: jax.Array, layer: int | None = None):
        """The layer's data flow, shared by the full forward, prefill and decode.

        x [..., D]; attend(i, normed input of attention block i) -> (block output [..., D], anything the
        caller wants back from that block, e.g. its cache entries) -> (out [..., D], (float32[E + Z]
        routed slots per expert, float32[] slots dropped for expert capacity on a mesh), (what block 0
        gave back, what block 1 gave back)).
        """
        attended, kept0 = attend(0, self.attn_norms[0](x))
        h = x + attended
        u = self.mlp_norms[0](h)
        moe_out, counts, dropped = self.moe(u.reshape(-1, u.shape[-1]), token_mask.reshape(-1), layer)
        h = h + self.mlps[0](u)
        attended, kept1 = attend(1, self.attn_norms[1](h))
        h = h + attended
        out = h + self.mlps[1](self.mlp_norms[1](h)) + moe_out.reshape(x.shape)
        return out, (counts, dropped), (kept0, kept1)

    def prefill(self, x: jax.Array, inputs: LayerInputs) -> tuple[jax.Array, jax.Array]:
        """The full forward that also returns each block's decode cache rows:
        x [B, L, D] -> (out [B, L, D], [2, B, L, kv_lora + rope] `MLAttention.cache_entries`)."""
        def attend(i, y):  # cache_entries() repeats work inside attention; XLA's CSE merges the two
            return (self.attns[i](y, inputs.cos, inputs.sin, inputs.mask),
                    self.attns[i].cache_entries(y, inputs.cos, inputs.sin))

        out, _, kept = self.wire(x, attend, inputs.token_mask)
        return out, jnp.stack(kept)

    def decode(self, x: jax.Array, cos: jax.Array, sin: jax.Array, caches: tuple[jax.Array, jax.Array],
               lengths: jax.Array, layer: int) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """One token per sequence: x [B, D], cos/sin [B, rope/2], the two blocks' caches [B, T, kv_lora + rope]
        (first lengths[b] rows valid) -> (out [B, D], the caches with the new token's rows appended).
        The module is layer `layer` of `LongcatModel.decode_layers`: its MoE holds every layer's experts."""
        out, _, caches = self.wire(x, lambda i, y: self.attns[i].decode(y, cos, sin, caches[i], lengths),
                                   jnp.ones(x.shape[:-1], bool), layer)
        return out, caches


# ---------------------------------------------------------------------------------------------
# What the modes take and give.

class ModelOutput(NamedTuple):
    """The full forward's result."""

    logits: jax.Array  # [B, L, V] in the compute dtype
    expert_counts: jax.Array  # float32[num_layers, E + Z]: routing slots per expert, padding excluded
    dropped_slots: jax.Array  # float32[num_layers]: routing slots dropped for expert capacity (sharding/)


class PackedPrompts(NamedTuple):
    """Prefill's input, a batch of prompts packed into rows: prompt b is
    tokens[row[b], start[b]: start[b] + lengths[b]]. Built on the host by `pack_prompts`."""

    tokens: jax.Array  # int32[R, W]
    segment_ids: jax.Array  # int32[R, W]: b + 1 where prompt b lies, 0 on padding
    row: jax.Array  # int32[B]
    start: jax.Array  # int32[B]
    lengths: jax.Array  # int32[B], each >= 1


def pack_prompts(prompts: Sequence[Sequence[int]], width: int, row_multiple: int = 8) -> PackedPrompts:
    """NumPy: prompts of at most `width` tokens packed first-fit decreasing into rows of `width`, so that
    prefill computes padding only at the ends of rows (64 prompts of 16..64 tokens: 46 rows of 64).
    The row count is rounded up to a multiple of row_multiple (fewer compiled shapes), but never past
    len(prompts), one row each."""
    lengths = np.array([len(p) for p in prompts], np.int32)
    if not 1 <= lengths.min() <= lengths.max() <= width:
        raise ValueError(f"prompts must have 1..{width} tokens to be packed into rows of {width}, "
                         f"got {lengths.min()}..{lengths.max()}")
    row, start = np.zeros(len(prompts), np.int32), np.zeros(len(prompts), np.int32)
    used: list[int] = []  # tokens per row so far
    for b in np.argsort(-lengths, kind="stable"):
        row[b] = next((r for r, n in enumerate(used) if n + lengths[b] <= width), len(used))
        if row[b] == len(used):
            used.append(0)
        start[b], used[row[b]] = used[row[b]], used[row[b]] + lengths[b]
    num_rows = min(-(-len(used) // row_multiple) * row_multiple, len(prompts))
    tokens, segment_ids = np.zeros((num_rows, width), np.int32), np.zeros((num_rows, width), np.int32)
    for b, prompt in enumerate(prompts):
        tokens[row[b], start[b]: start[b] + lengths[b]] = prompt
        segment_ids[row[b], start[b]: start[b] + lengths[b]] = b + 1
    return PackedPrompts(tokens, segment_ids, row, start, lengths)


class DecodeCache(NamedTuple):
    # One array per attention block (layer l: 2l and 2l + 1), [B, T, kv_lora + qk_rope] rows of
    # `MLAttention.cache_entries`. Not one stacked array: the decode step reads and appends to each in
    # place, where slicing a stacked cache would copy every block's cache every step.
    kv: tuple[jax.Array, ...]
    lengths: jax.Array  # int32[B]: valid entries per row = position of the next token
    ngram: jax.Array  # int32[B, N-1]: the N-gram cache (width 0 without an N-gram embedding)


class DecodeOutput(NamedTuple):
    """What prefill and a decode step give the generation loop."""

    logits: jax.Array  # float32[B, V]: for the token after each sequence
    cache: DecodeCache  # with the tokens just read appended


def prefill_cache(cfg: ModelConfig, prompts: PackedPrompts, entries: jax.Array, cache_len: int) -> DecodeCache:
    """Prefill's packed cache rows entries [num_layers, 2, R, W, kv_lora + rope] -> the per-prompt cache:
    row b holds prompt b in [0, lengths[b]), with room for cache_len >= W tokens, and the N-gram cache
    after its last token. Slots past lengths[b] hold its neighbours' entries and zeros, never attended to."""
    width = prompts.tokens.shape[1]
    lengths = prompts.lengths.astype(jnp.int32)
    columns = jnp.minimum(prompts.start[:, None] + jnp.arange(width), width - 1)
    unpack = prompts.row[:, None] * width + columns  # int32[B, W]: indices into the R * W packed tokens
    room = ((0, 0), (0, cache_len - width), (0, 0))  # [B, W, .] -> [B, T, .]
    kv = tuple(jnp.pad(entries[layer, block].reshape(-1, entries.shape[-1])[unpack], room)
               for layer in range(cfg.num_layers) for block in range(2))
    if cfg.has_ngram:
        own_segment = (jnp.arange(width) < lengths[:, None]).astype(jnp.int32)
        ngram = ngram_cache(prompts.tokens.reshape(-1)[unpack], cfg, own_segment, lengths)
    else:
        ngram = jnp.zeros((lengths.shape[0], 0), jnp.int32)
    return DecodeCache(kv, lengths, ngram)


# ---------------------------------------------------------------------------------------------
# The model.

def _is_expert_weight(path: tuple, _) -> bool:
    """nnx filter: the FFN experts' weights of the MoE (w_gate, w_up, w_down)."""
    return len(path) >= 2 and path[-2] == "moe" and path[-1] in moe_lib.ExpertWeights._fields


# Scans of at most this many layers are unrolled (compile time still small; see `scan_layers`).
UNROLL_MAX_LAYERS = 4
# cfg.remat -> what the backward keeps of a layer's forward: "full" nothing but the layer's input
# (the MaxText default; costs one more forward per step), "dots" also the XLA matmul outputs without
# batch dimensions (the projections; the Pallas expert matmuls and attention scores are recomputed).
SAVED_BY_REMAT = {"full": jax.checkpoint_policies.nothing_saveable,
                  "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}

class LongcatModel(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = NgramEmbedding(cfg, rngs=rngs)

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_layers(rngs: nnx.Rngs) -> ShortcutLayer:
            return ShortcutLayer(cfg, rngs=rngs)

        self.layers = make_layers(rngs)
        add_leading_axis(self.layers, "layers")
        self.final_norm = RMSNorm(cfg, cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = linear(cfg, cfg.hidden_size, cfg.vocab_size, ("embed", "vocab"), rngs=rngs)

    def __call__(self, tokens: jax.Array, segment_ids: jax.Array | None = None,
                 positions: jax.Array | None = None) -> ModelOutput:
        """tokens int32[B, L]; segment_ids int32[B, L] (0 = padding, else document number);
        positions int32[B, L] (default: restart at every segment)."""
        inputs = layer_inputs(self.cfg, tokens, segment_ids, positions)
        h, (expert_counts, dropped_slots) = self.scan_layers(self.embed(tokens, segment_ids),
                                                             lambda layer, h: layer(h, inputs))
        return ModelOutput(self.lm_head(self.final_norm(h)), expert_counts, dropped_slots)

    @dropless  # inference never drops routed slots (sharding.expert_parallel)
    def prefill(self, prompts: PackedPrompts, cache_len: int) -> DecodeOutput:
        """The full forward over packed prompts -> (float32[B, V] logits for the token after each
        prompt, the cache with room for cache_len >= W tokens per prompt). Each prompt is its own
        segment: attention, positions and the N-gram hash never cross into its neighbours or the padding."""
        inputs = layer_inputs(self.cfg, prompts.tokens, prompts.segment_ids)
        h, entries = self.scan_layers(self.embed(prompts.tokens, prompts.segment_ids),
                                      lambda layer, h: layer.prefill(h, inputs))  # [R, W, D], [layers, 2, R, W, .]
        last = h[prompts.row, prompts.start + prompts.lengths.astype(jnp.int32) - 1]  # [B, D]
        logits = self.lm_head(self.final_norm(last)).astype(jnp.float32)
        return DecodeOutput(logits, prefill_cache(self.cfg, prompts, entries, cache_len))

    @dropless  # inference never drops routed slots (sharding.expert_parallel)
    def decode_step(self, cache: DecodeCache, tokens: jax.Array) -> DecodeOutput:
        """tokens int32[B] at positions cache.lengths -> (float32[B, V] logits for the next token, the
        cache with them appended). Requires cache.lengths < T."""
        x, ngram = self.embed.step(tokens, cache.ngram)  # [B, D]
        cos, sin = rope_angles(cache.lengths, self.cfg)  # [B, rope/2]
        kv = list(cache.kv)
        # Unrolled rather than scanned, so that each block's cache is read and written in place.
        for layer, module in enumerate(self.decode_layers(cache.lengths)):
            x, kv[2 * layer: 2 * layer + 2] = module.decode(x, cos, sin, kv[2 * layer: 2 * layer + 2], cache.lengths,
                                                            layer)
        logits = self.lm_head(self.final_norm(x)).astype(jnp.float32)
        return DecodeOutput(logits, DecodeCache(tuple(kv), cache.lengths + 1, ngram))

    def scan_layers(self, h: jax.Array, apply_layer: Callable[[ShortcutLayer, jax.Array], tuple[jax.Array, Any]]):
        """h [B, L, D] through every layer as one compiled loop body over the stacked weights:
        apply_layer(layer, h) -> (h, what the layer gives back) -> (h [B, L, D], what every layer gave
        back, stacked on a leading [num_layers] axis). Up to UNROLL_MAX_LAYERS layers the loop is
        unrolled: XLA then fuses across layers and keeps the backward's saved activations in place
        instead of copying them into and out of [num_layers] stacks (demo step on CPU: 1.2-1.5x).

        Under differentiation the layer is rematerialised by `cfg.remat` (SAVED_BY_REMAT): the
        backward keeps only what the policy saves and recomputes the rest of the layer. Without it the
        backward holds every layer's activations at once; LongCat-Flash-Lite at 8192 tokens per GPU
        keeps 206 GiB of them (README, pod-scale plans)."""
        graphdef, layer_state = nnx.split(self.layers)

        def body(h, state):
            return apply_layer(nnx.merge(graphdef, state), h)

        if self.cfg.remat != "none":
            # prevent_cse=False: inside a scan the recomputation cannot be merged with the forward.
            body = jax.checkpoint(body, policy=SAVED_BY_REMAT[self.cfg.remat], prevent_cse=False)
        return jax.lax.scan(body, h, layer_state, unroll=self.cfg.num_layers <= UNROLL_MAX_LAYERS)

    def decode_layers(self, step_input: jax.Array) -> list[ShortcutLayer]:
        """self.layers as one module per layer for the unrolled decode step, with no weight copied.

        Each module's MoE holds the expert weights of every layer, stacked [num_layers, E, ...], which
        the grouped matmuls read at the module's layer in place (`MoE.__call__`'s layer); the other
        weights are the layer's slices of the stack, read by the matmuls that take them. The weights
        pass through an optimization barrier with `step_input` (any array of the step's input), so
        that XLA does not see them as invariant in a decode loop around the step: it would hoist every
        layer's slices out of the loop (XLA:CPU does) and hold them, a second copy of the weights,
        while the loop runs. The barrier moves no data and changes no number; `tests/test_decode.py`
        checks the compiled loop."""
        graphdef, experts, others = nnx.split(self.layers, _is_expert_weight, ...)
        (experts, others), _ = jax.lax.optimization_barrier(((experts, others), step_input))
        return [nnx.merge(graphdef, experts, jax.tree.map(lambda w: w[layer], others))
                for layer in range(self.cfg.num_layers)]

    def update_router_bias(self, expert_counts: jax.Array, rate: float | None = None) -> None:
        """The training loop's load-balancing step: float32[num_layers, E + Z] counts from a batch."""
        bias = self.layers.moe.router.bias
        bias[...] = moe_lib.router_bias_update(bias[...], expert_counts, self.cfg, rate)


def next_token_loss(logits: jax.Array, tokens: jax.Array, segment_ids: jax.Array | None = None,
                    loss_mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Mean cross-entropy of predicting tokens[:, i+1] from position i -> (loss, number of targets).

    A target counts when it is in the same (non-padding) segment as its input position and, if given,
    loss_mask[:, i+1] is true. Computed in float32.

    Over all L positions (the last has no target and never counts) rather than logits[:, :-1], and the
    target's log-probability picked by comparing with the vocabulary index rather than by
    take_along_axis: a slice would copy the [B, L, V] logits, and take_along_axis's gradient is a
    scatter into zeros of that size; the comparison fuses into the softmax and its gradient.
    """
    targets = jnp.roll(tokens, -1, axis=1)  # [B, L]: column L-1 wraps around and is masked out
    valid = jnp.broadcast_to(jnp.arange(tokens.shape[1]) < tokens.shape[1] - 1, tokens.shape)
    if segment_ids is not None:
        next_segment = jnp.roll(segment_ids, -1, axis=1)
        valid &= (next_segment == segment_ids) & (next_segment > 0)
    if loss_mask is not None:
        valid &= jnp.roll(loss_mask, -1, axis=1).astype(bool)
    logits = logits.astype(jnp.float32)
    shifted = logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))  # as jax.nn.log_softmax
    picked = jnp.sum(jnp.where(targets[..., None] == jnp.arange(logits.shape[-1]), shifted, 0.0), axis=-1)
    nll = jnp.log(jnp.sum(jnp.exp(shifted), axis=-1)) - picked
    count = jnp.sum(valid)
    return jnp.sum(jnp.where(valid, nll, 0.0)) / jnp.maximum(count, 1), count


def abstract_model(cfg: ModelConfig) -> LongcatModel:
    """The model with shapes, dtypes and variable metadata only (nothing allocated)."""
    return nnx.eval_shape(lambda: LongcatModel(cfg, rngs=nnx.Rngs(0)))
