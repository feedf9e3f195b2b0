"""Keys -> flat N-gram table rows, written for inside a kernel: Python-int constants, int32 only.

A key row is either a token window (`window[j] = t_{i-j}`, as `lite.ngram.ngram_windows` builds
it; the kernel hashes it) or the S local sub-table ids (`lite.ngram.ngram_ids`; the kernel only adds
the sub-table offsets). The hash is `lite.ngram.hash_windows` re-expressed for kernels: constants
from `lite.ngram.hash_coefficients` as Python ints (kernels cannot capture constant arrays), and
signed int32 arithmetic with chunks one bit narrower than lite's uint32 ones, so no intermediate
reaches 2^31 (TPU scalar units and Triton handle signed int32 best). Same residues, same ids:
tests/test_kernel_ngram_gather.py checks it against `lite.ngram.ngram_ids`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from lite.config import ModelConfig
from lite.ngram import hash_coefficients


@dataclasses.dataclass(frozen=True)
class RowSpec:
    hashed: bool  # keys are token windows [N] (True) or local sub-table ids [S] (False)
    offsets: tuple[int, ...]  # [S] first flat row of each sub-table
    moduli: tuple[int, ...]  # [S] V_s
    coefficients: tuple[tuple[int, ...], ...]  # [N][S] V0^j mod V_s (0 past the sub-table's order)
    token_bits: int  # tokens are < 2^token_bits

    @classmethod
    def from_config(cls, cfg: ModelConfig, *, hashed: bool) -> "RowSpec":
        if not cfg.has_ngram:
            raise ValueError(f"{cfg.name}: ngram_gather needs an N-gram embedding (ngram_n >= 2)")
        coefficients, moduli = hash_coefficients(cfg)
        if hashed and int(moduli.max()) >= 2 ** 30:
            raise ValueError(f"{cfg.name}: N-gram sub-tables of {int(moduli.max())} rows are too large for the "
                             "int32 in-kernel hash (< 2^30 rows each)")
        return cls(hashed, tuple(cfg.ngram_table_offsets), tuple(int(v) for v in moduli),
                   tuple(tuple(int(c) for c in row) for row in coefficients),
                   max(cfg.vocab_size - 1, 1).bit_length())

    @property
    def num_keys(self) -> int:
        return len(self.coefficients) if self.hashed else len(self.moduli)

    @property
    def num_rows(self) -> int:
        return len(self.moduli)

    def rows(self, key: Callable[[int], jax.Array]) -> list[jax.Array]:
        """key(c) -> int32 scalar or vector (column c of the keys) => S int32 flat rows, same shape."""
        if not self.hashed:
            return [key(s) + self.offsets[s] for s in range(self.num_rows)]
        out = []
        for s, modulus in enumerate(self.moduli):
            h = None
            for j, row in enumerate(self.coefficients):
                if row[s]:
                    term = _mulmod(key(j), row[s], modulus, self.token_bits)
                    h = term if h is None else jax.lax.rem(h + term, jnp.int32(modulus))
            out.append(h + self.offsets[s])
        return out


def _mulmod(a: jax.Array, b: int, modulus: int, a_bits: int) -> jax.Array:
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
