"""N-gram gather for TPU (Mosaic): table left in HBM, rows DMA'd into a double-buffered VMEM block.

Grid: one step per block of `block_tokens` tokens, run in order. Step i holds the keys of blocks i
and i+1 in SMEM, computes the flat rows on the scalar unit (RowSpec.kernel_rows), starts the row DMAs of
block i+1 into the other VMEM slot, waits for block i's (started one step earlier) and hands the
slot to the pipelined output block. The table is never copied whole (`memory_space=pl.ANY`).
The table may be one device's shard (rows row_start .., sharding.ngram): a row it does not hold
starts no copy and is zeroed in the slot instead; each slot counts the copies it waits for.

32-bit tables: one DMA per row. bf16 tables: TPU memory packs 16-bit values in pairs of rows (one
32-bit word holds rows 2k and 2k+1 of a column, the low and the high half as `pltpu.bitcast` views
them), and Mosaic slices packed memory only at even rows and in whole pairs ("Offsets / Slice sizes
along tiled dimensions must be aligned to tiles" otherwise), so one row cannot be copied alone,
whatever the VMEM destination looks like. Each lookup copies its aligned row pair instead (into a
[2S, w] bf16 slot) and records 16 * (row % 2) in a VMEM block of shifts; once the block has landed,
the slot is viewed as 32-bit words (`pltpu.bitcast`, [S, w]), and each word is shifted right by its
row's shift and cut to its low 16 bits. Cost: twice the table bytes read per lookup (1 KiB instead
of 512 B for a 256-wide row), one extra vector store per lookup (the shift) and a few vector ops
per output element; no copy of the table (the AOT compile's memory analysis shows no table-sized
temporary). Viewing the table as uint32 outside the kernel instead (row pairs or column pairs per
word) makes XLA relayout the whole table in HBM on every call: 256 / 512 MiB of temporaries for a
64 MiB table on v5e.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.backend import out_struct
from pallas_kernels.ngram_gather.rows import RowSpec

DEFAULT_BLOCK_TOKENS = 64


def unsupported(table: jax.Array) -> str | None:
    """Why this kernel cannot gather from `table`, or None when it can."""
    if table.dtype.itemsize == 4:
        return None
    if table.dtype == jnp.bfloat16:
        return None if table.shape[0] % 2 == 0 else "bf16 tables need an even number of rows (row pairs)"
    return f"{table.dtype} tables are not supported (32-bit and bfloat16 are)"


@functools.partial(jax.jit, static_argnames=("spec", "key_kind", "block_tokens", "interpret"))
def gather(table: jax.Array, keys: jax.Array, row_start: jax.Array, spec: RowSpec, key_kind: str, *,
           block_tokens: int = DEFAULT_BLOCK_TOKENS, interpret=False) -> jax.Array:
    """table [R, w] (flat rows row_start .. row_start + R - 1), keys int32[T, C] -> [T, S, w] table
    rows, zeros for the rows the table does not hold."""
    num_tokens, columns = keys.shape
    num_rows, (num_sub, width) = table.shape[0], (spec.num_tables, table.shape[1])
    if (reason := unsupported(table)) is not None:
        raise ValueError(f"TPU N-gram gather: {reason}; use implementation='xla'")
    if block_tokens & (block_tokens - 1):
        raise ValueError(f"block_tokens must be a power of two, got {block_tokens}")
    pack = 4 // table.dtype.itemsize  # rows per 32-bit word: 1 or 2 (bf16)
    # SMEM blocks of keys: 1-D, a power of two and at least 128 words (Mosaic's rule).
    num_keys = 1 << (columns - 1).bit_length()
    bt = max(block_tokens, 128 // num_keys)
    num_blocks = -(-num_tokens // bt)
    padded = num_blocks * bt  # padding keys are zeros: valid rows, output dropped
    flat_keys = jnp.pad(keys.astype(jnp.int32), ((0, padded - num_tokens), (0, num_keys - columns))).reshape(-1)

    def kernel(row_start, keys_now, keys_next, table_hbm, out_ref, buffer, shifts, sems, issued):
        i = pl.program_id(0)
        slot = i % 2

        @pl.when(i == 0)
        def _():
            issued[0] = 0
            issued[1] = 0

        # Copies to start: block i into slot 0 (first step only), then block i + 1 into the other slot
        # (all but the last step). One loop body for both keeps the kernel (and its compile time) small.
        @pl.loop(jnp.where(i == 0, 0, 1), jnp.where(i + 1 < num_blocks, 2, 1))
        def _(ahead):
            to_slot = jnp.where(ahead == 0, 0, 1 - slot)

            @pl.loop(0, bt)
            def _(t):
                def key(c):
                    return jnp.where(ahead == 0, keys_now[t * num_keys + c], keys_next[t * num_keys + c])

                for s, flat_row in enumerate(spec.kernel_rows(key, key_kind)):
                    row = flat_row - row_start[0]
                    owned = (row >= 0) & (row < num_rows)

                    @pl.when(owned)
                    def _():
                        if pack == 1:
                            first = row
                        else:  # the aligned pair holding the row, and where the row sits in its words
                            first = pl.multiple_of(row & -2, 2)
                            shifts[to_slot, t, pl.ds(s, 1), :] = jnp.full((1, width), 16 * (row & 1), jnp.int32)
                        pltpu.make_async_copy(table_hbm.at[pl.ds(first, pack)],
                                              buffer.at[to_slot, t, pl.ds(pack * s, pack)], sems.at[to_slot]).start()
                        issued[to_slot] += 1

                    @pl.when(~owned)  # a row of another device's shard (sharding.ngram): zeros
                    def _():
                        buffer[to_slot, t, pl.ds(pack * s, pack)] = jnp.zeros((pack, width), table.dtype)
                        if pack > 1:
                            shifts[to_slot, t, pl.ds(s, 1), :] = jnp.zeros((1, width), jnp.int32)

        @pl.loop(0, issued[slot])
        def _(_):  # every copy of a slot has the same size: wait for them one by one
            pltpu.make_async_copy(table_hbm.at[pl.ds(0, pack)], buffer.at[slot, 0, pl.ds(0, pack)], sems.at[slot]).wait()

        issued[slot] = 0

        if pack == 1:
            out_ref[...] = buffer[slot]
        else:
            words = pltpu.bitcast(buffer[slot], jnp.uint32)  # [bt, S, w]: one word per column of a row pair
            bits = (words >> shifts[slot].astype(jnp.uint32)) & 0xFFFF
            out_ref[...] = jax.lax.bitcast_convert_type(bits.astype(jnp.uint16), table.dtype)

    out = pl.pallas_call(
        kernel,
        out_shape=out_struct((padded, num_sub, width), table.dtype, table),
        name="ngram_gather",
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,  # row_start
            grid=(num_blocks,),
            in_specs=[
                pl.BlockSpec((bt * num_keys,), lambda i, _: (i,), memory_space=pltpu.SMEM),
                pl.BlockSpec((bt * num_keys,), lambda i, _: (jnp.minimum(i + 1, num_blocks - 1),),
                             memory_space=pltpu.SMEM),
                pl.BlockSpec(memory_space=pl.ANY),
            ],
            out_specs=pl.BlockSpec((bt, num_sub, width), lambda i, _: (i, 0, 0)),
            scratch_shapes=[pltpu.VMEM((2, bt, pack * num_sub, width), table.dtype),
                            pltpu.VMEM((2, bt, num_sub, width) if pack > 1 else (1, 1, 1, 128), jnp.int32),  # shifts
                            pltpu.SemaphoreType.DMA((2,)),
                            pltpu.SMEM((2,), jnp.int32)],  # copies started into each slot
        ),
        # In order: step i waits for the copies step i - 1 started.
        compiler_params=pltpu.CompilerParams(dimension_semantics=("arbitrary",)),
        cost_estimate=pl.CostEstimate(flops=0, transcendentals=0,
                                      bytes_accessed=(pack + 1) * padded * num_sub * width * table.itemsize),
        interpret=interpret,
    )(row_start.astype(jnp.int32).reshape(1), flat_keys, flat_keys, table)
    return out[:num_tokens]
