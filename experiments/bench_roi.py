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
               the CPU with torch.set_num_threads(cores); when torch and torchvision import.
               torchvision requires rois of the input's dtype, so its bfloat16 rows get boxes
               rounded to bfloat16 (its CPU kernels have no bfloat16 at all); its CUDA backward
               scatters with atomicAdd, so it need not be bit-reproducible.
A Pallas implementation on a machine without its accelerator would run in Pallas interpret
mode, which is a correctness tool, not a benchmark: those rows are skipped (with the reason)
unless `--interpret` asks for them anyway (use it with --quick, to smoke-test the code path).

Columns: forward = the op alone; fwd+bwd = the op and its VJP with a fixed random cotangent
(i.e. the output and the gradient of sum(out * cotangent) with respect to the features), both
jitted, inputs already on the device, warm-up (compilation) excluded, timed with
`jax.block_until_ready` (torch: torch.cuda.synchronize on a GPU); each repeat is a window of
calls at least `--min_window_ms` long, and the row reports the median over `--repeats` windows.
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

Imports only jax, numpy, absl and kernels (torch and torchvision when present): it runs where
the zoo's training dependencies are not installed.
"""

import os
import sys

from absl import flags

from experiments.benchmarking import first_line, measured_bandwidth, time_ms

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
REPEATS = flags.DEFINE_integer("repeats", 5, "Timed windows per row; the median is reported.")
MIN_WINDOW_MS = flags.DEFINE_float("min_window_ms", 20.0,
                                   "A timed window repeats the call until it lasts this long.")
SEED = flags.DEFINE_integer("seed", 0, "Seed of boxes, features and cotangents.")
QUICK = flags.DEFINE_bool("quick", False,
                          "Small problem (K=64, C=32, 2x50x68 map, 3 repeats) unless those flags "
                          "are given: a smoke test of the script itself.")
INTERPRET = flags.DEFINE_bool("interpret", False,
                              "Also run Pallas implementations without their accelerator, in "
                              "interpret mode (meaningless times; use with --quick).")
BANDWIDTH = flags.DEFINE_float("bandwidth_gbs", None,
                               "Device bandwidth in GB/s for the floor (default: measured).")
MARKDOWN = flags.DEFINE_bool("markdown", False, "Print the table as Markdown.")

_QUICK = {"num_boxes": 64, "channels": 32, "feature_size": ["50", "68"], "repeats": 3}

BOX_SIDE_RANGE = (16.0, 112.0)  # image pixels, log-uniform per side


def setting(flag):
  """A flag's value, or its --quick default when --quick is on and the flag was not given."""
  if QUICK.value and flag.name in _QUICK and not flags.FLAGS[flag.name].present:
    return _QUICK[flag.name]
  return flag.value


