"""N-gram table sharding: the flat table's rows split over devices, one gather for train and decode.

The table [R, D/S] has its rows split over the mesh axes A that `sharding.rules` gives the logical
axis "ngram_rows" (every axis whose sizes divide R) and is replicated over the others. Each device
holds rows [a * R/|A|, (a+1) * R/|A|). A lookup of the tokens this device owns:

    keys of the |A| devices that share my table-replica group  all_gather over A   int32[|A| T, N]
    rows I own, zeros elsewhere                                 the gather kernel  [|A| T, S, w]
    sum over the group, each device keeping its own tokens      psum_scatter over A [T, S, w]

The keys are token windows: the kernel (`pallas_kernels.ngram_gather`, XLA where it has no kernel)
hashes them into flat rows, so the hash is fused at scale too and the exchange moves N keys per
token instead of S row ids. Every row has exactly one owner, so the sum adds zeros to the one real
row (exact in any dtype). The backward pass transposes the same ops: all_gather of the cotangents,
the gather's deterministic scatter-add into the local rows. Why this and not an id all-to-all: see
the README's Sharding section (measured with `python benchmarks/ngram_sharding.py`).
"""

from __future__ import annotations

import math

import jax
from jax.sharding import PartitionSpec as P

from pallas_kernels.ngram_gather import RowSpec, ngram_gather
from sharding.mesh import batch_axes
from sharding.rules import logical_to_spec


def table_row_axes(mesh, table_shape: tuple[int, ...]) -> tuple[str, ...]:
    entry = logical_to_spec(("ngram_rows", None), tuple(table_shape), mesh)[0]
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def gather_rows(table: jax.Array, spec: RowSpec, mesh, *, windows: jax.Array | None = None,
                ids: jax.Array | None = None) -> jax.Array:
    """table [R, w] with its rows split over the mesh, keys int32[..., N] windows or int32[..., S]
    local ids (leading dims split over every mesh axis) -> [..., S, w], as `ngram_gather`."""
    keys = windows if windows is not None else ids
    if keys is None:
        raise ValueError("gather_rows takes windows= or ids=")
    row_axes = table_row_axes(mesh, table.shape)
    axes = batch_axes(mesh)
    devices = math.prod(mesh.shape[a] for a in axes)
    flat = keys.reshape(-1, keys.shape[-1])
    if flat.shape[0] % devices:
        raise ValueError(f"{flat.shape[0]} tokens cannot be split evenly over the {devices} devices of mesh "
                         f"{dict(mesh.shape)}; make the batch a multiple of {devices}")
    key_name = "windows" if windows is not None else "ids"
    local_rows = table.shape[0] // math.prod(mesh.shape[a] for a in row_axes)

    def local(table_part: jax.Array, keys: jax.Array) -> jax.Array:  # [R/|A|, w], [T, C] -> [T, S, w]
        if not row_axes:  # a replicated table: every row is here
            return ngram_gather(table_part, spec, **{key_name: keys})
        group_keys = jax.lax.all_gather(keys, row_axes, axis=0, tiled=True)  # [|A| T, C]
        row_start = jax.lax.axis_index(row_axes) * local_rows
        got = ngram_gather(table_part, spec, row_start=row_start,
                           **{key_name: group_keys})
        return jax.lax.psum_scatter(got, row_axes, scatter_dimension=0, tiled=True)

    # A kernel cannot be partitioned by XLA: even a replicated table is gathered inside the shard_map.
    out = jax.shard_map(local, mesh=mesh, in_specs=(P(row_axes or None, None), P(axes, None)),
                        out_specs=P(axes, None, None))(table, flat)
    return out.reshape(keys.shape[:-1] + out.shape[1:])
