"""N-gram gather for TPU (Mosaic): table left in HBM, rows DMA'd into a double-buffered VMEM block.

32-bit tables only: Mosaic cannot DMA a single row into a packed (16-bit) VMEM tile, so the dispatch
uses XLA for 16-bit tables on TPU.

Grid: one step per block of `block_tokens` tokens, run in order. Step i holds the keys of blocks i
and i+1 in SMEM, computes the flat rows on the scalar unit (rows.RowSpec), starts the row DMAs of
block i+1 into the other VMEM slot, waits for block i's (started one step earlier) and hands the
slot to the pipelined output block. The table is never copied whole (`memory_space=pl.ANY`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.ngram_gather.rows import RowSpec

DEFAULT_BLOCK_TOKENS = 64


@functools.partial(jax.jit, static_argnames=("spec", "block_tokens", "interpret"))
def gather(table: jax.Array, keys: jax.Array, spec: RowSpec, *, block_tokens: int = DEFAULT_BLOCK_TOKENS,
           interpret=False) -> jax.Array:
    """table [R, w], keys int32[T, C] -> [T, S, w] table rows."""
    num_tokens, columns = keys.shape
    num_sub, width = spec.num_rows, table.shape[1]
    if table.dtype.itemsize != 4:
        raise ValueError(f"the TPU N-gram gather copies single table rows, which Mosaic allows for 32-bit "
                         f"tables only; got {table.dtype} (use implementation='xla')")
    if block_tokens & (block_tokens - 1):
        raise ValueError(f"block_tokens must be a power of two, got {block_tokens}")
    # SMEM blocks of keys: 1-D, a power of two and at least 128 words (Mosaic's rule).
    num_keys = 1 << (columns - 1).bit_length()
    bt = max(block_tokens, 128 // num_keys)
    num_blocks = -(-num_tokens // bt)
    padded = num_blocks * bt  # padding keys are zeros: valid rows, output dropped
    flat_keys = jnp.pad(keys.astype(jnp.int32), ((0, padded - num_tokens), (0, num_keys - columns))).reshape(-1)

    def kernel(keys_now, keys_next, table_hbm, out_ref, buffer, sems):
        i = pl.program_id(0)
        slot = i % 2

        # Copies to start: block i into slot 0 (first step only), then block i + 1 into the other slot
        # (all but the last step). One loop body for both keeps the kernel (and its compile time) small.
        @pl.loop(jnp.where(i == 0, 0, 1), jnp.where(i + 1 < num_blocks, 2, 1))
        def _(ahead):
            to_slot = jnp.where(ahead == 0, 0, 1 - slot)

            @pl.loop(0, bt)
            def _(t):
                def key(c):
                    return jnp.where(ahead == 0, keys_now[t * num_keys + c], keys_next[t * num_keys + c])

                for s, row in enumerate(spec.rows(key)):
                    pltpu.make_async_copy(table_hbm.at[pl.ds(row, 1)], buffer.at[to_slot, t, pl.ds(s, 1)],
                                          sems.at[to_slot]).start()

        @pl.loop(0, bt * num_sub)
        def _(_):  # every copy of a slot has the same size: wait for them one by one
            pltpu.make_async_copy(table_hbm.at[pl.ds(0, 1)], buffer.at[slot, 0, pl.ds(0, 1)], sems.at[slot]).wait()

        out_ref[...] = buffer[slot]

    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((padded, num_sub, width), table.dtype),
        grid=(num_blocks,),
        in_specs=[
            pl.BlockSpec((bt * num_keys,), lambda i: (i,), memory_space=pltpu.SMEM),
            pl.BlockSpec((bt * num_keys,), lambda i: (jnp.minimum(i + 1, num_blocks - 1),), memory_space=pltpu.SMEM),
            pl.BlockSpec(memory_space=pl.ANY),
        ],
        out_specs=pl.BlockSpec((bt, num_sub, width), lambda i: (i, 0, 0)),
        scratch_shapes=[pltpu.VMEM((2, bt, num_sub, width), table.dtype), pltpu.SemaphoreType.DMA((2,))],
        # In order: step i waits for the copies step i - 1 started.
        compiler_params=pltpu.CompilerParams(dimension_semantics=("arbitrary",)),
        cost_estimate=pl.CostEstimate(flops=0, transcendentals=0,
                                      bytes_accessed=2 * padded * num_sub * width * table.itemsize),
        interpret=interpret,
    )(flat_keys, flat_keys, table)
    return out[:num_tokens]
