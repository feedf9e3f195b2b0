"""Sharded model vs single-device model on 8 fake CPU devices.

Run by tests/test_sharding.py in its own pytest process (XLA_FLAGS must be set before JAX starts,
and the rest of the suite keeps one device):
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m pytest -q tests/sharding_mesh_cases.py
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lite.config import get_config
from lite.model import LongcatModel, PackedPrompts, next_token_loss, pack_prompts
from lite.moe import MoE
from oracles import numpy_moe, ragged_buffer_drops
from pallas_kernels import backend as kernel_backend
from sharding import expert_parallel
from sharding.expert_parallel import expert_capacity, ragged_buffer_rows
from sharding.mesh import make_mesh
from sharding.rules import shard_model

assert jax.device_count() == 8, "run with XLA_FLAGS=--xla_force_host_platform_device_count=8"

# 8 FFN experts so that expert=8 puts one on each device; larger init so routing is decisive.
CFG = get_config("tiny", num_layers=1, n_routed_experts=8, zero_expert_num=4, moe_topk=3,
                 target_ffn_experts_per_token=2.0, initializer_range=0.1)
# The same model with buffers that never drop (the single-device model drops nothing either).
NO_DROPS = CFG.replace(expert_dispatch="capacity", expert_capacity_factor=1e6)


def batch():
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, CFG.vocab_size, (8, 12)).astype(np.int32)
    tokens[2, 5] = CFG.eos_token_id  # the N-gram hash restarts mid-row
    segments = np.ones_like(tokens)
    segments[1, 6:] = 2  # a packed second document
    segments[3, 9:] = 0  # padding
    return jnp.asarray(tokens), jnp.asarray(segments)


def loss_and_grads(model, tokens, segments):
    def loss_fn(m):
        out = m(tokens, segments)
        return next_token_loss(out.logits, tokens, segments)[0], (out.expert_counts, out.dropped_slots)

    (loss, (counts, dropped)), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    return loss, counts, dropped, nnx.state(grads, nnx.Param)


@functools.lru_cache(maxsize=None)
def single_device():
    model = LongcatModel(CFG, rngs=nnx.Rngs(0))
    return jax.device_get(nnx.jit(loss_and_grads)(model, *batch()))


# "xla": what `auto` runs on CPU; "interpret" / "gpu-interpret": the TPU / GPU Pallas kernels (the
# grouped matmul and the N-gram gather, on each device's table shard) in interpret mode, inside the
# shard_maps with check_vma on, as a TPU pod or a GPU node would run them.
MESH_CASES = [(spec, "xla") for spec in ("data=8", "data=2,expert=4", "expert=8")] + \
    [(spec, "interpret") for spec in ("data=8", "data=2,expert=4", "expert=8")] + [("data=2,expert=4", "gpu-interpret")]


@pytest.fixture
def chosen_kernels(monkeypatch):
    """The (op, backend) pairs the ops chose while tracing: proof that the kernels really ran."""
    chosen, choose = set(), kernel_backend.choose

    def recording(op, implementation):
        chosen.add((op, choose(op, implementation)))
        return choose(op, implementation)

    monkeypatch.setattr(kernel_backend, "choose", recording)
    return chosen


def expected_kernels(spec, kernels):
    # On data=8 every expert is local and 12 tokens per device take the dense expert form.
    ops = {"ngram_gather"} if "expert" not in spec else {"ngram_gather", "ragged_matmul"}
    return {(op, kernels) for op in ops}


@pytest.mark.parametrize("spec,kernels", MESH_CASES)
def test_loss_and_every_gradient_match_single_device(spec, kernels, chosen_kernels):
    want_loss, want_counts, _, want_grads = single_device()
    chosen_kernels.clear()
    mesh = make_mesh(spec)
    model = LongcatModel(NO_DROPS, rngs=nnx.Rngs(0))
    with jax.set_mesh(mesh), kernel_backend.forced(kernels):
        shard_model(model, mesh)
        # The experts really are split: each device holds E / n_ep of them.
        local_experts = model.layers.moe.w_gate[...].addressable_shards[0].data.shape[1]
        assert local_experts == CFG.n_routed_experts // dict(mesh.shape).get("expert", 1)
        loss, counts, dropped, grads = nnx.jit(loss_and_grads)(model, *batch())
    if kernels != "xla":
        assert chosen_kernels == expected_kernels(spec, kernels), chosen_kernels
    np.testing.assert_array_equal(np.asarray(dropped), np.zeros(CFG.num_layers))
    np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(counts), np.asarray(want_counts))
    got, want = nnx.to_flat_state(grads), dict(nnx.to_flat_state(want_grads))
    assert len(got) == len(want) > 20
    for path, leaf in got:
        np.testing.assert_allclose(np.asarray(leaf[...]), np.asarray(want[path][...]), rtol=0, atol=1e-5,
                                   err_msg="/".join(map(str, path)))
    # The padded table's rows split 8 ways: each device holds an eighth.
    assert model.embed.ngram_table[...].addressable_shards[0].data.shape[0] == CFG.ngram_padded_rows // 8
    # Not vacuous: the table got gradients on every device's real rows, and none on the padding.
    table_grad = np.asarray(dict(got)[("embed", "ngram_table")][...])
    assert not table_grad[CFG.ngram_total_rows:].any()
    rows_per_device = CFG.ngram_total_rows // 8
    assert all(np.abs(table_grad[d * rows_per_device:(d + 1) * rows_per_device]).sum() > 0 for d in range(8))


@pytest.mark.parametrize("kernels", ["xla", "interpret", "gpu-interpret"])
def test_decode_step_on_mesh_matches_single_device(kernels, chosen_kernels):
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, CFG.vocab_size, n).tolist() for n in (6, 3, 5, 1, 6, 2, 4, 6)]
    packed = PackedPrompts(*map(jnp.asarray, pack_prompts(prompts, 6)))
    new_tokens = jnp.asarray(rng.integers(3, CFG.vocab_size, (8,)), jnp.int32).at[0].set(CFG.eos_token_id)

    def prefill_and_step(model):
        _, cache = model.prefill(packed, cache_len=8)
        return model.decode_step(cache, new_tokens)

    model = LongcatModel(CFG, rngs=nnx.Rngs(0))
    want_logits, want_cache = nnx.jit(prefill_and_step)(model)
    mesh = make_mesh("data=2,expert=4")
    # Buffers that would drop nearly every slot in training: inference ignores them (dropless).
    model = LongcatModel(CFG.replace(expert_dispatch="capacity", expert_capacity_factor=0.01), rngs=nnx.Rngs(0))
    chosen_kernels.clear()
    with jax.set_mesh(mesh), kernel_backend.forced(kernels):
        shard_model(model, mesh)
        logits, cache = nnx.jit(prefill_and_step)(model)
    if kernels != "xla":
        assert chosen_kernels == expected_kernels("data=2,expert=4", kernels), chosen_kernels
    np.testing.assert_allclose(np.asarray(logits), np.asarray(want_logits), rtol=0, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(cache.ngram), np.asarray(want_cache.ngram))
    assert np.asarray(logits).std() > 1e-3  # the comparison is not between two constants


# ---------------------------------------------------------------------------------------------
# The MoE alone: dropped slots with a small capacity, and the dropless ragged dispatch.

def moe_inputs(cfg, tokens=64):
    moe = MoE(cfg, rngs=nnx.Rngs(3))
    rng = np.random.default_rng(2)
    u = rng.normal(size=(tokens, CFG.hidden_size)).astype(np.float32)
    mask = np.ones(tokens, bool)
    mask[5:9] = False
    return moe, u, mask


def run_on_mesh(moe, u, mask, spec):
    mesh = make_mesh(spec)

    def forward(m, u, mask):
        return m(u, mask)

    with jax.set_mesh(mesh):
        return jax.device_get(nnx.jit(forward)(moe, jnp.asarray(u), jnp.asarray(mask)))


@pytest.mark.parametrize("spec", ["expert=8", "data=2,expert=4"])
def test_small_capacity_drops_exactly_the_overflow_slots(spec):
    cfg = CFG.replace(expert_dispatch="capacity", expert_capacity_factor=0.5)
    moe, u, mask = moe_inputs(cfg)
    capacity = expert_capacity(len(u) // 8, cfg)
    assert capacity == 1  # 8 tokens per device, 2 FFN slots each over 8 experts, halved
    out, _, dropped = run_on_mesh(moe, u, mask, spec)
    want_out, _, want_dropped = numpy_moe(moe, u, mask, capacity=capacity, shards=8)
    assert want_dropped > 10
    assert int(dropped) == want_dropped
    np.testing.assert_allclose(out, want_out, rtol=1e-4, atol=1e-5)


def test_model_reports_dropped_slots_per_layer():
    model = LongcatModel(CFG.replace(expert_dispatch="capacity", expert_capacity_factor=0.25), rngs=nnx.Rngs(0))
    mesh = make_mesh("expert=8")
    with jax.set_mesh(mesh):
        shard_model(model, mesh)
        out = nnx.jit(lambda m, t, s: m(t, s))(model, *batch())
    # 12 tokens per device, 2 target FFN slots over 8 experts at factor 0.25: capacity 1 per expert,
    # so at least (FFN slots - 8 experts) per device are dropped; the exact count is checked above.
    ffn_slots = float(np.asarray(out.expert_counts)[0, : CFG.n_routed_experts].sum())
    assert out.dropped_slots.shape == (CFG.num_layers,)
    assert ffn_slots - 8 * 8 <= float(out.dropped_slots[0]) < ffn_slots


def emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *,
                               axis_name):
    """ragged_all_to_all from its documented semantics with all_gather (XLA:CPU lacks the op)."""
    me = jax.lax.axis_index(axis_name)
    operands = jax.lax.all_gather(operand, axis_name)  # [n, M, D]
    starts, sizes, targets = (jax.lax.all_gather(a, axis_name) for a in (input_offsets, send_sizes, output_offsets))
    rows = jnp.arange(output.shape[0])
    for source in range(operands.shape[0]):
        at, size, take = targets[source, me], sizes[source, me], starts[source, me]
        inside = (rows >= at) & (rows < at + size)
        picked = operands[source][jnp.clip(take + rows - at, 0, operand.shape[0] - 1)]
        output = jnp.where(inside[:, None], picked, output)
    return output


def test_ragged_dispatch_is_dropless_and_matches_single_device(monkeypatch):
    monkeypatch.setattr(expert_parallel, "ragged_all_to_all", emulated_ragged_all_to_all)
    moe, u, mask = moe_inputs(CFG.replace(expert_dispatch="ragged"))

    def loss(m, u, mask):
        out, counts, dropped = m(u, mask)
        # Padding rows are left out: the dispatch does not send them to the FFN experts at all.
        weights = jnp.arange(out.size).reshape(out.shape) / out.size * mask[:, None]
        return jnp.sum(jnp.sin(out) * weights), (out, counts, dropped)

    grad_fn = nnx.jit(nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True))
    (_, (want_out, want_counts, _)), (want_gm, want_gu) = grad_fn(moe, jnp.asarray(u), jnp.asarray(mask))
    want_np, _, _ = numpy_moe(moe, u, mask)
    mesh = make_mesh("data=2,expert=4")
    with jax.set_mesh(mesh):
        (_, (out, counts, dropped)), (gm, gu) = grad_fn(moe, jnp.asarray(u), jnp.asarray(mask))
    assert int(dropped) == 0
    np.testing.assert_allclose(np.asarray(out), want_np, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(out)[mask], np.asarray(want_out)[mask], rtol=0, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(counts), np.asarray(want_counts))
    np.testing.assert_allclose(np.asarray(gu)[mask], np.asarray(want_gu)[mask], rtol=0, atol=1e-5)
    for name in ("w_gate", "w_up", "w_down"):
        np.testing.assert_allclose(np.asarray(getattr(gm, name)[...]), np.asarray(getattr(want_gm, name)[...]),
                                   rtol=0, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("spec", ["expert=8", "data=2,expert=4"])
def test_bounded_ragged_buffer_drops_exactly_the_overflow_slots(spec, monkeypatch):
    monkeypatch.setattr(expert_parallel, "ragged_all_to_all", emulated_ragged_all_to_all)
    cfg = CFG.replace(expert_dispatch="ragged", ragged_buffer_factor=0.75)
    moe, u, mask = moe_inputs(cfg)
    n_ep = dict(make_mesh(spec).shape)["expert"]
    buffer_rows = ragged_buffer_rows(len(u) // 8, n_ep, cfg)
    assert buffer_rows == 12  # 8 tokens per device x 2 target FFN slots x 0.75
    _, chosen, _ = numpy_moe(moe, u, mask)
    drop = ragged_buffer_drops(chosen, mask, cfg.n_routed_experts, devices=8, expert_devices=n_ep,
                               buffer_rows=buffer_rows)
    want_out, _, want_dropped = numpy_moe(moe, u, mask, drop=drop)
    assert want_dropped == len(drop) > 3
    out, _, dropped = run_on_mesh(moe, u, mask, spec)
    assert int(dropped) == want_dropped
    np.testing.assert_allclose(out, want_out, rtol=1e-4, atol=1e-5)
    # The same buffers under `dropless` (how prefill and decode steps trace): nothing is dropped.
    with expert_parallel.dropless_context():
        out, _, dropped = run_on_mesh(moe, u, mask, spec)
    assert int(dropped) == 0
    np.testing.assert_allclose(out, numpy_moe(moe, u, mask)[0], rtol=1e-4, atol=1e-5)
