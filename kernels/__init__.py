"""Pallas kernels with XLA references: RoIAlign/RoIPool/SPP, shifted-window attention,
exact dense-CRF mean field.

Each kernel is one public function with ``implementation="auto" | "xla" | "pallas_gpu" | "pallas_tpu"``
(see DESIGN.md, "Kernels"). This package imports only jax.
"""

from kernels._common import lowering_for
from kernels.roi_align import BlockSizes, fpn_levels, multilevel_roi_align, roi_align
from kernels.roi_pool import roi_pool, spatial_pyramid_pool
from kernels.window_attention import window_attention
from kernels.dense_crf import dense_crf

__all__ = ["BlockSizes", "dense_crf", "fpn_levels", "lowering_for", "multilevel_roi_align", "roi_align",
           "roi_pool", "spatial_pyramid_pool", "window_attention"]
