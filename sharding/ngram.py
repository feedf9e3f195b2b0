"""N-gram table sharding: the flat table's rows split over devices, one gather for train and decode.

The table [R, D/S] has its rows split over the mesh axes A that `sharding.rules` gives the logical
axis "ngram_rows" (every axis whose sizes divide R) and is replicated over the others. Each device
holds rows [a * R/|A|, (a+1) * R/|A|). A lookup of the tokens this device owns:

    ids of the |A| devices that share my table-replica group   all_gather over A   int32[|A| T, S]
    rows I own, zeros elsewhere                                masked local gather [|A| T, S, w]
    sum over the group, each device keeping its own tokens     psum_scatter over A [T, S, w]

Every row has exactly one owner, so the sum adds zeros to the one real row (exact in any dtype).
The backward pass is JAX's transpose of the same ops: all_gather of the cotangents, masked
scatter-add into the local rows. Why this and not an id all-to-all: see the README's Sharding
section (measured with `python -m sharding.bench_ngram`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from sharding.mesh import batch_axes
from sharding.rules import logical_to_spec


def table_row_axes(mesh, table_shape: tuple[int, ...]) -> tuple[str, ...]:
    entry = logical_to_spec(("ngram_rows", None), tuple(table_shape), mesh)[0]
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def gather_rows(table: jax.Array, rows: jax.Array, mesh) -> jax.Array:
    """table [R, w], int32 rows [..., S] (flat row ids; leading dims split over every mesh axis)
    -> [..., S, w] = table[rows], with the table's rows split over the devices."""
    row_axes = table_row_axes(mesh, table.shape)
    if not row_axes:
        return jnp.take(table, rows, axis=0)
    axes = batch_axes(mesh)
    devices = math.prod(mesh.shape[a] for a in axes)
    flat = rows.reshape(-1, rows.shape[-1])
    if flat.shape[0] % devices:
        raise ValueError(f"{flat.shape[0]} tokens cannot be split evenly over the {devices} devices of mesh "
                         f"{dict(mesh.shape)}; make the batch a multiple of {devices}")
    local_rows = table.shape[0] // math.prod(mesh.shape[a] for a in row_axes)

    def local(table_part: jax.Array, ids: jax.Array) -> jax.Array:  # [R/|A|, w], [T, S] -> [T, S, w]
        group_ids = jax.lax.all_gather(ids, row_axes, axis=0, tiled=True)  # [|A| T, S]
        mine = group_ids - jax.lax.axis_index(row_axes) * local_rows
        owned = (mine >= 0) & (mine < local_rows)
        got = jnp.take(table_part, jnp.clip(mine, 0, local_rows - 1), axis=0)
        got = jnp.where(owned[..., None], got, jnp.zeros((), got.dtype))
        return jax.lax.psum_scatter(got, row_axes, scatter_dimension=0, tiled=True)

    out = jax.shard_map(local, mesh=mesh, in_specs=(P(row_axes, None), P(axes, None)),
                        out_specs=P(axes, None, None))(table, flat)
    return out.reshape(rows.shape + table.shape[1:])
