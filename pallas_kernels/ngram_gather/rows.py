"""The hashed N-gram table and its hash: keys -> flat rows, exact in 32-bit integers (ARCHITECTURE.md
section 2). This is the op's meaning, so it lives with the op; `lite.ngram.row_spec` builds the
spec from a model config.

    H_s(window) = ( sum_{j < order(s)} window[j] * (V0^j mod V_s) ) mod V_s      window[j] = t_{i-j}

A key row is one of two kinds (KEY_KINDS):
    "windows"  a token window int32[N] (`lite.ngram.ngram_windows`): still to be hashed;
    "ids"      the S local sub-table ids int32[S] (`lite.ngram.ngram_ids`): only the sub-table
               offsets are added.
The hash is written twice, for two machines, with the same residues: `hash_windows` in uint32 XLA
arithmetic (vectorised over all sub-tables), and `kernel_rows` for inside a kernel, with Python-int
constants (kernels cannot capture constant arrays) and signed int32 arithmetic with chunks one bit
narrower, so no intermediate reaches 2^31 (TPU scalar units and Triton handle signed int32 best).
tests/test_kernel_ngram_gather.py checks both against Python integers.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

KEY_KINDS = ("windows", "ids")


@dataclasses.dataclass(frozen=True)
class RowSpec:
    """The flat N-gram table: S sub-tables of V_s rows each, one after another."""

    vocab_size: int  # V0: tokens are < V0
    window: int  # N: a token window holds t_i .. t_{i-N+1}
    table_sizes: tuple[int, ...]  # [S] V_s
    table_orders: tuple[int, ...]  # [S] the n of each sub-table's n-grams (<= N)

    def __post_init__(self):
        if not (len(self.table_sizes) == len(self.table_orders) > 0):
            raise ValueError(f"RowSpec needs one order per sub-table, got {self.table_sizes} and {self.table_orders}")
        if max(self.table_orders) > self.window:
            raise ValueError(f"sub-table orders {self.table_orders} exceed the window of {self.window} tokens")

    @property
    def num_tables(self) -> int:
        return len(self.table_sizes)

    @property
    def offsets(self) -> tuple[int, ...]:
        """[S] first flat row of each sub-table."""
        return tuple(sum(self.table_sizes[:s]) for s in range(self.num_tables))

    @property
    def total_rows(self) -> int:
        return sum(self.table_sizes)

    @property
    def token_bits(self) -> int:
        return max(self.vocab_size - 1, 1).bit_length()

    @functools.cached_property
    def coefficients(self) -> tuple[tuple[int, ...], ...]:
        """[N][S] V0^j mod V_s for j < order(s), else 0."""
        return tuple(tuple(pow(self.vocab_size, j, size) if j < order else 0  # reduced first: no overflow
                           for size, order in zip(self.table_sizes, self.table_orders))
                     for j in range(self.window))

    def num_keys(self, key_kind: str) -> int:
        """Columns of a key row of this kind: N for windows, S for ids."""
        return {"windows": self.window, "ids": self.num_tables}[check_key_kind(key_kind)]

    # -- XLA --------------------------------------------------------------------------------

    def hash_windows(self, windows: jax.Array) -> jax.Array:
        """int32[..., N] windows -> int32[..., S] row ids, local to each sub-table."""
        coefficients = np.asarray(self.coefficients, np.uint32)  # [N, S]
        moduli = np.asarray(self.table_sizes, np.uint32)
        t = windows.astype(jnp.uint32)[..., :, None]  # [..., N, 1]
        terms = _mulmod_uint32(t, jnp.asarray(coefficients), jnp.asarray(moduli), a_bits=self.token_bits,
                               modulus_bits=int(moduli.max()).bit_length())  # [..., N, S], each < V_s
        ids = jnp.zeros(terms.shape[:-2] + terms.shape[-1:], jnp.uint32)
        for j in range(self.window):  # residues < 2^31: the sum of two cannot wrap
            ids = (ids + terms[..., j, :]) % jnp.asarray(moduli)
        return ids.astype(jnp.int32)

    def flat_rows(self, keys: jax.Array, key_kind: str) -> jax.Array:
        """int32[..., N] windows or int32[..., S] local ids -> int32[..., S] rows of the flat table."""
        ids = self.hash_windows(keys) if check_key_kind(key_kind) == "windows" else keys.astype(jnp.int32)
        return ids + jnp.asarray(self.offsets, jnp.int32)

    # -- inside a kernel --------------------------------------------------------------------

    def kernel_rows(self, key: Callable[[int], jax.Array], key_kind: str) -> list[jax.Array]:
        """key(c) -> int32 scalar or vector (column c of the keys) => S int32 flat rows, same shape."""
        if check_key_kind(key_kind) == "ids":
            return [key(s) + self.offsets[s] for s in range(self.num_tables)]
        if max(self.table_sizes) >= 2 ** 30:
            raise ValueError(f"N-gram sub-tables of {max(self.table_sizes)} rows are too large for the int32 "
                             "in-kernel hash (< 2^30 rows each)")
        out = []
        for s, modulus in enumerate(self.table_sizes):
            h = None
            for j, row in enumerate(self.coefficients):
                if row[s]:
                    term = _mulmod_int32(key(j), row[s], modulus, self.token_bits)
                    h = term if h is None else jax.lax.rem(h + term, jnp.int32(modulus))
            out.append(h + self.offsets[s])
        return out


def check_key_kind(key_kind: str) -> str:
    if key_kind not in KEY_KINDS:
        raise ValueError(f"N-gram gather keys must be one of {KEY_KINDS}, got {key_kind!r}")
    return key_kind


def _mulmod_uint32(a, b, modulus, *, a_bits: int, modulus_bits: int):
    """(a * b) mod modulus for uint32 a < 2^a_bits and b < modulus < 2^modulus_bits.

    The product reaches 2^41 at the released sizes, so it is formed by Horner's rule over chunks
    of a that are narrow enough that no intermediate leaves 32 bits:
    r < m and chunk < 2^w give r * 2^w < 2^32 and chunk * b < 2^32 when m <= 2^(32-w).
    """
    chunk_bits = 32 - modulus_bits
    chunk_mask = jnp.uint32((1 << chunk_bits) - 1)
    r = jnp.zeros(jnp.broadcast_shapes(a.shape, b.shape, modulus.shape), jnp.uint32)
    for shift in reversed(range(0, a_bits, chunk_bits)):
        chunk = (a >> jnp.uint32(shift)) & chunk_mask
        r = ((r << jnp.uint32(chunk_bits)) % modulus + (chunk * b) % modulus) % modulus
    return r


def _mulmod_int32(a: jax.Array, b: int, modulus: int, a_bits: int) -> jax.Array:
    """(a * b) mod modulus for int32 0 <= a < 2^a_bits and b < modulus < 2^30, by Horner over chunks of a.

    r < m and chunk < 2^w keep r * 2^w < 2^31 and chunk * b < 2^31 when m <= 2^(31 - w).
    """
    chunk_bits = 31 - modulus.bit_length()
    m = jnp.int32(modulus)
    r = None
    for shift in reversed(range(0, a_bits, chunk_bits)):
        chunk = jax.lax.shift_right_logical(a, jnp.int32(shift)) & jnp.int32((1 << chunk_bits) - 1)
        product = jax.lax.rem(chunk * jnp.int32(b), m)
        r = product if r is None else jax.lax.rem(jax.lax.rem(r * jnp.int32(1 << chunk_bits), m) + product, m)
    return r
