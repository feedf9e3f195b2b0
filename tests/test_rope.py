"""RoPE / YaRN against NumPy complex arithmetic and the properties they must have."""

import math

import numpy as np
import pytest

from lite.config import YarnScaling, get_config
from lite.rope import apply_rope, rope_angles, rope_frequencies, softmax_scale


def test_plain_frequencies():
    cfg = get_config("tiny", rope_theta=5000.0)
    inv_freq, factor = rope_frequencies(cfg)
    d = cfg.qk_rope_head_dim
    np.testing.assert_allclose(inv_freq, [5000.0 ** (-2 * i / d) for i in range(d // 2)], rtol=1e-6)
    assert factor == 1.0 and softmax_scale(cfg) == pytest.approx(cfg.qk_head_dim ** -0.5)


def test_rotation_is_complex_multiplication_of_interleaved_pairs():
    cfg = get_config("tiny")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 5, cfg.qk_rope_head_dim)).astype(np.float32)
    positions = np.array([[0, 1, 2, 7, 100]] * 3)
    cos, sin = rope_angles(positions, cfg)
    got = np.asarray(apply_rope(x, cos, sin))
    inv_freq, _ = rope_frequencies(cfg)
    z = (x[..., 0::2] + 1j * x[..., 1::2]) * np.exp(1j * positions[..., None] * inv_freq.astype(np.float64))
    # Evens first, then odds (the same permutation is applied to queries and keys).
    np.testing.assert_allclose(got, np.concatenate([z.real, z.imag], -1), rtol=1e-5, atol=1e-5)


def test_scores_depend_only_on_relative_position():
    cfg = get_config("tiny")
    rng = np.random.default_rng(1)
    q, k = rng.normal(size=(2, cfg.qk_rope_head_dim)).astype(np.float32)

    def score(m, n):
        cq, sq = rope_angles(np.array([m]), cfg)
        ck, sk = rope_angles(np.array([n]), cfg)
        return float(np.dot(np.asarray(apply_rope(q[None], cq, sq))[0], np.asarray(apply_rope(k[None], ck, sk))[0]))

    assert score(10, 3) == pytest.approx(score(107, 100), rel=1e-4, abs=1e-4)
    assert score(0, 0) == pytest.approx(float(np.dot(q, k)), rel=1e-5)


def test_yarn_keeps_fast_dims_and_interpolates_slow_dims():
    yarn = YarnScaling(factor=10.0, original_max_position_embeddings=32768)
    cfg = get_config("longcat-flash-lite").replace(rope_scaling=yarn)
    plain, _ = rope_frequencies(cfg.replace(rope_scaling=None))
    scaled, attention_factor = rope_frequencies(cfg)
    ratio = plain / scaled
    assert ratio[0] == pytest.approx(1.0)  # highest frequency: extrapolated (unchanged)
    assert ratio[-1] == pytest.approx(10.0, rel=1e-5)  # lowest frequency: interpolated by the factor
    assert np.all(np.diff(ratio) >= -1e-6)  # a monotone ramp in between
    assert 1 < np.sum(ratio > 1.0001) < len(ratio)
    assert attention_factor == 1.0  # mscale == mscale_all_dim
    mscale = 0.1 * math.log(10.0) + 1.0
    assert softmax_scale(cfg) == pytest.approx(cfg.qk_head_dim ** -0.5 * mscale**2)


def test_yarn_factor_one_is_plain_rope():
    cfg = get_config("tiny", rope_scaling=YarnScaling(factor=1.0, original_max_position_embeddings=64))
    np.testing.assert_allclose(rope_frequencies(cfg)[0], rope_frequencies(cfg.replace(rope_scaling=None))[0])
