"""XLA reference for the N-gram gather, and the VJP every implementation shares.

Forward: flat rows from the keys (`RowSpec.flat_rows`: the hash for windows, ids + sub-table offsets
for ids), then `jnp.take` from the table or from one device's shard of it (rows it does not hold are
zeros, so the shards' results sum to the whole table's). Backward: the table gradient is a
deterministic scatter-add of the row gradients (sort by row, segmented sum in a fixed tree order,
one write per distinct row), so repeated runs give bit-identical gradients on every backend.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.backend import same_varying_axes
from pallas_kernels.ngram_gather.rows import RowSpec


def scatter_add_rows(rows: jax.Array, grads: jax.Array, num_rows: int) -> jax.Array:
    """rows int32[P], grads [P, w] -> float32[num_rows, w], out[r] = sum of grads[p] with rows[p] == r.

    Deterministic: the sum of each run of equal rows is formed by a segmented associative scan (a
    fixed order), and each distinct row is written once.
    """
    order = jnp.argsort(rows, stable=True)
    sorted_rows = rows[order]
    values = grads[order].astype(jnp.float32)
    new_run = jnp.concatenate([jnp.ones((1,), bool), sorted_rows[1:] != sorted_rows[:-1]])

    def combine(left, right):
        left_start, left_sum = left
        right_start, right_sum = right
        return left_start | right_start, jnp.where(right_start[:, None], right_sum, left_sum + right_sum)

    _, run_sums = jax.lax.associative_scan(combine, (new_run, values))
    run_end = jnp.concatenate([sorted_rows[1:] != sorted_rows[:-1], jnp.ones((1,), bool)])
    target = jnp.where(run_end, sorted_rows, num_rows)  # num_rows: out of range, dropped
    return jnp.zeros((num_rows, grads.shape[-1]), jnp.float32).at[target].set(run_sums, mode="drop")


def local_rows(keys: jax.Array, spec: RowSpec, key_kind: str, row_start: jax.Array,
               num_rows: int) -> tuple[jax.Array, jax.Array]:
    """Rows of a table shard holding flat rows row_start .. row_start + num_rows - 1:
    (int32[..., S] row within the shard, bool[..., S] whether the shard holds it)."""
    rows = spec.flat_rows(keys, key_kind) - row_start
    return rows, (rows >= 0) & (rows < num_rows)


def gather_with_vjp(forward):
    """forward(table [R, w], keys int32[T, C], row_start int32[], spec, key_kind) -> [T, S, w], wrapped
    with the deterministic table VJP.

    The table may be one device's shard of the flat table, holding its rows row_start ..
    row_start + R - 1 (row_start = 0 and R = all rows for the whole table); keys whose row lies
    outside give zero rows and no gradient. The wrapped function takes the same arguments
    (row_start may be a Python int). Inside a shard_map the operands get one varying type first
    (backend.same_varying_axes), so the table gradient comes back psum-ed over the devices that
    share a table shard.
    """

    @functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
    def gather(table, keys, row_start, spec, key_kind):
        return forward(table, keys, row_start, spec, key_kind)

    def fwd(table, keys, row_start, spec, key_kind):
        residuals = (keys, row_start, jnp.zeros((table.shape[0], 0), table.dtype))
        return forward(table, keys, row_start, spec, key_kind), residuals

    def bwd(spec, key_kind, residuals, d_rows):
        keys, row_start, like = residuals  # like: [R, 0], the table's row count and dtype
        num_rows = like.shape[0]
        rows, owned = local_rows(keys, spec, key_kind, row_start, num_rows)
        rows = jnp.where(owned, rows, num_rows)  # sorts last, dropped by the scatter
        d_table = scatter_add_rows(rows.reshape(-1), d_rows.reshape(-1, d_rows.shape[-1]), num_rows)
        return d_table.astype(like.dtype), None, None

    gather.defvjp(fwd, bwd)

    def typed(table, keys, row_start, spec, key_kind):
        start = jnp.asarray(row_start, jnp.int32).reshape(())
        return gather(*same_varying_axes(table, keys, start), spec, key_kind)

    return typed


def _take(table, keys, row_start, spec, key_kind):
    rows, owned = local_rows(keys, spec, key_kind, row_start, table.shape[0])
    got = jnp.take(table, jnp.clip(rows, 0, table.shape[0] - 1), axis=0)
    return jnp.where(owned[..., None], got, jnp.zeros((), table.dtype))


ngram_gather_reference = gather_with_vjp(_take)
ngram_gather_reference.__doc__ = """(table [R, w], keys int32[T, C], row_start int32[], spec, key_kind) -> [T, S, w]
rows, via jnp.take (rows outside the table shard are zeros)."""
