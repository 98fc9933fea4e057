"""Pallas kernels with XLA references: RoIAlign/RoIPool/SPP, shifted-window attention,
exact dense-CRF mean field.

Each op is one public function with ``implementation="auto" | "xla" | "pallas_gpu" | "pallas_tpu"``
(`IMPLEMENTATIONS`; DESIGN.md, "Kernels"; kernels/README.md for how they work and how to add
one). Each op's folder (`roi/`, `attention/`, `crf/`) has an `api` module, shared geometry and
one module per backend; a backend is imported only when chosen, so `import kernels` loads no
Pallas module. This package imports only jax.
"""

from kernels.attention.api import window_attention
from kernels.common import IMPLEMENTATIONS, divide, lowering_for
from kernels.crf.api import dense_crf
from kernels.roi.api import fpn_levels, multilevel_roi_align, roi_align, roi_pool, spatial_pyramid_pool

__all__ = ["IMPLEMENTATIONS", "dense_crf", "divide", "fpn_levels", "lowering_for",
           "multilevel_roi_align", "roi_align", "roi_pool", "spatial_pyramid_pool",
           "window_attention"]
