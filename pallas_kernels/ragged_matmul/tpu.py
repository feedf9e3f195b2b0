"""Grouped matmul for TPU (Mosaic): visits scalar-prefetched, blocks pipelined by BlockSpecs.

`gmm`: out[m, n] = lhs[m, k] @ rhs[g] for the rows of group g (rhs [g, k, n], or [g, n, k] with
transpose_rhs, which is how the input gradient reuses it; or every layer's groups stacked,
[L, g, k, n], read in place at `layer`). `tgmm`: the weight gradient
out[g, k, n] = lhs[rows of g].T @ dy[rows of g]. Grids:

    gmm:  (n tiles, visits, k tiles)   one f32 accumulator per (visit, n tile), stored on the last k tile
    tgmm: (k tiles, n tiles, visits)   one f32 accumulator per group, stored on the group's last visit

Ragged edges: a partial k tile (k not a multiple of tk) reads undefined values past k, so both
operands are masked to zero there before the dot; partial m and n tiles only produce output rows or
columns that are never stored. Rows outside the local groups are zeroed by the caller.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.backend import out_struct
from pallas_kernels.ragged_matmul.metadata import group_tiles, stacked_groups, zero_rows_outside

DEFAULT_TILING = (512, 512, 512)  # (tm, tk, tn); clipped to the array where an array is smaller


def _tile(size: int, tile: int) -> int:
    return size if size <= tile else tile  # a block equal to the whole dimension is always legal


def _tiling(m: int, k: int, n: int, tiling) -> tuple[int, int, int]:
    tm, tk, tn = tiling or DEFAULT_TILING
    return _tile(m, tm), _tile(k, tk), _tile(n, tn)


@functools.partial(jax.jit, static_argnames=("transpose_rhs", "tiling", "interpret", "layer"))
def gmm(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, group_offset: jax.Array, *,
        transpose_rhs: bool = False, tiling: tuple[int, int, int] | None = None, interpret=False,
        layer: int | None = None) -> jax.Array:
    """lhs [m, k], rhs [g, k, n] ([g, n, k] if transpose_rhs), or [L, g, ., .] with `layer` -> [m, n] in
    lhs.dtype. rhs blocks are rounded to lhs.dtype as they are read."""
    m, k = lhs.shape
    num_local, first, rhs = stacked_groups(rhs, layer)
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    tm, tk, tn = _tiling(m, k, n, tiling)
    tiles_k, k_rem = pl.cdiv(k, tk), k % tk
    tiles = group_tiles(group_sizes, group_offset, num_local, m, tm, visit_empty=False)
    out_dtype = lhs.dtype

    def kernel(group_ids, tile_ids, starts, ends, lhs_ref, rhs_ref, out_ref, acc_ref):
        visit, k_i = pl.program_id(1), pl.program_id(2)

        @pl.when(k_i == 0)
        def _():
            acc_ref[...] = jnp.zeros_like(acc_ref)

        def accumulate(mask_k: bool):
            a, b = lhs_ref[...], rhs_ref[...].astype(out_dtype)
            if mask_k:  # the undefined columns past k must not reach the sum
                a = jnp.where(jax.lax.broadcasted_iota(jnp.int32, a.shape, 1) < k_rem, a, 0)
                b = jnp.where(jax.lax.broadcasted_iota(jnp.int32, b.shape, 1 if transpose_rhs else 0) < k_rem, b, 0)
            dims = (((1,), (1,)), ((), ())) if transpose_rhs else (((1,), (0,)), ((), ()))
            acc_ref[...] += jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)

        if k_rem:
            pl.when(k_i < tiles_k - 1)(lambda: accumulate(False))
            pl.when(k_i == tiles_k - 1)(lambda: accumulate(True))
        else:
            accumulate(False)

        @pl.when(k_i == tiles_k - 1)
        def _():
            group = group_ids[visit]
            row = tile_ids[visit] * tm + jax.lax.broadcasted_iota(jnp.int32, (tm, tn), 0)
            mine = (row >= starts[group]) & (row < ends[group])
            out_ref[...] = jnp.where(mine, acc_ref[...].astype(out_dtype), out_ref[...])

    lhs_spec = pl.BlockSpec((tm, tk), lambda n_i, v, k_i, gid, tid, st, en: (tid[v], k_i))
    if transpose_rhs:
        rhs_spec = pl.BlockSpec((None, tn, tk), lambda n_i, v, k_i, gid, tid, st, en: (gid[v] + first, n_i, k_i))
    else:
        rhs_spec = pl.BlockSpec((None, tk, tn), lambda n_i, v, k_i, gid, tid, st, en: (gid[v] + first, k_i, n_i))
    out_spec = pl.BlockSpec((tm, tn), lambda n_i, v, k_i, gid, tid, st, en: (tid[v], n_i))
    out = pl.pallas_call(
        kernel,
        out_shape=out_struct((m, n), out_dtype, lhs),
        name="ragged_matmul_gmm",
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=4,
            grid=(pl.cdiv(n, tn), tiles.num_visits, tiles_k),
            in_specs=[lhs_spec, rhs_spec],
            out_specs=out_spec,
            scratch_shapes=[pltpu.VMEM((tm, tn), jnp.float32)],
        ),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary", "arbitrary")),
        cost_estimate=pl.CostEstimate(flops=2 * m * k * n, transcendentals=0,
                                      bytes_accessed=lhs.nbytes * pl.cdiv(n, tn) + rhs.nbytes * num_local // rhs.shape[0]
                                      + m * n * lhs.itemsize),
        interpret=interpret,
    )(tiles.group_ids, tiles.tile_ids, tiles.starts, tiles.ends, lhs, rhs)
    return zero_rows_outside(out, tiles)


@functools.partial(jax.jit, static_argnames=("num_local", "tiling", "interpret"))
def tgmm(lhs: jax.Array, dy: jax.Array, group_sizes: jax.Array, group_offset: jax.Array, *, num_local: int,
         tiling: tuple[int, int, int] | None = None, interpret=False) -> jax.Array:
    """lhs [m, k], dy [m, n] -> [num_local, k, n] in lhs.dtype: per local group, lhs[rows].T @ dy[rows]."""
    m, k = lhs.shape
    n = dy.shape[1]
    tm, tk, tn = _tiling(m, k, n, tiling)
    tiles = group_tiles(group_sizes, group_offset, num_local, m, tm, visit_empty=True)
    out_dtype = lhs.dtype

    def kernel(group_ids, tile_ids, starts, ends, lhs_ref, dy_ref, out_ref, acc_ref):
        visit = pl.program_id(2)
        group = group_ids[visit]

        @pl.when((visit == 0) | (group_ids[jnp.maximum(visit - 1, 0)] != group))
        def _():
            acc_ref[...] = jnp.zeros_like(acc_ref)

        row = tile_ids[visit] * tm + jax.lax.broadcasted_iota(jnp.int32, (tm, 1), 0)
        mine = (row >= starts[group]) & (row < ends[group])  # also drops the undefined rows past m
        a = jnp.where(mine, lhs_ref[...], 0)
        b = jnp.where(mine, dy_ref[...], 0)
        acc_ref[...] += jax.lax.dot_general(a.swapaxes(0, 1), b, (((1,), (0,)), ((), ())),
                                            preferred_element_type=jnp.float32)

        @pl.when(group_ids[visit + 1] != group)  # the group's last visit (group_ids ends with a sentinel)
        def _():
            out_ref[...] = acc_ref[...].astype(out_dtype)

    out = pl.pallas_call(
        kernel,
        out_shape=out_struct((num_local, k, n), out_dtype, lhs),
        name="ragged_matmul_tgmm",
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=4,
            grid=(pl.cdiv(k, tk), pl.cdiv(n, tn), tiles.num_visits),
            in_specs=[pl.BlockSpec((tm, tk), lambda k_i, n_i, v, gid, tid, st, en: (tid[v], k_i)),
                      pl.BlockSpec((tm, tn), lambda k_i, n_i, v, gid, tid, st, en: (tid[v], n_i))],
            out_specs=pl.BlockSpec((None, tk, tn), lambda k_i, n_i, v, gid, tid, st, en: (gid[v], k_i, n_i)),
            scratch_shapes=[pltpu.VMEM((tk, tn), jnp.float32)],
        ),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        cost_estimate=pl.CostEstimate(flops=2 * m * k * n, transcendentals=0,
                                      bytes_accessed=(lhs.nbytes + dy.nbytes) * 2 + num_local * k * n * lhs.itemsize),
        interpret=interpret,
    )(tiles.group_ids, tiles.tile_ids, tiles.starts, tiles.ends, lhs, dy)
    return out
