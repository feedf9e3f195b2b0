"""Which rows each group owns and which (group, row tile) pairs a grouped-matmul kernel visits;
shared by the TPU and GPU kernels and the CPU loop (xla_tiled.py).

Rows are sorted by group, so group g owns rows [start_g, end_g). A row tile that holds rows of two
groups is visited once per group, and each visit keeps only its own group's rows. Visits are ordered
by group and then by tile, so a tile's visits are consecutive (the TPU kernel keeps an output block
in VMEM across them) and there are at most tiles_m + g - 1 of them.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl


class GroupTiles(NamedTuple):
    group_ids: jax.Array  # int32[max_visits + 1]: local group of each visit; num_local past the last visit
    tile_ids: jax.Array  # int32[max_visits + 1]: row tile of each visit
    num_visits: jax.Array  # int32[]
    starts: jax.Array  # int32[num_local]: first row of each local group
    ends: jax.Array  # int32[num_local]: one past its last row


def max_visits(m: int, tm: int, num_local: int) -> int:
    return pl.cdiv(m, tm) + num_local - 1


def group_rows(group_sizes: jax.Array, group_offset: jax.Array, num_local: int, m: int) -> tuple[jax.Array, jax.Array]:
    """int32 (starts, ends) [num_local]: the rows [start, end) of the local groups group_offset ..
    group_offset + num_local - 1 of group_sizes [G], rows sorted by group; rows past m do not exist."""
    ends_all = jnp.minimum(jnp.cumsum(group_sizes.astype(jnp.int32)), m)
    starts_all = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends_all[:-1]])
    offset = jnp.asarray(group_offset, jnp.int32).reshape(())
    return (jax.lax.dynamic_slice(starts_all, (offset,), (num_local,)),
            jax.lax.dynamic_slice(ends_all, (offset,), (num_local,)))


def group_tiles(group_sizes: jax.Array, group_offset: jax.Array, num_local: int, m: int, tm: int, *,
                visit_empty: bool) -> GroupTiles:
    """Visits for the local groups group_offset .. group_offset + num_local - 1 of group_sizes [G].

    visit_empty: give an empty group one visit with no rows (the weight gradient must still write
    its zeros); otherwise empty groups are skipped.
    """
    starts, ends = group_rows(group_sizes, group_offset, num_local, m)
    tiles_m = pl.cdiv(m, tm)
    nonempty = ends > starts
    first = jnp.minimum(starts // tm, tiles_m - 1)
    last = jnp.where(nonempty, (ends - 1) // tm, first)
    count = jnp.where(nonempty, last - first + 1, int(visit_empty)).astype(jnp.int32)
    cum = jnp.cumsum(count)
    visit = jnp.arange(max_visits(m, tm, num_local) + 1, dtype=jnp.int32)
    group = jnp.searchsorted(cum, visit, side="right").astype(jnp.int32)  # [V + 1], num_local past the end
    clamped = jnp.minimum(group, num_local - 1)
    tile = first[clamped] + visit - (cum - count)[clamped]
    return GroupTiles(group, jnp.clip(tile, 0, tiles_m - 1).astype(jnp.int32), cum[-1], starts, ends)


def stacked_groups(rhs: jax.Array, layer: int | None) -> tuple[int, int, jax.Array]:
    """rhs [g, k, n], or every layer's groups stacked [L, g, k, n] with `layer` choosing one ->
    (g, the first of the layer's groups in the flat view, the flat view [L * g, k, n]). Merging the
    leading axes is a free reshape, so a kernel reads the layer's groups out of the stack in place."""
    if layer is None:
        return rhs.shape[0], 0, rhs
    if rhs.ndim != 4 or not 0 <= layer < rhs.shape[0]:
        raise ValueError(f"layer {layer} needs rhs stacked as [L, g, k, n] with layer < L, got rhs {rhs.shape}")
    return rhs.shape[1], layer * rhs.shape[1], rhs.reshape(-1, *rhs.shape[2:])


def zero_rows_outside(out: jax.Array, tiles: GroupTiles) -> jax.Array:
    """Rows outside the local groups are zeros (the kernels never write them)."""
    row = jnp.arange(out.shape[0], dtype=jnp.int32)[:, None]
    return jnp.where((row >= tiles.starts[0]) & (row < tiles.ends[-1]), out, jnp.zeros((), out.dtype))
