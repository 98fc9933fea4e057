r"""Times RoIAlign and RoIPool (kernels/) forward and forward+backward against the byte floor.

    python -m experiments.bench_roi [--ops=roi_align,roi_pool \
        --implementations=xla,pallas_gpu,pallas_tpu,torchvision --dtypes=float32,bfloat16 \
        --output_sizes=7,14 --sampling_ratios=0,2 --num_boxes=1000 --channels=256 --repeats=5]
    python -m experiments.bench_roi --quick        # small sizes: a smoke test, < 60 s on a CPU

The problem is Mask R-CNN's RoI heads on the finest FPN level: features (N, H, W, C) =
(2, 200, 272, 256) channels-last, the P2 level (stride 4) of an 800x1088 image, so
`spatial_scale=1/4`; K = 1000 boxes; outputs 7x7 (box head) and 14x14 (mask head);
`sampling_ratio` 0 (adaptive, ceil(box side / output side) samples per bin per axis) and 2;
`aligned=True`; float32 and bfloat16 features (the boxes stay float32).

Boxes (seed `--seed`, so every run sees the same ones): the boxes an FPN sends to P2 are those
with sqrt(w h) < 112 image pixels (Lin et al. 2017, eq. 1 with k0 = 4), and proposals are rarely
smaller than ~16 pixels. Each box's width and height are drawn independently, log-uniform on
[16, 112] image pixels (so sqrt(w h) <= 112 and aspect ratios between 1/7 and 7), its centre
uniformly over the whole image, and it is not clipped: about one box in ten crosses the
image border (9% at the default size and seed; the script prints the fraction). Boxes are
grouped by image, the first K/N on image 0 and so on, as a batched detector concatenates its
per-image proposals; `box_indices` say which image. (--quick keeps these image-pixel sizes
on a 200x272 image, so there 42% of its 64 boxes cross the border.)

Rows, one per (op, implementation, dtype, output size, sampling ratio):
  xla          the plain jax.numpy reference (any backend);
  pallas_gpu   the Mosaic GPU kernel: timed on a GPU only;
  pallas_tpu   the Mosaic TPU kernel: timed on a TPU only;
  auto         whatever "auto" picks here (off by default: it repeats one of the above);
  torchvision  `torchvision.ops.roi_align` / `roi_pool` on the same values (NCHW input, rois
               (K, 5) = [batch index, x1, y1, x2, y2]), on CUDA when torch sees a GPU, else on
               the CPU with torch.set_num_threads(cores), in a process of its own
               (experiments/peers/torchvision_roi.py, run by `--torch_python`, default this
               interpreter) when torch and torchvision import there. torchvision requires rois
               of the input's dtype, so its bfloat16 rows get boxes rounded to bfloat16 (its
               CPU kernels have no bfloat16 at all); its CUDA backward scatters with atomicAdd,
               so it need not be bit-reproducible.
A Pallas implementation on a machine without its accelerator would run in Pallas interpret
mode, which is a correctness tool, not a benchmark: those rows are skipped (with the reason)
unless `--interpret` asks for them anyway (use it with --quick, to smoke-test the code path).

Columns: forward = the op alone; fwd+bwd = the op and its VJP with a fixed random cotangent
(i.e. the output and the gradient of sum(out * cotangent) with respect to the features), both
jitted, inputs already on the device, warm-up (compilation) excluded, timed with
`jax.block_until_ready` (torch: torch.cuda.synchronize on a GPU); each repeat is a window of
calls at least `--min_window_ms` long, the implementations of one configuration take turns
window by window, and the row reports the median over `--repeats` windows ("windows" lists
them all).
The byte floor is the traffic no implementation can avoid: features read once + boxes and
box indices + output written once; fwd+bwd adds the cotangent read once and the feature
gradient written once. It is divided by the device's bandwidth, measured here with an in-place
`x + 1` over a 256 MiB on-device float32 array (read + write counted, best of 10 windows; on a
CPU a smaller array would partly sit in the last-level cache, and a fresh output buffer per
call would time page faults), and "of floor" = floor time / measured time. "bwd bit-equal"
says whether two fwd+bwd runs gave bit-identical feature gradients, and "max abs diff vs xla"
the largest absolute difference of the output and of the gradient from the xla row of the
same configuration (computed in float32).

XLA's scatter-add on a GPU is deterministic only under
`XLA_FLAGS=--xla_gpu_deterministic_ops=true` (the header prints XLA_FLAGS); run once with and
once without to see what determinism costs.

Imports only jax, numpy, absl and kernels: it runs where the zoo's training dependencies are
not installed.
"""

