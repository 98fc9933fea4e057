"""Swin's shifted-window attention (the public function is `api.window_attention`).

Modules: `api` (checks, implementation choice, custom_vjp, vmap), `geometry` (relative position
bias, region mask, the call's static shape; shared by every backend), `xla`, `pallas_tpu`,
`pallas_mosaic_gpu` (each imports only `geometry` and `kernels.mosaic_gpu_common`, and is
imported by `api` only when chosen).
"""
