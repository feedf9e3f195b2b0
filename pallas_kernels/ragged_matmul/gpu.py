"""Grouped matmul for GPUs (Pallas Triton lowering): one program per (n tile, visit) / (k, n tile, group).

`gmm`: a program owns one visit (group, row tile) and one n tile and loops over k, loading the row
tile masked to its group's rows; `tgmm` (weight gradient): a program owns one (k tile, n tile) of
one group's weight and loops over that group's row tiles. All loads and stores are masked at the
array edges, so m, k and n need not be multiples of the tiles (Triton blocks are powers of two).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels.backend import out_struct
from pallas_kernels.ragged_matmul.metadata import group_tiles, max_visits, stacked_groups, zero_rows_outside

DEFAULT_TILING = (128, 64, 128)  # (tm, tk, tn)
COMPILER_PARAMS = dict(num_warps=8, num_stages=3)


def _pow2_tile(size: int, tile: int) -> int:
    return min(tile, max(16, 1 << (size - 1).bit_length()))  # tl.dot needs blocks of at least 16


def _tiling(m: int, k: int, n: int, tiling) -> tuple[int, int, int]:
    tm, tk, tn = tiling or DEFAULT_TILING
    return _pow2_tile(m, tm), _pow2_tile(k, tk), _pow2_tile(n, tn)


def _range(start, size: int, limit: int):
    index = start + jnp.arange(size, dtype=jnp.int32)
    return index, index < limit


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
    tiles = group_tiles(group_sizes, group_offset, num_local, m, tm, visit_empty=False)

    def kernel(group_ids, tile_ids, starts, ends, lhs_ref, rhs_ref, out_ref):
        n_i, visit = pl.program_id(0), pl.program_id(1)
        group = group_ids[visit]

        @pl.when(group < num_local)  # visits past the last one do nothing
        def _():
            row0 = tile_ids[visit] * tm
            row, _ = _range(row0, tm, m)
            mine = (row >= starts[group]) & (row < ends[group])
            _, col_ok = _range(n_i * tn, tn, n)

            def step(k_i, acc):
                _, k_ok = _range(k_i * tk, tk, k)
                a = plt.load(lhs_ref.at[pl.ds(row0, tm), pl.ds(k_i * tk, tk)],
                             mask=mine[:, None] & k_ok[None, :], other=0)
                if transpose_rhs:
                    b = plt.load(rhs_ref.at[group + first, pl.ds(n_i * tn, tn), pl.ds(k_i * tk, tk)],
                                 mask=col_ok[:, None] & k_ok[None, :], other=0)
                    dims = (((1,), (1,)), ((), ()))
                else:
                    b = plt.load(rhs_ref.at[group + first, pl.ds(k_i * tk, tk), pl.ds(n_i * tn, tn)],
                                 mask=k_ok[:, None] & col_ok[None, :], other=0)
                    dims = (((1,), (0,)), ((), ()))
                return acc + jax.lax.dot_general(a, b.astype(a.dtype), dims, preferred_element_type=jnp.float32)

            acc = jax.lax.fori_loop(0, pl.cdiv(k, tk), step, jnp.zeros((tm, tn), jnp.float32))
            plt.store(out_ref.at[pl.ds(row0, tm), pl.ds(n_i * tn, tn)], acc.astype(out_ref.dtype),
                      mask=mine[:, None] & col_ok[None, :])

    out = pl.pallas_call(
        kernel,
        out_shape=out_struct((m, n), lhs.dtype, lhs),
        name="ragged_matmul_gmm",
        grid=(pl.cdiv(n, tn), max_visits(m, tm, num_local)),
        compiler_params=plt.CompilerParams(**COMPILER_PARAMS),
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

    def kernel(starts, ends, lhs_ref, dy_ref, out_ref):
        k_i, n_i, group = pl.program_id(0), pl.program_id(1), pl.program_id(2)
        start, end = starts[group], ends[group]
        _, k_ok = _range(k_i * tk, tk, k)
        _, col_ok = _range(n_i * tn, tn, n)

        def step(tile, acc):
            row, _ = _range(tile * tm, tm, m)
            mine = (row >= start) & (row < end)
            a = plt.load(lhs_ref.at[pl.ds(tile * tm, tm), pl.ds(k_i * tk, tk)], mask=mine[:, None] & k_ok[None, :],
                         other=0)
            b = plt.load(dy_ref.at[pl.ds(tile * tm, tm), pl.ds(n_i * tn, tn)], mask=mine[:, None] & col_ok[None, :],
                         other=0)
            return acc + jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)

        # An empty group runs no step and stores zeros.
        acc = jax.lax.fori_loop(start // tm, (end + tm - 1) // tm, step, jnp.zeros((tk, tn), jnp.float32))
        plt.store(out_ref.at[group, pl.ds(k_i * tk, tk), pl.ds(n_i * tn, tn)], acc.astype(out_ref.dtype),
                  mask=k_ok[:, None] & col_ok[None, :])

    return pl.pallas_call(
        kernel,
        out_shape=out_struct((num_local, k, n), lhs.dtype, lhs),
        name="ragged_matmul_tgmm",
        grid=(pl.cdiv(k, tk), pl.cdiv(n, tn), num_local),
        compiler_params=plt.CompilerParams(**COMPILER_PARAMS),
        interpret=interpret,
    )(tiles.starts, tiles.ends, lhs, dy)