import os

from absl import flags

from experiments import benchmarking

OPS = ("roi_align", "roi_pool")
IMPLEMENTATIONS = ("xla", "pallas_gpu", "pallas_tpu", "auto", "torchvision")

OPS_FLAG = flags.DEFINE_list("ops", list(OPS), f"Which ops, from {OPS}.")
IMPLS = flags.DEFINE_list("implementations", ["xla", "pallas_gpu", "pallas_tpu", "torchvision"],
                          f"Which implementations, from {IMPLEMENTATIONS}.")
DTYPES = flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "Feature dtypes.")
OUTPUT_SIZES = flags.DEFINE_list("output_sizes", ["7", "14"],
                                 "Square output sizes (bins per side).")
SAMPLING_RATIOS = flags.DEFINE_list("sampling_ratios", ["0", "2"],
                                    "RoIAlign sampling ratios (0 = adaptive).")
NUM_BOXES = flags.DEFINE_integer("num_boxes", 1000, "K, boxes over the whole batch.")
CHANNELS = flags.DEFINE_integer("channels", 256, "C, feature channels.")
BATCH_SIZE = flags.DEFINE_integer("batch_size", 2, "N, images.")
FEATURE_SIZE = flags.DEFINE_list("feature_size", ["200", "272"], "H,W of the feature map.")
SPATIAL_SCALE = flags.DEFINE_float("spatial_scale", 0.25, "Feature cells per image pixel.")
SEED = flags.DEFINE_integer("seed", 0, "Seed of boxes, features and cotangents.")
BENCH = benchmarking.BenchmarkFlags(kernel=True, quick={
    "num_boxes": 64, "channels": 32, "feature_size": ["50", "68"], "repeats": 3})

BOX_SIDE_RANGE = (16.0, 112.0)  # image pixels, log-uniform per side


