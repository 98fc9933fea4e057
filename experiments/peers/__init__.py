"""Peer scripts: the PyTorch-side (and pydensecrf) counterparts the benchmarks time ours against.

Each runs in a process of its own, started by `experiments.benchmarking.Peer` with the
interpreter `--torch_python` names, as `python -m experiments.peers.<name>`; it defines
`prepare(spec) -> benchmarking.Prepared` and hands it to `benchmarking.serve`, which answers
the harness's requests (module doc of experiments/benchmarking.py). A peer imports only the
standard library and `experiments.benchmarking` at module level, and its own packages (torch,
torchvision, timm, pydensecrf, numpy) inside `prepare`: when they are missing, the harness says
so in the peer's rows.

  torch_unet_train_step   bench_train's U-Net training step in PyTorch
  torchvision_roi         torchvision.ops.roi_align / roi_pool, forward and forward+backward
  timm_train_step         timm's Swin-T / ViT-B/16 training steps (eager; torch.compile on CUDA)
  pydensecrf_mean_field   Krähenbühl's permutohedral dense-CRF mean field (pydensecrf)
  torchvision_detection   torchvision's Faster / Mask R-CNN R50-FPN inference and training step
"""
