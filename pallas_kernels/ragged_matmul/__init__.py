"""Grouped (ragged) matmul: lhs[m, k] @ rhs[g, k, n], row block i of lhs using rhs[i] by group_sizes."""

from pallas_kernels.ragged_matmul.api import IMPLEMENTATIONS, ragged_matmul
from pallas_kernels.ragged_matmul.reference import ragged_matmul_reference

__all__ = ["IMPLEMENTATIONS", "ragged_matmul", "ragged_matmul_reference"]
