"""RoIAlign, multi-level RoIAlign, RoIPool and SPP (the public functions are in `api`).

Modules: `api` (checks, implementation choice, custom_vjp, vmap), `geometry` (torchvision's
per-box arithmetic and the Pallas tiling, shared by every backend), `xla`, `pallas_tpu`,
`pallas_mosaic_gpu` (each imports only `geometry` and `kernels.common` / `kernels.mosaic_gpu_common`,
and is imported by `api` only when chosen).
"""
