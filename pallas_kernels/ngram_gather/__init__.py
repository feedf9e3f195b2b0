"""Fused N-gram hash + flat-table gather: `ngram_gather` is the dispatch; `rows.py` the table spec
and its hash (XLA and in-kernel forms), `tpu.py` (Mosaic, DMA gather) and `gpu.py` (Triton) the
kernels, `reference.py` the XLA reference and the VJP all of them share."""

from pallas_kernels.ngram_gather.api import kernel_ngram_gather, ngram_gather
from pallas_kernels.ngram_gather.reference import ngram_gather_reference, scatter_add_rows
from pallas_kernels.ngram_gather.rows import KEY_KINDS, RowSpec

__all__ = ["KEY_KINDS", "RowSpec", "kernel_ngram_gather", "ngram_gather", "ngram_gather_reference",
           "scatter_add_rows"]
