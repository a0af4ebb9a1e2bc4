"""The retrieval op of Memory Mosaics and the key recurrences, as pure JAX functions.

This package depends on jax alone and never imports `mosaics_jax`.
"""

from kernels_pallas.bands import (
    band_mask,
    count_in_band,
    document_positions,
    segment_starts,
    visible_counts,
)
from kernels_pallas.persistent import retrieve_persistent, retrieve_persistent_reference
from kernels_pallas.retrieve import IMPLEMENTATIONS, retrieve, retrieve_selected
from kernels_pallas.scans import linear_scan
from kernels_pallas.select import BlockSelection, select_blocks

__all__ = [
    "IMPLEMENTATIONS",
    "BlockSelection",
    "band_mask",
    "count_in_band",
    "document_positions",
    "linear_scan",
    "retrieve",
    "retrieve_persistent",
    "retrieve_persistent_reference",
    "retrieve_selected",
    "segment_starts",
    "select_blocks",
    "visible_counts",
]
