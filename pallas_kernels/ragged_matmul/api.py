"""The one entry point the model calls; implementations are chosen here, never in the model."""

from __future__ import annotations

import jax

from pallas_kernels.ragged_matmul.reference import ragged_matmul_reference

IMPLEMENTATIONS = ("auto", "xla")


def ragged_matmul(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *,
                  implementation: str = "auto") -> jax.Array:
    """lhs [m, k] @ rhs[g, k, n] grouped by int32 group_sizes [g] -> [m, n] (see the reference)."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown ragged_matmul implementation {implementation!r}; valid: {IMPLEMENTATIONS}")
    if lhs.ndim != 2 or rhs.ndim != 3 or group_sizes.shape != rhs.shape[:1] or lhs.shape[1] != rhs.shape[1]:
        raise ValueError(f"ragged_matmul expects lhs [m, k], rhs [g, k, n], group_sizes [g]; got lhs "
                         f"{lhs.shape}, rhs {rhs.shape}, group_sizes {group_sizes.shape}")
    return ragged_matmul_reference(lhs, rhs, group_sizes)
