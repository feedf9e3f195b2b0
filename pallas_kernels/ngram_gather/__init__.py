"""Fused N-gram hash + flat-table gather: `ngram_gather` is the dispatch; `tpu.py` (Mosaic, DMA
gather) and `gpu.py` (Triton) hold the kernels, `rows.py` the in-kernel hash, `reference.py` the XLA
reference and the VJP all of them share."""

from pallas_kernels.ngram_gather.api import kernel_ngram_gather, ngram_gather
from pallas_kernels.ngram_gather.reference import flat_rows, ngram_gather_reference, scatter_add_rows
from pallas_kernels.ngram_gather.rows import RowSpec

__all__ = ["RowSpec", "flat_rows", "kernel_ngram_gather", "ngram_gather", "ngram_gather_reference",
           "scatter_add_rows"]
