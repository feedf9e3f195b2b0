"""The N-gram gather dispatch: keys (token windows or local ids) + the flat table -> the rows."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import backend as backends
from pallas_kernels import interpret
from pallas_kernels.ngram_gather import gpu, tpu
from pallas_kernels.ngram_gather.reference import gather_with_vjp, ngram_gather_reference
from pallas_kernels.ngram_gather.rows import RowSpec


def ngram_gather(table: jax.Array, spec: RowSpec, *, windows: jax.Array | None = None,
                 ids: jax.Array | None = None, row_start: jax.Array | int | None = None,
                 implementation: str = "auto") -> jax.Array:
    """The rows of the flat N-gram table [R, w] (R >= spec.total_rows; later rows: padding) described by `spec` for every token -> [..., S, w].

    Give exactly one of windows int32[..., N] (`lite.ngram.ngram_windows`: the kernel computes the
    32-bit hash, the fused path) or ids int32[..., S] (`lite.ngram.ngram_ids`, local to each
    sub-table). Differentiable in the table (deterministic scatter-add).

    row_start: `table` is one device's shard of the flat table, its rows row_start .. row_start +
    len(table) - 1 (sharding.ngram); rows it does not hold come out as zeros (and get no gradient).
    """
    choice = backends.choose("ngram_gather", implementation)
    if (windows is None) == (ids is None):
        raise ValueError("ngram_gather takes exactly one of windows= (int32[..., N]) or ids= (int32[..., S])")
    key_kind, keys = ("windows", windows) if windows is not None else ("ids", ids)
    num_keys = spec.num_keys(key_kind)
    whole = row_start is None
    # A whole table may end in padding rows (the model pads it to a multiple every mesh divides):
    # the hash never reaches rows past spec.total_rows.
    if table.ndim != 2 or (whole and table.shape[0] < spec.total_rows):
        expected = f"[at least {spec.total_rows}, w]" if whole else "[rows, w] (a shard)"
        raise ValueError(f"ngram_gather: table must be {expected} for {spec.num_tables} sub-tables of "
                         f"{spec.table_sizes} rows, got {table.shape}")
    if keys.shape[-1:] != (num_keys,) or not jnp.issubdtype(keys.dtype, jnp.integer):
        raise ValueError(f"ngram_gather: {key_kind} must be integers [..., {num_keys}], got {keys.dtype}{keys.shape}")
    lead = keys.shape[:-1]
    flat = keys.reshape(-1, num_keys).astype(jnp.int32)
    if choice == "tpu" and implementation == "auto" and tpu.unsupported(table) is not None:
        choice = "xla"  # see tpu.py: 32-bit and bf16 tables (bf16 with an even row count)
    start = 0 if whole else row_start
    if choice == "xla":
        out = ngram_gather_reference(table, flat, start, spec, key_kind)
    else:
        out = kernel_ngram_gather(table, flat, spec, key_kind, backend=choice, row_start=start)
    return out.reshape(*lead, spec.num_tables, table.shape[-1])


def kernel_ngram_gather(table, keys, spec: RowSpec, key_kind: str, *, backend: str, row_start=0,
                        block_tokens=None):
    """The Pallas kernel of `backend` ("tpu", "gpu", "interpret", "gpu-interpret", or a
    `pltpu.InterpretParams` for the TPU simulator) on flat keys int32[T, C] of `key_kind`
    ("windows" or "ids"), with the shared VJP (reference.gather_with_vjp, which also types the
    operands for a shard_map)."""
    module, interpret_mode = {"tpu": (tpu, False), "gpu": (gpu, False), "interpret": (tpu, True),
                              "gpu-interpret": (gpu, True)}.get(backend, (tpu, backend))
    if interpret_mode is not False:
        interpret.enable()
    options = {} if block_tokens is None else {"block_tokens": block_tokens}

    def forward(table, keys, row_start, spec, key_kind):
        return module.gather(table, keys, row_start, spec, key_kind, interpret=interpret_mode, **options)

    return gather_with_vjp(forward)(table, keys, row_start, spec, key_kind)
