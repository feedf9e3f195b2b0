"""The whole model: causality, document isolation, wiring, gradients, the untrained router bias."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from lite.attention import attention_mask
from lite.config import get_config
from lite.model import UNROLL_MAX_LAYERS, LayerInputs, LongcatModel, next_token_loss, positions_from_segments
from lite.moe import RouterBias, target_expert_shares
from lite.rope import rope_angles

CFG = get_config("tiny")


@functools.lru_cache(maxsize=None)
def model_and_forward(cfg=CFG, seed=0):
    model = LongcatModel(cfg, rngs=nnx.Rngs(seed))
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, tokens, segment_ids=None):
        return nnx.merge(graphdef, state)(tokens, segment_ids)

    return model, functools.partial(forward, state)


def random_tokens(shape, seed=0, cfg=CFG):
    return np.random.default_rng(seed).integers(3, cfg.vocab_size, shape).astype(np.int32)


def test_output_shapes_and_counts():
    _, forward = model_and_forward()
    out = forward(jnp.asarray(random_tokens((2, 10))))
    assert out.logits.shape == (2, 10, CFG.vocab_size)
    assert out.expert_counts.shape == (CFG.num_layers, CFG.num_experts)
    np.testing.assert_array_equal(np.asarray(out.expert_counts.sum(-1)), 2 * 10 * CFG.moe_topk)


def test_causality():
    _, forward = model_and_forward()
    tokens = random_tokens((1, 12))
    base = np.asarray(forward(jnp.asarray(tokens)).logits)
    for p in (0, 4, 10):
        changed = tokens.copy()
        changed[0, p + 1:] = random_tokens((1, 11 - p), seed=p + 1)
        out = np.asarray(forward(jnp.asarray(changed)).logits)
        np.testing.assert_array_equal(out[0, : p + 1], base[0, : p + 1])
        assert not np.allclose(out[0, p + 1:], base[0, p + 1:])


def test_packed_documents_equal_documents_alone():
    _, forward = model_and_forward()
    doc_a, doc_b = random_tokens((1, 5), seed=1), random_tokens((1, 6), seed=2)
    packed = np.concatenate([doc_a, doc_b, np.zeros((1, 2), np.int32)], axis=1)
    segments = np.array([[1] * 5 + [2] * 6 + [0, 0]])
    out = np.asarray(forward(jnp.asarray(packed), jnp.asarray(segments)).logits)
    alone_a = np.asarray(forward(jnp.asarray(doc_a)).logits)
    alone_b = np.asarray(forward(jnp.asarray(doc_b)).logits)
    np.testing.assert_allclose(out[0, :5], alone_a[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out[0, 5:11], alone_b[0], rtol=1e-5, atol=1e-5)


def test_left_padding_changes_nothing():
    _, forward = model_and_forward()
    doc = random_tokens((1, 6), seed=3)
    padded = np.concatenate([np.zeros((1, 3), np.int32), doc], axis=1)
    segments = np.array([[0, 0, 0] + [1] * 6])
    out = np.asarray(forward(jnp.asarray(padded), jnp.asarray(segments)).logits)
    np.testing.assert_allclose(out[0, 3:], np.asarray(forward(jnp.asarray(doc)).logits)[0], rtol=1e-5, atol=1e-5)
    counts = forward(jnp.asarray(padded), jnp.asarray(segments)).expert_counts
    np.testing.assert_array_equal(np.asarray(counts.sum(-1)), 6 * CFG.moe_topk)  # padding not counted


def test_shortcut_layer_wiring():
    model, _ = model_and_forward()
    graphdef, state = nnx.split(model.layers)
    layer0 = nnx.merge(graphdef, jax.tree.map(lambda w: w[0], state))
    x = jnp.asarray(np.random.default_rng(5).normal(size=(1, 6, CFG.hidden_size)), jnp.float32)
    cos, sin = rope_angles(jnp.arange(6)[None], CFG)
    mask = attention_mask(jnp.ones((1, 6), jnp.int32))
    out, _ = layer0(x, LayerInputs(cos, sin, mask, jnp.ones((1, 6), bool)))
    # ARCHITECTURE.md section 3, from the sub-blocks.
    h = x + layer0.attns[0](layer0.attn_norms[0](x), cos, sin, mask)
    u = layer0.mlp_norms[0](h)
    moe = layer0.moe(u.reshape(6, -1))[0]  # the MoE output; routing statistics are not checked here
    h = h + layer0.mlps[0](u)
    h = h + layer0.attns[1](layer0.attn_norms[1](h), cos, sin, mask)
    want = h + layer0.mlps[1](layer0.mlp_norms[1](h)) + moe.reshape(h.shape)
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), rtol=1e-6, atol=1e-6)


def test_positions_restart_per_segment():
    np.testing.assert_array_equal(np.asarray(positions_from_segments(jnp.asarray([[0, 0, 1, 1, 1, 2, 2]]))),
                                  [[0, 1, 0, 1, 2, 0, 1]])


def test_next_token_loss_matches_numpy():
    rng = np.random.default_rng(6)
    logits = rng.normal(size=(2, 5, 7)).astype(np.float32)
    tokens = rng.integers(0, 7, (2, 5))
    segments = np.array([[1, 1, 2, 2, 2], [1, 1, 1, 0, 0]])
    loss, count = next_token_loss(jnp.asarray(logits), jnp.asarray(tokens), jnp.asarray(segments))
    terms = []
    for b in range(2):
        for i in range(4):
            if segments[b, i + 1] == segments[b, i] and segments[b, i + 1] > 0:
                logp = logits[b, i] - np.log(np.exp(logits[b, i]).sum())
                terms.append(-logp[tokens[b, i + 1]])
    assert int(count) == len(terms) == 5
    assert float(loss) == pytest.approx(np.mean(terms), rel=1e-5)


def test_every_parameter_gets_a_finite_nonzero_gradient_and_the_bias_is_not_trained():
    cfg = get_config("tiny", embedding_amplification="layernorm")
    model = LongcatModel(cfg, rngs=nnx.Rngs(0))
    bias_before = np.asarray(model.layers.moe.router.bias[...]).copy()
    optimizer = nnx.Optimizer(model, optax.adamw(1e-2), wrt=nnx.Param)
    tokens = jnp.asarray(random_tokens((4, 16), cfg=cfg))

    def loss_fn(model):
        return next_token_loss(model(tokens).logits, tokens)[0]

    @nnx.jit
    def step(model, optimizer):
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss, grads

    params_before = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
    loss, grads = step(model, optimizer)
    assert np.isfinite(float(loss))
    flat = nnx.to_flat_state(grads)
    assert not any(isinstance(v, RouterBias) for _, v in flat)  # the bias has no gradient at all
    for path, value in flat:
        g = np.asarray(value[...])
        name = "/".join(map(str, path))
        assert np.all(np.isfinite(g)), name
        assert np.any(g != 0), f"zero gradient for {name}"
    moved = jax.tree.map(lambda a, b: bool(np.any(a != np.asarray(b))), params_before, nnx.state(model, nnx.Param))
    assert all(jax.tree.leaves(moved))
    np.testing.assert_array_equal(np.asarray(model.layers.moe.router.bias[...]), bias_before)


def test_update_router_bias_writes_every_layer():
    model = LongcatModel(CFG, rngs=nnx.Rngs(1))
    counts = jnp.asarray(np.tile(np.arange(CFG.num_experts, dtype=np.float32), (CFG.num_layers, 1)))
    model.update_router_bias(counts, rate=0.5)
    bias = np.asarray(model.layers.moe.router.bias[...])
    assert bias.shape == (CFG.num_layers, CFG.num_experts)
    # b = 0.5 * (target - observed share): with the target taken out, more load -> lower bias.
    assert np.all(np.diff(bias - 0.5 * target_expert_shares(CFG), axis=-1) < 0)


def test_bfloat16_compute_stays_close_to_float32():
    model, forward = model_and_forward()
    tokens = jnp.asarray(random_tokens((2, 8), seed=7))
    bf16 = LongcatModel(CFG.replace(compute_dtype="bfloat16"), rngs=nnx.Rngs(0))
    nnx.update(bf16, nnx.state(model))
    low = np.asarray(bf16(tokens).logits, np.float32)
    assert low.dtype == np.float32 and np.all(np.isfinite(low))
    np.testing.assert_allclose(low, np.asarray(forward(tokens).logits), atol=0.05)


def test_bad_shapes_raise_clear_errors():
    model, _ = model_and_forward()
    with pytest.raises(ValueError, match=r"tokens must be \[batch, length\]"):
        model(jnp.zeros((4,), jnp.int32))
    with pytest.raises(ValueError, match="segment_ids shape"):
        model(jnp.zeros((1, 4), jnp.int32), jnp.zeros((1, 5), jnp.int32))


@functools.lru_cache(maxsize=None)
def loss_and_gradient(cfg):
    """(loss, gradient of every parameter, the compiled step's temporary bytes) for a fixed batch."""
    graphdef, params, rest = nnx.split(LongcatModel(cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)
    tokens = jnp.asarray(random_tokens((4, 16), cfg=cfg))

    def loss_fn(params):
        return next_token_loss(nnx.merge(graphdef, params, rest)(tokens).logits, tokens)[0]

    compiled = jax.jit(jax.value_and_grad(loss_fn)).lower(params).compile()
    loss, grads = compiled(params)
    return np.asarray(loss), jax.tree.map(np.asarray, grads), compiled.memory_analysis().temp_size_in_bytes


# The unrolled scan with the "dots" policy, the looped scan with "full" (the default).
@pytest.mark.parametrize("num_layers, remat", [(2, "dots"), (UNROLL_MAX_LAYERS + 1, "full")])
def test_remat_gives_the_loss_and_gradients_of_keeping_every_activation(num_layers, remat):
    """The rematerialised backward recomputes the same operations on the same inputs: bitwise equal
    on CPU, where XLA compiles the recomputation with the forward's own kernels and order."""
    cfg = CFG.replace(num_layers=num_layers)
    loss, grads, kept = loss_and_gradient(cfg.replace(remat="none"))
    loss_r, grads_r, temporaries = loss_and_gradient(cfg.replace(remat=remat))
    np.testing.assert_array_equal(loss_r, loss)
    jax.tree.map(np.testing.assert_array_equal, grads_r, grads)
    if remat == "full":  # keeps only each layer's input ("dots" at these sizes: about as much as "none")
        assert temporaries < kept, (temporaries, kept)
