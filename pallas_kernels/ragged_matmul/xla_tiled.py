"""The grouped matmul in plain XLA, tiled: what `auto` runs where Pallas cannot (CPU).

XLA:CPU lowers `jax.lax.ragged_dot` to a dense masked product: every row is multiplied by every
group's weights, g times the work. Here each group's sorted rows are cut into chunks of `tile_rows`
starting at the group's first row, and a `fori_loop` runs over the chunks ("visits"): each visit
multiplies one chunk by its group's weights and writes the rows of its group. The loop's trip count
is the number of chunks the groups really need, so rows past the groups (zero-expert slots) cost
nothing, neither the weights nor the rows are gathered per visit, and no row is multiplied twice: the
kernels' schedule (metadata.group_tiles, tiles aligned to tile_rows) visits a tile two groups share
once for each (demo step: 20 chunks instead of 23 visits, 1.04x the step). Work: at most (m + g * tile_rows) * k * n, against g * m * k * n. With `layer`,
each visit reads its group's weights straight out of the layer stack (the free [L * g, k, n] view),
so rhs is never copied or sliced whole.

A while loop has no reverse-mode derivative, so the op carries its own VJP, the kernels' one:
d lhs is the same loop with the weights transposed, d rhs a loop adding x_chunk^T dy_chunk into its
group's slot.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels.backend import same_varying_axes
from pallas_kernels.ragged_matmul.metadata import group_rows, stacked_groups

DEFAULT_TILE_ROWS = 256  # demo training step on 2 CPU cores: 128 / 256 / 512 rows took 1.02 / 1.0 / 1.10x the time


def tiled_ragged_matmul(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array,
                        group_offset: jax.Array | int | None = None, *, layer: int | None = None,
                        tile_rows: int = DEFAULT_TILE_ROWS) -> jax.Array:
    """Same contract as `ragged_matmul_reference`: lhs [m, k], rhs [g, k, n] (or [L, g, k, n] with
    layer), group_sizes [G] -> [m, n]."""
    num_local, first, flat = stacked_groups(rhs, layer)  # flat [L * g, k, n]: group j is flat[first + j]
    offset = jnp.asarray(0 if group_offset is None else group_offset, jnp.int32)
    tm = max(8, min(tile_rows, -(-lhs.shape[0] // 8) * 8))
    # Inside a shard_map: one varying type for all (the loop carries must match it), and the
    # transpose of replicated weights cast to varying is the psum their gradient needs.
    return _tiled(*same_varying_axes(lhs, flat, group_sizes.astype(jnp.int32), offset), tm, first, num_local)


class GroupChunks(NamedTuple):
    group_ids: jax.Array  # int32[max visits]: local group of each visit
    row_starts: jax.Array  # int32[max visits]: first row of each visit's chunk
    num_visits: jax.Array  # int32[]
    ends: jax.Array  # int32[num_local]: one past the last row of each local group


def _schedule(group_sizes: jax.Array, group_offset: jax.Array, num_local: int, m: int, tm: int) -> GroupChunks:
    """The chunks of the local groups group_offset .. group_offset + num_local - 1 of group_sizes [G],
    in row order: group j's rows [start_j, end_j) as chunks starting at start_j, start_j + tm, ..."""
    starts, ends = group_rows(group_sizes, group_offset, num_local, m)
    count = -(-(ends - starts) // tm)  # chunks per group, none for an empty one
    cum = jnp.cumsum(count)
    visit = jnp.arange(m // tm + num_local, dtype=jnp.int32)  # sum of ceil(size / tm) <= m / tm + num_local
    group = jnp.minimum(jnp.searchsorted(cum, visit, side="right"), num_local - 1).astype(jnp.int32)
    return GroupChunks(group, starts[group] + (visit - (cum - count)[group]) * tm, cum[-1], ends)


def _padded(x: jax.Array, tm: int) -> jax.Array:
    """tm rows more, so that a chunk starting at any row < m lies inside (dynamic_slice would move it)."""
    return jnp.pad(x, ((0, tm), (0, 0)))


def _visit_rows(chunks: GroupChunks, visit: jax.Array, tm: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """-> (local group, first row of the chunk, bool[tm]: which of the chunk's rows belong to the group)."""
    group, start = chunks.group_ids[visit], chunks.row_starts[visit]
    return group, start, jnp.arange(tm, dtype=jnp.int32) < chunks.ends[group] - start


def _grouped(lhs: jax.Array, rhs: jax.Array, chunks: GroupChunks, tm: int, first: int, *,
             transpose_rhs: bool) -> jax.Array:
    """lhs [m, k] @ rhs[first + group] (rhs [G', k, n], or [G', n, k] used transposed) -> float32 [m, n]."""
    m = lhs.shape[0]
    x = _padded(lhs, tm)
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    contract = (((1,), (1,)), ((), ())) if transpose_rhs else (((1,), (0,)), ((), ()))

    def visit(i, out):
        group, start, mine = _visit_rows(chunks, i, tm)
        weights = rhs[first + group].astype(lhs.dtype)  # rounded to the rows' dtype as it is read
        product = jax.lax.dot_general(jax.lax.dynamic_slice_in_dim(x, start, tm), weights, contract,
                                      preferred_element_type=jnp.float32)  # [tm, n]
        # The chunk's last rows may be the next group's: they keep what they hold (zeros, or that group's).
        written = jnp.where(mine[:, None], product, jax.lax.dynamic_slice_in_dim(out, start, tm))
        return jax.lax.dynamic_update_slice_in_dim(out, written, start, 0)

    _, out = same_varying_axes(x, jnp.zeros((x.shape[0], n), jnp.float32))
    return jax.lax.fori_loop(0, chunks.num_visits, visit, out)[:m]


def _grouped_transposed(lhs: jax.Array, dy: jax.Array, chunks: GroupChunks, num_local: int, tm: int) -> jax.Array:
    """Per local group, lhs_rows^T @ dy_rows: lhs [m, k], dy [m, n] -> float32 [num_local, k, n]."""
    x, d = _padded(lhs, tm), _padded(dy, tm)

    def visit(i, acc):
        group, start, mine = _visit_rows(chunks, i, tm)
        rows = jnp.where(mine[:, None], jax.lax.dynamic_slice_in_dim(x, start, tm), 0)
        product = jax.lax.dot_general(rows, jax.lax.dynamic_slice_in_dim(d, start, tm), (((0,), (0,)), ((), ())),
                                      preferred_element_type=jnp.float32)  # [k, n]
        return acc.at[group].add(product)

    _, acc = same_varying_axes(x, jnp.zeros((num_local, lhs.shape[1], dy.shape[1]), jnp.float32))
    return jax.lax.fori_loop(0, chunks.num_visits, visit, acc)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _tiled(lhs, rhs, group_sizes, group_offset, tm, first, num_local):
    chunks = _schedule(group_sizes, group_offset, num_local, lhs.shape[0], tm)
    return _grouped(lhs, rhs, chunks, tm, first, transpose_rhs=False).astype(lhs.dtype)


def _tiled_forward(lhs, rhs, group_sizes, group_offset, tm, first, num_local):
    return _tiled(lhs, rhs, group_sizes, group_offset, tm, first, num_local), (lhs, rhs, group_sizes, group_offset)


def _tiled_backward(tm, first, num_local, residuals, d_out):
    lhs, rhs, group_sizes, group_offset = residuals
    chunks = _schedule(group_sizes, group_offset, num_local, lhs.shape[0], tm)
    d_out = d_out.astype(lhs.dtype)
    d_lhs = _grouped(d_out, rhs, chunks, tm, first, transpose_rhs=True).astype(lhs.dtype)
    d_groups = _grouped_transposed(lhs, d_out, chunks, num_local, tm).astype(rhs.dtype)  # [num_local, k, n]
    d_rhs = d_groups if num_local == rhs.shape[0] else jax.lax.dynamic_update_slice_in_dim(
        jnp.zeros_like(rhs), d_groups, first, 0)  # a layer of the stack: the other layers get zeros
    return d_lhs, d_rhs, None, None


_tiled.defvjp(_tiled_forward, _tiled_backward)
