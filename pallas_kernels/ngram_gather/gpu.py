"""N-gram gather for GPUs (Pallas Triton lowering): one program per block of tokens.

A program loads its tokens' keys, computes the S flat rows for all of them at once (vector int32,
RowSpec.kernel_rows) and gathers each sub-table's rows with one masked gather-load, storing them into the
[T, S * w] output. The table may be one device's shard (rows row_start ..): the load is masked to
the rows it holds, the others read as zeros. Triton blocks are powers of two: the width is padded
up and masked.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels.backend import out_struct
from pallas_kernels.ngram_gather.rows import RowSpec

DEFAULT_BLOCK_TOKENS = 32
COMPILER_PARAMS = dict(num_warps=4, num_stages=1)


@functools.partial(jax.jit, static_argnames=("spec", "key_kind", "block_tokens", "interpret"))
def gather(table: jax.Array, keys: jax.Array, row_start: jax.Array, spec: RowSpec, key_kind: str, *,
           block_tokens: int = DEFAULT_BLOCK_TOKENS, interpret=False) -> jax.Array:
    """table [R, w] (flat rows row_start .. row_start + R - 1), keys int32[T, C] -> [T, S, w] table
    rows, zeros for the rows the table does not hold."""
    num_tokens, num_keys = keys.shape
    num_sub, width = spec.num_tables, table.shape[1]
    bt = block_tokens
    wp = 1 << (width - 1).bit_length()
    num_rows = table.shape[0]

    def kernel(keys_ref, row_start_ref, table_ref, out_ref):
        token = pl.program_id(0) * bt + jnp.arange(bt, dtype=jnp.int32)
        token_ok = token < num_tokens
        key_columns = [plt.load(keys_ref.at[pl.ds(c * num_tokens + pl.program_id(0) * bt, bt)], mask=token_ok,
                                other=0) for c in range(num_keys)]  # keys column-major: [C * T]
        column = jnp.arange(wp, dtype=jnp.int32)
        column_ok = column < width
        start = row_start_ref[0]
        for s, row in enumerate(spec.kernel_rows(lambda c: key_columns[c], key_kind)):
            row = row - start
            owned = (row >= 0) & (row < num_rows)
            at = (jnp.clip(row, 0, num_rows - 1)[:, None], jnp.minimum(column, width - 1)[None, :])
            values = plt.load(table_ref.at[at], mask=owned[:, None] & column_ok[None, :], other=0)
            plt.store(out_ref.at[pl.ds(pl.program_id(0) * bt, bt), pl.ds(s * width, wp)], values,
                      mask=token_ok[:, None] & column_ok[None, :])

    out = pl.pallas_call(
        kernel,
        out_shape=out_struct((num_tokens, num_sub * width), table.dtype, table),
        name="ngram_gather",
        grid=(-(-num_tokens // bt),),
        compiler_params=plt.CompilerParams(**COMPILER_PARAMS),
        interpret=interpret,
    )(keys.astype(jnp.int32).T.reshape(-1), row_start.astype(jnp.int32).reshape(1), table)
    return out.reshape(num_tokens, num_sub, width)
