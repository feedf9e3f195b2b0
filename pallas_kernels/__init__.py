"""Pallas kernels for the N-gram gather and the grouped expert matmul, each beside its XLA reference."""
