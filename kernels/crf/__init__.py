"""The exact dense CRF (the public functions are in `api`: dense_crf, bilateral_filter,
tile_pairs_kept).

Modules: `api` (checks, implementation choice, the filter's custom_vjp, mean field), `geometry`
(bilateral features, Z-order, tiles and the skip test; shared by every backend), `xla`,
`pallas_tpu`, `pallas_mosaic_gpu` (each imports only `geometry` and `kernels.common` /
`kernels.mosaic_gpu_common`, and is imported by `api` only when chosen).
"""