def make_boxes(np, num_boxes, batch_size, image_h, image_w, seed):
  """Boxes (K, 4) float32 (x1, y1, x2, y2) in image pixels and box_indices (K,) int32."""
  rng = np.random.default_rng(seed)
  lo, hi = np.log(BOX_SIDE_RANGE[0]), np.log(BOX_SIDE_RANGE[1])
  w, h = np.exp(rng.uniform(lo, hi, num_boxes)), np.exp(rng.uniform(lo, hi, num_boxes))
  cx, cy = rng.uniform(0, image_w, num_boxes), rng.uniform(0, image_h, num_boxes)
  boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1).astype(np.float32)
  box_indices = (np.arange(num_boxes) * batch_size // num_boxes).astype(np.int32)
  return boxes, box_indices


def main():
  ops = benchmarking.checked_names(OPS_FLAG, OPS)
  requested = benchmarking.checked_names(IMPLS, IMPLEMENTATIONS)
  dtypes = benchmarking.checked_names(DTYPES, ("float32", "bfloat16"))
  output_sizes = benchmarking.integers(OUTPUT_SIZES)
  sampling_ratios = benchmarking.integers(SAMPLING_RATIOS)
  height, width = benchmarking.integers(FEATURE_SIZE, BENCH.setting(FEATURE_SIZE))

  import jax
  import jax.numpy as jnp
  import numpy as np

  import kernels

  num_boxes, channels = BENCH.setting(NUM_BOXES), BENCH.setting(CHANNELS)
  batch = BATCH_SIZE.value
  repeats, scale = BENCH.setting(BENCH.repeats), SPATIAL_SCALE.value
  min_window_s = BENCH.min_window_ms.value / 1e3
  image_h, image_w = round(height / scale), round(width / scale)
  platform = jax.devices()[0].platform
  threads = len(os.sched_getaffinity(0))

  # What runs here, and why the rest does not.
  notes, impls, peer = [], [], None
  for name in requested:
    reason = benchmarking.without_accelerator(name, platform)
    if name == "torchvision":
      peer, note = benchmarking.start_peer("experiments.peers.torchvision_roi",
                                           BENCH.torch_python.value, "torchvision")
      notes += [note] if note else []
    elif reason and not BENCH.interpret.value:
      notes.append(f"{name}: skipped, {reason}; --interpret runs it anyway")
    else:
      impls.append(name)
  if not impls and peer is None:
    raise ValueError("Nothing to time here: " + "; ".join(notes))

  rng = np.random.default_rng(SEED.value)
  boxes_np, indices_np = make_boxes(np, num_boxes, batch, image_h, image_w, SEED.value)
  features_np = rng.standard_normal((batch, height, width, channels), np.float32)
  boxes, box_indices = jnp.asarray(boxes_np), jnp.asarray(indices_np)
  sides = np.concatenate([boxes_np[:, 2] - boxes_np[:, 0], boxes_np[:, 3] - boxes_np[:, 1]])
  crossing = np.mean((boxes_np[:, 0] < 0) | (boxes_np[:, 1] < 0) | (boxes_np[:, 2] > image_w)
                     | (boxes_np[:, 3] > image_h))
  bandwidth, how = benchmarking.bandwidth_gbs(jax, BENCH.bandwidth_gbs.value, min_window_s)

  print(f"RoI ops: features {batch}x{height}x{width}x{channels} (N, H, W, C), image "
        f"{image_h}x{image_w}, spatial_scale {scale:g}, {num_boxes} boxes (sides "
        f"{sides.min():.0f}-{sides.max():.0f} px, median {np.median(sides):.0f}; "
        f"{crossing:.0%} cross the image border), aligned=True, seed {SEED.value}")
  print(benchmarking.device_line(jax))
  print(f"bandwidth {bandwidth:.1f} GB/s ({how}); median of {repeats} windows of >= "
        f"{BENCH.min_window_ms.value:g} ms, the implementations taking turns")
  for line in notes:
    print(line)

  table = benchmarking.Table(
      ["op", "implementation", "dtype", "out", "sr", "fwd ms", "fwd+bwd ms",
       "floor ms (fwd / fwd+bwd)", "of floor (fwd / fwd+bwd)", "bwd bit-equal",
       "max abs diff vs xla (out / grad)", "windows ms (fwd | fwd+bwd)"],
      widths={"op": 9, "implementation": 17, "dtype": 8, "out": 5}, labels=3,
      markdown=BENCH.markdown.value)

  configs = []
  for op in ops:
    for dtype in dtypes:
      for size in output_sizes:
        for sr in (sampling_ratios if op == "roi_align" else [None]):
          configs.append((op, dtype, size, sr))

  features_dev = {}
  for op, dtype, size, sr in configs:
    if dtype not in features_dev:
      features_dev[dtype] = jnp.asarray(features_np).astype(dtype)
    features = features_dev[dtype]
    itemsize = np.dtype(features.dtype).itemsize
    out_shape = (num_boxes, size, size, channels)
    cotangent = jax.random.normal(jax.random.fold_in(jax.random.key(SEED.value), size), out_shape,
                                  features.dtype)
    feature_bytes = batch * height * width * channels * itemsize
    out_bytes = num_boxes * size * size * channels * itemsize
    box_bytes = num_boxes * 4 * 4 + num_boxes * 4
    floor_fwd = (feature_bytes + box_bytes + out_bytes) / (bandwidth * 1e9)
    floor_bwd = floor_fwd + (out_bytes + feature_bytes) / (bandwidth * 1e9)
    kwargs = dict(spatial_scale=scale)
    if op == "roi_align":
      kwargs["sampling_ratio"] = sr
    fn = {"roi_align": kernels.roi_align, "roi_pool": kernels.roi_pool}[op]

    rows = {}
    for name in impls:
      forward = jax.jit(lambda f, b, i, name=name: fn(f, b, i, size, implementation=name,
                                                       **kwargs))

      def fwd_bwd(f, b, i, ct, name=name):
        out, vjp = jax.vjp(lambda f: fn(f, b, i, size, implementation=name, **kwargs), f)
        return out, vjp(ct)[0]

      fwd_bwd = jax.jit(fwd_bwd)
      rows[name, "fwd"] = benchmarking.Timed(
          lambda forward=forward: forward(features, boxes, box_indices),
          jax.block_until_ready, min_window_s=min_window_s)
      rows[name, "fwd+bwd"] = benchmarking.Timed(
          lambda fwd_bwd=fwd_bwd: fwd_bwd(features, boxes, box_indices, cotangent),
          jax.block_until_ready, min_window_s=min_window_s)
    peer_name, peer_failure = None, ""
    if peer is not None:
      spec = dict(op=op, dtype=dtype, output_size=size, spatial_scale=scale, sampling_ratio=sr,
                  min_window_s=min_window_s, threads=threads,
                  inputs=os.path.join(peer.directory, "inputs.npz"),
                  outputs=os.path.join(peer.directory, "outputs.npz"))
      np.savez(spec["inputs"], features=features_np, boxes=boxes_np, box_indices=indices_np,
               cotangent=np.asarray(cotangent, np.float32))
      try:
        peer_rows = peer.prepare(spec)
        peer_name = peer.info["name"]
        rows.update({(peer_name, part): row for part, row in peer_rows.items()})
      except benchmarking.PeerError as e:
        peer_failure = benchmarking.peer_problem("torchvision", e)
    timings = benchmarking.alternate(rows, repeats)

    label = [op, None, dtype, f"{size}x{size}", "-" if sr is None else sr]
    reference = None
    for name in impls + ([peer_name] if peer_name else []):
      fwd, bwd = timings[name, "fwd"], timings[name, "fwd+bwd"]
      if fwd.error or bwd.error:
        table.row(label[:1] + [name] + label[2:] + [f"failed: {fwd.error or bwd.error}"])
        continue
      if name == peer_name:
        try:
          equal = peer.report()["bit_equal"]
        except benchmarking.PeerError as e:
          table.row(label[:1] + [name] + label[2:] + [f"failed: {e}"])
          continue
        outputs = np.load(spec["outputs"])
        out, grad = outputs["out"], outputs["grad"]
      else:
        first, last = rows[name, "fwd+bwd"].first, rows[name, "fwd+bwd"].result
        g0, g1 = np.asarray(first[1]), np.asarray(last[1])
        equal = np.array_equal(g0.view(np.uint8), g1.view(np.uint8))
        out, grad = np.asarray(last[0], np.float32), g1.astype(np.float32)
      if name == "xla":
        reference = (out, grad)
      if reference is None or name == "xla":
        diff = "-"
      else:
        diff = (f"{np.max(np.abs(out - reference[0])):.1e} / "
                f"{np.max(np.abs(grad - reference[1])):.1e}")
      table.row(label[:1] + [name] + label[2:] + [
          f"{fwd.median * 1e3:.2f}", f"{bwd.median * 1e3:.2f}",
          f"{floor_fwd * 1e3:.3f} / {floor_bwd * 1e3:.3f}",
          f"{benchmarking.percent(floor_fwd, fwd.median)} / "
          f"{benchmarking.percent(floor_bwd, bwd.median)}",
          "yes" if equal else "NO", diff, f"{fwd.windows()} | {bwd.windows()}"])
    if peer_failure:
      table.row(label[:1] + ["torchvision"] + label[2:] + [peer_failure])
    del rows
  benchmarking.close_peer(peer)


if __name__ == "__main__":
  benchmarking.run(main)
