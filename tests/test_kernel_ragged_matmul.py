"""The grouped-matmul kernels (TPU and GPU, in interpret mode) against NumPy and the XLA reference.

Shapes are fixed per test so jit caches across hypothesis examples; the tilings make m, k and n
ragged (k = 40 with k tiles of 16: the partial k tile the upstream megablox kernel is reported to get
wrong), and drawn group sizes include empty groups and rows past sum(group_sizes).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from jax.experimental.pallas import tpu as pltpu

from oracles import numpy_grouped
from pallas_kernels.ragged_matmul import kernel_ragged_matmul, ragged_matmul, ragged_matmul_reference

M, K, N, G = 37, 40, 24, 5
TILINGS = {"interpret": (8, 16, 16), "gpu-interpret": (16, 16, 16)}


@functools.partial(jax.jit, static_argnames=("backend", "tiling"))
def kernel_and_grads(lhs, rhs, sizes, offset, d_out, *, backend, tiling):
    out, vjp = jax.vjp(lambda a, b: kernel_ragged_matmul(a, b, sizes, offset, backend, tiling), lhs, rhs)
    return out, *vjp(d_out)


@jax.jit
def reference_and_grads(lhs, rhs, sizes, offset, d_out):
    out, vjp = jax.vjp(lambda a, b: ragged_matmul_reference(a, b, sizes, offset), lhs, rhs)
    return out, *vjp(d_out)


def operands(seed, num_local, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(M, K)).astype(dtype), rng.normal(size=(num_local, K, N)).astype(dtype),
            rng.normal(size=(M, N)).astype(dtype))


@st.composite
def group_sizes(draw):
    """G sizes with sum <= M, often with empty groups (several groups start inside one row tile)."""
    sizes = draw(st.lists(st.one_of(st.just(0), st.integers(0, 3), st.integers(0, M)), min_size=G, max_size=G))
    total, kept = 0, []
    for size in sizes:
        kept.append(min(size, M - total))
        total += kept[-1]
    return np.asarray(kept, np.int32)


def check(backend, sizes, offset, num_local, seed=0):
    lhs, rhs, d_out = operands(seed, num_local)
    args = (jnp.asarray(lhs), jnp.asarray(rhs), jnp.asarray(sizes), jnp.int32(offset), jnp.asarray(d_out))
    out, d_lhs, d_rhs = kernel_and_grads(*args, backend=backend, tiling=TILINGS.get(backend, (8, 16, 16)))
    ref_out, ref_d_lhs, ref_d_rhs = reference_and_grads(*args)
    np.testing.assert_allclose(np.asarray(out), numpy_grouped(lhs, rhs, sizes, offset), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref_out), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(d_lhs), np.asarray(ref_d_lhs), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(d_rhs), np.asarray(ref_d_rhs), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", ["interpret", "gpu-interpret"])
@settings(max_examples=12, deadline=None)
@given(sizes=group_sizes())
def test_all_groups_forward_and_vjp(backend, sizes):
    check(backend, sizes, 0, G)


@pytest.mark.parametrize("backend", ["interpret", "gpu-interpret"])
@settings(max_examples=8, deadline=None)
@given(sizes=group_sizes(), offset=st.integers(0, G - 2))
def test_expert_shard_with_group_offset(backend, sizes, offset):
    check(backend, sizes, offset, 2)


def test_tpu_simulator_finds_no_races_or_out_of_bounds_reads():
    """pltpu.InterpretParams simulates TPU memory: out-of-bounds reads raise, races are detected."""
    params = pltpu.InterpretParams(detect_races=True, out_of_bounds_reads="raise", uninitialized_memory="nan")
    check(params, np.asarray([6, 0, 11, 1, 9], np.int32), 0, G)
    check(params, np.asarray([0, 9, 0, 20, 3], np.int32), 2, 2)


def test_bfloat16_inputs():
    lhs, rhs, _ = operands(1, G)
    sizes = np.asarray([10, 0, 7, 7, 5], np.int32)
    for backend in ("interpret", "gpu-interpret"):
        out = kernel_ragged_matmul(jnp.asarray(lhs, jnp.bfloat16), jnp.asarray(rhs, jnp.bfloat16), jnp.asarray(sizes),
                                   jnp.int32(0), backend, TILINGS[backend])
        assert out.dtype == jnp.bfloat16
        rounded = lambda x: np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32))
        want = numpy_grouped(rounded(lhs), rounded(rhs), sizes, 0)
        np.testing.assert_allclose(np.asarray(out.astype(jnp.float32)), want, rtol=2e-2, atol=5e-2)


def test_dispatch_auto_is_xla_on_cpu_and_pallas_runs_the_kernel():
    lhs, rhs, _ = operands(2, G)
    sizes = jnp.asarray([3, 0, 20, 4, 2], jnp.int32)
    want = numpy_grouped(lhs, rhs, np.asarray(sizes), 0)
    for implementation in ("auto", "xla", "pallas"):
        got = ragged_matmul(jnp.asarray(lhs), jnp.asarray(rhs), sizes, implementation=implementation)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)
    shard = ragged_matmul(jnp.asarray(lhs), jnp.asarray(rhs[1:3]), sizes, group_offset=1, implementation="pallas")
    np.testing.assert_allclose(np.asarray(shard), numpy_grouped(lhs, rhs[1:3], np.asarray(sizes), 1), rtol=1e-4,
                               atol=1e-4)


def test_group_count_mismatch_without_offset_is_a_clear_error():
    with pytest.raises(ValueError, match="pass group_offset"):
        ragged_matmul(jnp.ones((4, 3)), jnp.ones((2, 3, 5)), jnp.asarray([1, 1, 2], jnp.int32))
    with pytest.raises(ValueError, match="unknown ragged_matmul implementation 'triton'"):
        ragged_matmul(jnp.ones((4, 3)), jnp.ones((2, 3, 5)), jnp.asarray([1, 3], jnp.int32), implementation="triton")


@pytest.mark.parametrize("backend", ["interpret", "gpu-interpret"])
@pytest.mark.parametrize("offset, num_local", [(0, G), (2, 2)])
def test_layer_of_a_stack_reads_its_groups(backend, offset, num_local):
    """rhs stacked over layers [L, g, k, n] with a layer: the kernels index the flat [L * g, k, n] view
    (group ids offset by layer * g) and equal the oracle on rhs[layer]; the input gradient too, and
    the weight gradient lands at that layer of a zero stack. float32 weights under bfloat16 rows
    are rounded as they are read."""
    rng = np.random.default_rng(3)
    sizes = np.asarray([9, 0, 12, 3, 8], np.int32)
    lhs, d_out = rng.normal(size=(M, K)).astype(np.float32), rng.normal(size=(M, N)).astype(np.float32)
    stack = rng.normal(size=(3, num_local, K, N)).astype(np.float32)
    tiling = TILINGS[backend]
    for layer in range(3):
        out, vjp = jax.vjp(lambda a, b: kernel_ragged_matmul(a, b, jnp.asarray(sizes), jnp.int32(offset), backend,
                                                             tiling, layer), jnp.asarray(lhs), jnp.asarray(stack))
        np.testing.assert_allclose(np.asarray(out), numpy_grouped(lhs, stack[layer], sizes, offset), rtol=1e-4,
                                   atol=1e-4)
        d_lhs, d_stack = vjp(jnp.asarray(d_out))
        _, ref_vjp = jax.vjp(lambda a, b: ragged_matmul_reference(a, b, jnp.asarray(sizes), offset), jnp.asarray(lhs),
                             jnp.asarray(stack[layer]))
        ref_d_lhs, ref_d_rhs = ref_vjp(jnp.asarray(d_out))
        np.testing.assert_allclose(np.asarray(d_lhs), np.asarray(ref_d_lhs), rtol=1e-4, atol=1e-4)
        want = np.zeros_like(stack)
        want[layer] = np.asarray(ref_d_rhs)
        np.testing.assert_allclose(np.asarray(d_stack), want, rtol=1e-4, atol=1e-4)
    rounded = lambda x: np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32))  # noqa: E731
    out = kernel_ragged_matmul(jnp.asarray(lhs, jnp.bfloat16), jnp.asarray(stack), jnp.asarray(sizes), jnp.int32(offset),
                               backend, tiling, 1)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out.astype(jnp.float32)),
                               numpy_grouped(rounded(lhs), rounded(stack[1]), sizes, offset), rtol=2e-2, atol=5e-2)


def test_a_layer_needs_a_stacked_rhs():
    with pytest.raises(ValueError, match=r"layer 2 needs rhs stacked as \[L, g, k, n\] with layer < L"):
        ragged_matmul(jnp.ones((4, 3)), jnp.ones((2, 2, 3, 5)), jnp.asarray([1, 3], jnp.int32), layer=2)
    with pytest.raises(ValueError, match=r"layer 0 needs rhs stacked"):
        ragged_matmul(jnp.ones((4, 3)), jnp.ones((2, 3, 5)), jnp.asarray([1, 3], jnp.int32), layer=0)
