"""Router, zero experts and load balancing against NumPy loops and hand-built cases."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lite.config import get_config
from oracles import numpy_moe
from lite.moe import (DENSE_EXPERTS_MAX_TOKENS, MoE, ffn_experts_per_token, grouped_experts, router_bias_update,
                      target_expert_shares)

CFG = get_config("tiny", routed_scaling_factor=2.5, moe_topk=3, n_routed_experts=4, zero_expert_num=3,
                 target_ffn_experts_per_token=1.5)


def make_moe(seed=0):
    moe = MoE(CFG, rngs=nnx.Rngs(seed))
    # Larger router weights and a bias that overturns the unbiased ranking for some tokens.
    moe.router.classifier[...] = moe.router.classifier[...] * 50
    moe.router.bias[...] = jnp.asarray([0.0, 0.3, -0.2, 0.0, 0.25, 0.0, -0.1])
    return moe


# Few tokens run every expert densely (decoding), more run the grouped (sorted) form: both checked.
@pytest.mark.parametrize("num_tokens", [24, DENSE_EXPERTS_MAX_TOKENS + 40])
def test_moe_matches_numpy_with_bias_changing_routing(num_tokens):
    moe = make_moe()
    u = np.random.default_rng(0).normal(size=(num_tokens, CFG.hidden_size)).astype(np.float32)
    got, counts, dropped = moe(jnp.asarray(u))
    assert float(dropped) == 0.0  # one device: nothing is dropped
    want, chosen, _ = numpy_moe(moe, u)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)
    weights, got_chosen = moe.router(jnp.asarray(u))
    assert [sorted(c) for c in np.asarray(got_chosen).tolist()] == [list(map(int, c)) for c in chosen]
    np.testing.assert_array_equal(np.asarray(counts), np.bincount(np.concatenate(chosen), minlength=CFG.num_experts))
    # The bias really changed some decisions, and zero experts were really chosen.
    unbiased = np.argsort(-np.asarray(jax.nn.softmax(jnp.asarray(u) @ moe.router.classifier[...])), axis=1)
    assert any(sorted(unbiased[t, :3]) != chosen[t] for t in range(num_tokens))
    assert np.asarray(got_chosen).max() >= CFG.n_routed_experts


def test_token_mask_excludes_padding_from_counts():
    moe = make_moe()
    u = jnp.asarray(np.random.default_rng(1).normal(size=(6, CFG.hidden_size)), jnp.float32)
    mask = jnp.asarray([1, 1, 0, 1, 0, 0], bool)
    counts = moe(u, mask).expert_counts
    _, chosen = moe.router(u)
    kept = np.asarray(chosen)[np.asarray(mask)]
    np.testing.assert_array_equal(np.asarray(counts), np.bincount(kept.ravel(), minlength=CFG.num_experts))


def test_grouped_experts_with_all_tokens_on_one_expert_and_only_zero_experts():
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(5, 8)), jnp.float32)
    gate, up, down = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((3, 8, 4), (3, 8, 4), (3, 4, 8)))
    one_expert = grouped_experts(x, jnp.full((5, 1), 2, jnp.int32), jnp.ones((5, 1)), gate, up, down)
    want = (jax.nn.silu(x @ gate[2]) * (x @ up[2])) @ down[2]
    np.testing.assert_allclose(np.asarray(one_expert), np.asarray(want), rtol=1e-5, atol=1e-5)
    only_zero = grouped_experts(x, jnp.full((5, 2), 3, jnp.int32), jnp.ones((5, 2)), gate, up, down)
    np.testing.assert_array_equal(np.asarray(only_zero), 0.0)


def test_ffn_experts_per_token_hand_built():
    # 3 tokens, k = 3, experts 0-3 FFN, 4-6 zero: token choices {0,1,4}, {2,5,6}, {0,1,3} -> (2 + 1 + 3) / 3.
    chosen = [0, 1, 4, 2, 5, 6, 0, 1, 3]
    counts = jnp.asarray(np.bincount(chosen, minlength=CFG.num_experts), jnp.float32)
    assert float(ffn_experts_per_token(counts, CFG)) == pytest.approx(2.0)


def test_target_shares_meet_the_target():
    shares = target_expert_shares(CFG)
    assert shares.sum() == pytest.approx(1.0)
    assert shares[: CFG.n_routed_experts].sum() * CFG.moe_topk == pytest.approx(CFG.target_ffn_experts_per_token)


def test_bias_update_direction():
    counts = jnp.asarray([10.0, 0, 0, 0, 0, 0, 2])  # expert 0 overloaded, experts 1..5 starved
    new = np.asarray(router_bias_update(jnp.zeros(7), counts, CFG, rate=0.1))
    assert new[0] < 0 and new[6] < new[5] and all(new[1:6] > 0)


def test_bias_update_moves_load_toward_target():
    moe = MoE(CFG, rngs=nnx.Rngs(3))
    moe.router.classifier[...] = moe.router.classifier[...] * 20
    u = jnp.asarray(np.random.default_rng(4).normal(size=(512, CFG.hidden_size)), jnp.float32)
    route = jax.jit(lambda bias: jax.ops.segment_sum(
        jnp.ones(512 * CFG.moe_topk),
        jax.lax.top_k(jax.nn.softmax(u @ moe.router.classifier[...]) + bias, CFG.moe_topk)[1].reshape(-1),
        num_segments=CFG.num_experts))
    target = target_expert_shares(CFG)
    bias = jnp.zeros(CFG.num_experts)
    first = route(bias)
    for _ in range(300):
        bias = router_bias_update(bias, route(bias), CFG, rate=0.02)
    last = route(bias)
    error = lambda c: np.abs(np.asarray(c) / np.sum(np.asarray(c)) - target).sum()
    assert error(last) < 0.3 * error(first)
    assert abs(float(ffn_experts_per_token(last, CFG)) - CFG.target_ffn_experts_per_token) < 0.15
