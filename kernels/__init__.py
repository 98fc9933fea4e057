"""Pallas kernels with XLA references: RoIAlign/RoIPool, shifted-window attention, dense-CRF mean field.

Each kernel is one public function with ``implementation="auto" | "xla" | "pallas_gpu" | "pallas_tpu"``
(see DESIGN.md, "Kernels"). This package imports only jax.
"""