def make_boxes(np, num_boxes, batch_size, image_h, image_w, seed):
  """Boxes (K, 4) float32 (x1, y1, x2, y2) in image pixels and box_indices (K,) int32."""
  rng = np.random.default_rng(seed)
  lo, hi = np.log(BOX_SIDE_RANGE[0]), np.log(BOX_SIDE_RANGE[1])
  w, h = np.exp(rng.uniform(lo, hi, num_boxes)), np.exp(rng.uniform(lo, hi, num_boxes))
  cx, cy = rng.uniform(0, image_w, num_boxes), rng.uniform(0, image_h, num_boxes)
  boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1).astype(np.float32)
  box_indices = (np.arange(num_boxes) * batch_size // num_boxes).astype(np.int32)
  return boxes, box_indices


class TorchPeer:
  """torchvision's roi_align / roi_pool on the same values, NCHW."""

  def __init__(self, torch, torchvision, threads):
    self.torch, self.ops = torch, torchvision.ops
    self.device = "cuda" if torch.cuda.is_available() else "cpu"
    if self.device == "cpu":
      torch.set_num_threads(threads)
    self.name = f"torchvision-{self.device}"
    self.version = f"torch {torch.__version__}, torchvision {torchvision.__version__} on " + (
        torch.cuda.get_device_name() if self.device == "cuda"
        else f"the CPU, {torch.get_num_threads()} threads")

  def tensor(self, array, np, dtype):
    array = np.array(array, np.float32)  # a writable copy
    return self.torch.from_numpy(array).to(self.device, getattr(self.torch, dtype))

  def sync(self, result):
    if self.device == "cuda":
      self.torch.cuda.synchronize()
    return result

  def functions(self, op, features_nchw, rois, out_size, spatial_scale, sampling_ratio):
    """(forward(), fwd_bwd(cotangent)) closures; outputs (K, C, oh, ow)."""
    torch = self.torch
    if op == "roi_align":
      call = lambda x: self.ops.roi_align(x, rois, out_size, spatial_scale, sampling_ratio, True)
    else:
      call = lambda x: self.ops.roi_pool(x, rois, out_size, spatial_scale)
    leaf = features_nchw.detach().requires_grad_(True)

    def forward():
      with torch.no_grad():
        return call(features_nchw)

    def fwd_bwd(cotangent):
      out = call(leaf)
      (grad,) = torch.autograd.grad(out, leaf, cotangent)
      return out.detach(), grad

    return forward, fwd_bwd


def main(argv):
  if len(argv) > 1:
    raise ValueError(f"Unexpected arguments {argv[1:]}: every setting is a flag.")
  for name in OPS_FLAG.value:
    if name not in OPS:
      raise ValueError(f"--ops: {name!r} is not one of {OPS}.")
  for name in IMPLS.value:
    if name not in IMPLEMENTATIONS:
      raise ValueError(f"--implementations: {name!r} is not one of {IMPLEMENTATIONS}.")
  for name in DTYPES.value:
    if name not in ("float32", "bfloat16"):
      raise ValueError(f"--dtypes: {name!r} is not float32 or bfloat16.")
  try:
    output_sizes = [int(s) for s in OUTPUT_SIZES.value]
    sampling_ratios = [int(s) for s in SAMPLING_RATIOS.value]
    height, width = (int(s) for s in setting(FEATURE_SIZE))
  except ValueError as e:
    raise ValueError(f"--output_sizes, --sampling_ratios and --feature_size take integers "
                     f"({e}); --feature_size is H,W.") from None

  import jax
  import jax.numpy as jnp
  import numpy as np

  import kernels

  num_boxes, channels, batch = setting(NUM_BOXES), setting(CHANNELS), BATCH_SIZE.value
  repeats, scale = setting(REPEATS), SPATIAL_SCALE.value
  image_h, image_w = round(height / scale), round(width / scale)
  device = jax.devices()[0]
  platform = device.platform  # "cpu", "gpu", "tpu"
  threads = len(os.sched_getaffinity(0))

  # What runs here, and why the rest does not.
  skipped, impls, peer = [], [], None
  accelerator = {"pallas_gpu": "gpu", "pallas_tpu": "tpu"}
  for name in IMPLS.value:
    if name in accelerator and platform != accelerator[name] and not INTERPRET.value:
      skipped.append(f"{name}: skipped, no {accelerator[name].upper()} (interpret mode is a "
                     f"correctness tool, not a benchmark; --interpret runs it anyway)")
    elif name == "torchvision":
      try:
        import torch
        import torchvision
      except ImportError as e:
        skipped.append(f"torchvision: skipped, not importable ({first_line(e)})")
      else:
        peer = TorchPeer(torch, torchvision, threads)
    else:
      impls.append(name)
  if not impls and peer is None:
    raise ValueError("Nothing to time here: " + "; ".join(skipped))

  rng = np.random.default_rng(SEED.value)
  boxes_np, indices_np = make_boxes(np, num_boxes, batch, image_h, image_w, SEED.value)
  features_np = rng.standard_normal((batch, height, width, channels), np.float32)
  boxes, box_indices = jnp.asarray(boxes_np), jnp.asarray(indices_np)
  sides = np.concatenate([boxes_np[:, 2] - boxes_np[:, 0], boxes_np[:, 3] - boxes_np[:, 1]])
  crossing = np.mean((boxes_np[:, 0] < 0) | (boxes_np[:, 1] < 0) | (boxes_np[:, 2] > image_w)
                     | (boxes_np[:, 3] > image_h))

  if BANDWIDTH.value:
    bandwidth, how = BANDWIDTH.value, "--bandwidth_gbs"
  else:
    nbytes = 256 << 20
    bandwidth = measured_bandwidth(jax, jnp, nbytes, MIN_WINDOW_MS.value / 1e3)
    how = f"measured: in-place x + 1 over {nbytes >> 20} MiB float32, best of 10 windows"

  print(f"RoI ops: features {batch}x{height}x{width}x{channels} (N, H, W, C), image "
        f"{image_h}x{image_w}, spatial_scale {scale:g}, {num_boxes} boxes (sides "
        f"{sides.min():.0f}-{sides.max():.0f} px, median {np.median(sides):.0f}; "
        f"{crossing:.0%} cross the image border), aligned=True, seed {SEED.value}")
  print(f"device: {device.device_kind} ({platform}), jax {jax.__version__}, {threads} host cores, "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
  print(f"bandwidth {bandwidth:.1f} GB/s ({how}); median of {repeats} windows of >= "
        f"{MIN_WINDOW_MS.value:g} ms")
  if peer is not None:
    print(f"peer: {peer.version}")
  for line in skipped:
    print(line)
  sys.stdout.flush()

  header = ["op", "implementation", "dtype", "out", "sr", "fwd ms", "fwd+bwd ms",
            "floor ms (fwd / fwd+bwd)", "of floor (fwd / fwd+bwd)", "bwd bit-equal",
            "max abs diff vs xla (out / grad)"]
  widths = [9, 17, 8, 5, 3, 9, 10, 24, 24, 13, 31]

  def emit(cells):
    if MARKDOWN.value:
      print("| " + " | ".join(str(c) for c in cells) + " |")
    else:
      print(" ".join(f"{str(c):>{w}s}" if i >= 3 else f"{str(c):{w}s}"
                     for i, (c, w) in enumerate(zip(cells, widths))).rstrip())
    sys.stdout.flush()

  emit(header)
  if MARKDOWN.value:
    emit(["---"] * len(header))

  configs = []
  for op in OPS_FLAG.value:
    for dtype in DTYPES.value:
      for size in output_sizes:
        for sr in (sampling_ratios if op == "roi_align" else [None]):
          configs.append((op, dtype, size, sr))

  features_dev = {}
  min_window_s = MIN_WINDOW_MS.value / 1e3
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
    floor_fwd = (feature_bytes + box_bytes + out_bytes) / (bandwidth * 1e9) * 1e3
    floor_bwd = floor_fwd + (out_bytes + feature_bytes) / (bandwidth * 1e9) * 1e3
    kwargs = dict(spatial_scale=scale)
    if op == "roi_align":
      kwargs["sampling_ratio"] = sr
    fn = getattr(kernels, op)
    reference = None
    label = [op, None, dtype, f"{size}x{size}", "-" if sr is None else sr]

    def row(name, fwd_ms, bwd_ms, equal, out, grad):
      nonlocal reference
      if name == "xla":
        reference = (out, grad)
      if reference is None or name == "xla":
        diff = "-"
      else:
        diff = (f"{np.max(np.abs(out - reference[0])):.1e} / "
                f"{np.max(np.abs(grad - reference[1])):.1e}")
      emit(label[:1] + [name] + label[2:] + [
          f"{fwd_ms:.2f}", f"{bwd_ms:.2f}", f"{floor_fwd:.3f} / {floor_bwd:.3f}",
          f"{floor_fwd / fwd_ms:.1%} / {floor_bwd / bwd_ms:.1%}", "yes" if equal else "NO", diff])

    def note(name, message):
      emit(label[:1] + [name] + label[2:] + [message] + [""] * (len(header) - 6))

    for name in impls:
      try:
        forward = jax.jit(lambda f, b, i, name=name: fn(f, b, i, size, implementation=name,
                                                         **kwargs))

        def fwd_bwd(f, b, i, ct, name=name):
          out, vjp = jax.vjp(lambda f: fn(f, b, i, size, implementation=name, **kwargs), f)
          return out, vjp(ct)[0]

        fwd_bwd = jax.jit(fwd_bwd)
        jax.block_until_ready(forward(features, boxes, box_indices))
        first = jax.block_until_ready(fwd_bwd(features, boxes, box_indices, cotangent))
        fwd_ms, _ = time_ms(lambda: forward(features, boxes, box_indices), jax.block_until_ready,
                            repeats, min_window_s)
        bwd_ms, last = time_ms(lambda: fwd_bwd(features, boxes, box_indices, cotangent),
                               jax.block_until_ready, repeats, min_window_s)
        g0, g1 = np.asarray(first[1]), np.asarray(last[1])
        equal = np.array_equal(g0.view(np.uint8), g1.view(np.uint8))
        row(name, fwd_ms, bwd_ms, equal, np.asarray(last[0], np.float32), g1.astype(np.float32))
        del first, last
      except Exception as e:  # one failing row (an unsupported shape, say) must not stop the rest
        note(name, f"failed: {first_line(e)}")

    if peer is not None:
      try:
        features_t = peer.tensor(features_np.transpose(0, 3, 1, 2), np, dtype).contiguous()
        rois_t = peer.tensor(np.concatenate([indices_np[:, None], boxes_np], 1), np, dtype)
        cotangent_t = peer.tensor(np.asarray(cotangent, np.float32).transpose(0, 3, 1, 2), np,
                                  dtype).contiguous()
        forward, fwd_bwd = peer.functions(op, features_t, rois_t, size, scale, sr)
        peer.sync(forward())
        first = peer.sync(fwd_bwd(cotangent_t))
        fwd_ms, _ = time_ms(forward, peer.sync, repeats, min_window_s)
        bwd_ms, last = time_ms(lambda: fwd_bwd(cotangent_t), peer.sync, repeats, min_window_s)
        equal = bool(peer.torch.equal(first[1], last[1]))
        to_nhwc = lambda t: t.float().cpu().numpy().transpose(0, 2, 3, 1)
        row(peer.name, fwd_ms, bwd_ms, equal, to_nhwc(last[0]), to_nhwc(last[1]))
        del first, last, features_t, cotangent_t
      except Exception as e:
        note(peer.name, f"skipped: {first_line(e)}")
    reference = None


if __name__ == "__main__":
  from experiments import launcher
  launcher.run(main)
