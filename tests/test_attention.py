"""MLA against a NumPy reference written from ARCHITECTURE.md section 5 (interleaved RoPE layout)."""

import math

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lite.attention import MLAttention, attention_mask
from lite.config import YarnScaling, get_config
from lite.rope import rope_angles, rope_frequencies, softmax_scale


def numpy_mla(attn, x, positions, segments, cfg):
    w = lambda lin: np.asarray(lin.kernel[...], np.float64)
    rms = lambda v, weight: v / np.sqrt(np.mean(v * v, -1, keepdims=True) + 1e-6) * np.asarray(weight[...])
    batch, length, d = x.shape
    h, nope, rope, vdim, r = cfg.num_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    q = (rms(x @ w(attn.q_a_proj), attn.q_a_norm.weight) @ w(attn.q_b_proj)).reshape(batch, length, h, nope + rope)
    q = q * math.sqrt(d / cfg.q_lora_rank)
    ckv = x @ w(attn.kv_a_proj)
    latent = rms(ckv[..., :r], attn.kv_a_norm.weight) * math.sqrt(d / r)
    k_rope = ckv[..., r:]
    inv_freq, attention_factor = rope_frequencies(cfg)

    def rotate(v, pos):  # interleaved pairs, rotated in place
        angle = pos * inv_freq.astype(np.float64)
        out = v.copy()
        out[..., 0::2] = (v[..., 0::2] * np.cos(angle) - v[..., 1::2] * np.sin(angle)) * attention_factor
        out[..., 1::2] = (v[..., 0::2] * np.sin(angle) + v[..., 1::2] * np.cos(angle)) * attention_factor
        return out

    kv = (latent @ w(attn.kv_b_proj)).reshape(batch, length, h, nope + vdim)
    out = np.zeros((batch, length, h, vdim))
    for b in range(batch):
        for i in range(length):
            for head in range(h):
                qi = np.concatenate([q[b, i, head, :nope], rotate(q[b, i, head, nope:], positions[b, i])])
                scores = []
                for j in range(length):
                    kj = np.concatenate([kv[b, j, head, :nope], rotate(k_rope[b, j], positions[b, j])])
                    allowed = j <= i and segments[b, j] == segments[b, i]
                    scores.append(qi @ kj * softmax_scale(cfg) if allowed else -np.inf)
                p = np.exp(np.array(scores) - max(scores))
                p /= p.sum()
                out[b, i, head] = p @ kv[b, :, head, nope:]
    return out.reshape(batch, length, h * vdim) @ w(attn.o_proj)


@pytest.mark.parametrize("yarn", [None, YarnScaling(factor=4.0, original_max_position_embeddings=8)])
@pytest.mark.parametrize("length", [7, 8])  # odd: one block of queries; even: two halves (causal_attention)
def test_mla_matches_numpy(yarn, length):
    cfg = get_config("tiny", rope_scaling=yarn)
    attn = MLAttention(cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, length, cfg.hidden_size)).astype(np.float32)
    segments = np.array([[1, 1, 1, 2, 2, 2, 2, 2], [0, 0, 1, 1, 1, 1, 1, 1]])[:, :length]
    positions = np.array([[0, 1, 2, 0, 1, 2, 3, 4], [0, 1, 0, 1, 2, 3, 20, 21]])[:, :length]
    cos, sin = rope_angles(jnp.asarray(positions), cfg)
    got = attn(jnp.asarray(x), cos, sin, attention_mask(jnp.asarray(segments)))
    np.testing.assert_allclose(np.asarray(got), numpy_mla(attn, x.astype(np.float64), positions, segments, cfg),
                               rtol=1e-4, atol=1e-5)


def test_mask_is_causal_and_segment_local():
    mask = np.asarray(attention_mask(jnp.asarray([[1, 1, 2, 2]])))[0, 0]
    np.testing.assert_array_equal(mask, [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]])
