"""Grouped (ragged) matmul: lhs[m, k] @ rhs[g, k, n], row block i of lhs using rhs[i] by group_sizes.

`ragged_matmul` is the dispatch; `tpu.py` (Mosaic) and `gpu.py` (Triton) hold the kernels,
`reference.py` the XLA reference (`jax.lax.ragged_dot`).
"""

from pallas_kernels.ragged_matmul.api import IMPLEMENTATIONS, kernel_ragged_matmul, ragged_matmul
from pallas_kernels.ragged_matmul.reference import ragged_matmul_reference

__all__ = ["IMPLEMENTATIONS", "kernel_ragged_matmul", "ragged_matmul", "ragged_matmul_reference"]
