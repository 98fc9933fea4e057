r"""Times the exact dense-CRF mean field (kernels.dense_crf) against its floor and pydensecrf.

    python -m experiments.bench_crf [--sizes=321x321,500x375 --labels=21 --iterations=10 \
        --implementations=xla,pallas_gpu,pallas_tpu,pydensecrf --repeats=3]
    python -m experiments.bench_crf --quick        # 96x128: a few minutes on 2 CPU cores

The problem is DeepLab's CRF post-processing: L = 21 labels (PASCAL VOC), 10 mean-field
iterations, DeepLab's parameters (pos_w 3, pos_xy_std 1, bi_w 4, bi_xy_std 67, bi_rgb_std 3 in
0..255 RGB units), images 321x321 (DeepLab's training crop) and 500x375 (a typical VOC image).

Inputs (seed `--seed`): a synthetic scene standing in for a photograph, so that colours are
piecewise smooth as the CRF assumes: a smooth colour gradient background with 12 random
ellipses of random colours and labels, plus Gaussian pixel noise (std 4 RGB units), rounded
to uint8; logits = 3 * one-hot(true label) + smooth noise (std 2 Gaussian noise, box-blurred
over 16-pixel blocks), as a coarse network output would be. The image and labels are not a
real photograph: the tile-skipping rate of the Pallas kernels depends on how compact colours
are, so a real image may skip fewer or more tiles.

Rows, one per (size, implementation):
  xla          chunked XLA (any backend);
  pallas_gpu   the Mosaic GPU kernel: timed on a Hopper GPU only;
  pallas_tpu   the Mosaic TPU kernel: timed on a TPU only;
  pydensecrf   Krähenbühl's C++ code (pydensecrf / pydensecrf2) on one CPU core, when it
               imports: APPROXIMATE (permutohedral lattice, which also blurs each pixel with
               itself), run with NO_NORMALIZATION and Potts compatibilities, the semantics
               closest to ours; its row reports how many pixels' labels (argmax) differ from
               the exact xla result. It has no backward.
Pallas rows on a machine without their accelerator would run in interpret mode (a correctness
tool, far too slow to time): they are not timed, only their "pairs kept" is printed.

Columns: forward = Q from (logits, image); fwd+bwd = Q and the gradient of sum(Q * cotangent)
with respect to the logits, bi_w and pos_w (the CRF-as-RNN training step's CRF part); jitted,
warm-up excluded, median of --repeats calls. "pairs kept" is the fraction of (query tile, key
tile) pairs the Pallas kernels compute (the rest are beyond the 1e-12 cutoff), from the same
bounding-box test in XLA.

Floor: the exact filter needs N^2 exponentials and 2 N^2 (L + 8) matmul FLOPs per iteration
(distances with 8-wide augmented features, then kernel @ Q); fwd+bwd needs it twice (the
backward pass filters the cotangent). "exp floor" = exponentials / the device's exponential
rate, "mm floor" = FLOPs / its matmul rate; floor = the larger, "of floor" = floor / time. Both
rates are measured here: exponentials as sum_j exp(-(a_i - b_j)^2) over 2048^2 (CPU) or 16384^2
pairs (fused, no memory traffic: the filter's own pattern), matmul as a float32 (CPU, 2048^3) or
bfloat16 (accelerator, 4096^3) product; --exp_rate and --matmul_flops override them (e.g. an H100's 3.9e12 MUFU exponentials/s, 989e12 bf16 FLOP/s).
The floor counts every pair; the Pallas kernels skip some, so they can beat it.
"""

import importlib
import os
import statistics
import time

from absl import app, flags

IMPLEMENTATIONS = ("xla", "pallas_gpu", "pallas_tpu", "pydensecrf")
SIZES = flags.DEFINE_list("sizes", ["321x321", "500x375"], "Images as HxW (rows x columns).")
LABELS = flags.DEFINE_integer("labels", 21, "L, labels.")
ITERATIONS = flags.DEFINE_integer("iterations", 10, "Mean-field iterations.")
IMPLS = flags.DEFINE_list("implementations", list(IMPLEMENTATIONS),
                          f"Which implementations, from {IMPLEMENTATIONS}.")
BACKWARD = flags.DEFINE_bool("backward", True, "Also time forward+backward.")
REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls per row; the median is reported.")
SEED = flags.DEFINE_integer("seed", 0, "Seed of the synthetic scene, logits and cotangent.")
QUICK = flags.DEFINE_bool("quick", False, "A 96x128 image unless --sizes is given.")
EXP_RATE = flags.DEFINE_float("exp_rate", None, "Exponentials per second (default: measured).")
MATMUL_FLOPS = flags.DEFINE_float("matmul_flops", None, "Matmul FLOP/s (default: measured).")
MARKDOWN = flags.DEFINE_bool("markdown", False, "Print the table as Markdown.")

PARAMS = dict(pos_w=3.0, pos_xy_std=1.0, bi_w=4.0, bi_xy_std=67.0, bi_rgb_std=3.0)


def scene(np, height, width, labels, seed):
  """uint8 image (H, W, 3), float32 logits (H, W, L), int labels (H, W): see the docstring."""
  rng = np.random.default_rng(seed)
  rows, cols = np.meshgrid(np.arange(height) / height, np.arange(width) / width, indexing="ij")
  corner = rng.uniform(0, 255, (2, 2, 3))
  image = (corner[0, 0] * ((1 - rows) * (1 - cols))[..., None] + corner[0, 1] * ((1 - rows) * cols)[..., None]
           + corner[1, 0] * (rows * (1 - cols))[..., None] + corner[1, 1] * (rows * cols)[..., None])
  truth = np.zeros((height, width), np.int64)
  for _ in range(12):
    cy, cx, ry, rx = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.3), rng.uniform(0.05, 0.3)
    inside = ((rows - cy) / ry) ** 2 + ((cols - cx) / rx) ** 2 < 1
    image[inside] = rng.uniform(0, 255, 3)
    truth[inside] = rng.integers(1, labels)
  image = np.clip(np.round(image + rng.normal(0, 4, image.shape)), 0, 255).astype(np.uint8)
  noise = rng.normal(0, 2, (height, width, labels))
  block = 16
  pad = ((0, -height % block), (0, -width % block), (0, 0))
  blurred = np.pad(noise, pad, mode="edge").reshape(
      (height + pad[0][1]) // block, block, (width + pad[1][1]) // block, block, labels).mean((1, 3))
  blurred = np.repeat(np.repeat(blurred, block, 0), block, 1)[:height, :width] * block / 2
  logits = 3.0 * np.eye(labels)[truth] + blurred
  return image, logits.astype(np.float32), truth


def median_ms(run, sync, repeats):
  sync(run())  # warm-up: compilation
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    sync(run())
    times.append(time.perf_counter() - start)
  return statistics.median(times) * 1e3


def device_rates(jax, jnp, platform):
  """(exponentials / s, matmul FLOP / s) measured on the default device."""
  # exp(-(a_i - b_j)^2) summed over j: the filter's own pattern, fused, no memory traffic.
  m = 2048 if platform == "cpu" else 16384
  a = jnp.linspace(0.0, 1.0, m, dtype=jnp.float32)
  f = jax.jit(lambda a, b: jnp.sum(jnp.exp(-jnp.square(a[:, None] - b[None, :])), axis=1))
  exp_ms = median_ms(lambda: f(a, a + 0.5), jax.block_until_ready, 5)
  dtype = jnp.float32 if platform == "cpu" else jnp.bfloat16
  n = 2048 if platform == "cpu" else 4096
  a = jnp.ones((n, n), dtype)
  g = jax.jit(lambda a: a @ a)
  mm_ms = median_ms(lambda: g(a), jax.block_until_ready, 5)
  return m * m / (exp_ms / 1e3), 2 * n ** 3 / (mm_ms / 1e3), jnp.dtype(dtype).name


def pydensecrf_module():
  try:
    import pydensecrf.densecrf as dcrf  # pydensecrf and pydensecrf2 both install this name
    return dcrf
  except ImportError:
    return None


def run_pydensecrf(dcrf, np, image, logits, iterations):
  """Q (H, W, L) float32 from Krähenbühl's permutohedral mean field with our parameters."""
  h, w, l = logits.shape
  crf = dcrf.DenseCRF2D(w, h, l)
  crf.setUnaryEnergy(np.ascontiguousarray(-logits.reshape(-1, l).T, np.float32))
  # PottsCompatibility(w) adds +w * filtered Q of the same label, which (rows of Q summing to 1)
  # is our Potts energy up to a per-pixel constant; NO_NORMALIZATION = our unnormalised kernels.
  crf.addPairwiseGaussian(sxy=PARAMS["pos_xy_std"], compat=PARAMS["pos_w"],
                          kernel=dcrf.DIAG_KERNEL, normalization=dcrf.NO_NORMALIZATION)
  crf.addPairwiseBilateral(sxy=PARAMS["bi_xy_std"], srgb=PARAMS["bi_rgb_std"],
                           rgbim=np.ascontiguousarray(image), compat=PARAMS["bi_w"],
                           kernel=dcrf.DIAG_KERNEL, normalization=dcrf.NO_NORMALIZATION)
  q = np.array(crf.inference(iterations), np.float32)
  return q.T.reshape(h, w, l)


def pairs_kept(name, image):
  """Fraction of (query tile, key tile) pairs the Pallas kernel `name` computes (not skipped)."""
  m = importlib.import_module("kernels.dense_crf")  # kernels.dense_crf is the function
  return float(m.tile_pairs_kept(image, bi_xy_std=PARAMS["bi_xy_std"],
                                 bi_rgb_std=PARAMS["bi_rgb_std"], implementation=name)[0])


def main(argv):
  del argv
  import jax
  import jax.numpy as jnp
  import numpy as np

  import kernels

  unknown = [i for i in IMPLS.value if i not in IMPLEMENTATIONS]
  if unknown:
    raise ValueError(f"--implementations: {unknown} are not among {IMPLEMENTATIONS}.")
  sizes = SIZES.value if (not QUICK.value or flags.FLAGS["sizes"].present) else ["96x128"]
  try:
    sizes = [tuple(int(v) for v in s.lower().split("x")) for s in sizes]
  except ValueError:
    raise ValueError(f"--sizes takes HxW values such as 321x321, got {SIZES.value}.") from None
  device = jax.devices()[0]
  platform = device.platform
  exp_rate, mm_rate, mm_dtype = device_rates(jax, jnp, platform)
  exp_rate = EXP_RATE.value or exp_rate
  mm_rate = MATMUL_FLOPS.value or mm_rate
  labels, iterations = LABELS.value, ITERATIONS.value
  print(f"dense CRF mean field: L={labels}, {iterations} iterations, {PARAMS}")
  print(f"device: {device.device_kind} ({platform}), jax {jax.__version__}, {os.cpu_count()} host "
        f"cores; exp rate {exp_rate:.3g}/s{'' if EXP_RATE.value else ' (measured)'}, matmul "
        f"{mm_rate:.3g} FLOP/s{'' if MATMUL_FLOPS.value else f' ({mm_dtype}, measured)'}; median of "
        f"{REPEATS.value} calls")
  dcrf = pydensecrf_module() if "pydensecrf" in IMPLS.value else None
  if "pydensecrf" in IMPLS.value and dcrf is None:
    print("pydensecrf: not importable here (pip install pydensecrf2, which builds Krähenbühl's "
          "C++ code): rows skipped")

  header = ["size", "implementation", "forward ms", "fwd+bwd ms", "floor ms", "of floor",
            "pairs kept", "max |Q - xla|", "labels != xla"]
  widths = [9, 14, 11, 11, 9, 9, 10, 13, 13]

  def emit(cells):
    if MARKDOWN.value:
      print("| " + " | ".join(str(c) for c in cells) + " |")
    else:
      print(" ".join(f"{str(c):>{w}s}" if i >= 2 else f"{str(c):{w}s}"
                     for i, (c, w) in enumerate(zip(cells, widths))))

  emit(header)
  if MARKDOWN.value:
    print("|" + "---|" * len(header))
  notes = []
  accelerator = {"pallas_gpu": "gpu", "pallas_tpu": "tpu"}
  for height, width in sizes:
    image_np, logits_np, _ = scene(np, height, width, labels, SEED.value)
    image = jnp.asarray(image_np[None], jnp.float32)
    logits = jnp.asarray(logits_np[None])
    cotangent = jnp.asarray(np.random.default_rng(SEED.value + 1).normal(size=logits.shape), jnp.float32)
    n = height * width
    exps = n * n * iterations
    flops = 2 * n * n * (labels + 8) * iterations
    floor_fwd = max(exps / exp_rate, flops / mm_rate) * 1e3
    size = f"{height}x{width}"
    reference = None
    for name in IMPLS.value:
      if name == "pydensecrf":
        if dcrf is None:
          continue
        times = []
        for _ in range(REPEATS.value):
          start = time.perf_counter()
          q = run_pydensecrf(dcrf, np, image_np, logits_np, iterations)
          times.append(time.perf_counter() - start)
        fwd = statistics.median(times) * 1e3
        diff, differ = "-", "-"   # without an xla row there is nothing exact to compare with
        if reference is not None:
          diff = f"{np.abs(q - reference).max():.2e}"
          differ = f"{(q.argmax(-1) != reference.argmax(-1)).mean():.2%}"
        emit([size, "pydensecrf", f"{fwd:.1f}", "-", "-", "-", "-", diff, differ])
        continue
      kept = "-"
      if name.startswith("pallas"):
        kept = f"{pairs_kept(name, image):.1%}"
      if name in accelerator and platform != accelerator[name]:
        notes.append(f"{name}: no {accelerator[name].upper()} here; interpret mode is a "
                     "correctness tool, not timed")
        emit([size, name, "-", "-", "-", "-", kept, "-", "-"])
        continue
      if name == "pallas_gpu" and platform == "gpu" and float(getattr(device, "compute_capability", 0)) < 9:
        notes.append("pallas_gpu: needs Hopper (sm_90) or newer")
        continue
      forward = jax.jit(lambda lo, im, name=name: kernels.dense_crf(
          lo, im, iterations=iterations, implementation=name, **PARAMS))

      def loss(lo, bi_w, pos_w, im, name=name):
        params = dict(PARAMS, bi_w=bi_w, pos_w=pos_w)
        return jnp.sum(kernels.dense_crf(lo, im, iterations=iterations, implementation=name,
                                         **params) * cotangent)

      fwd_bwd = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
      fwd = median_ms(lambda: forward(logits, image), jax.block_until_ready, REPEATS.value)
      q = np.asarray(forward(logits, image))[0]
      bwd = (median_ms(lambda: fwd_bwd(logits, jnp.float32(PARAMS["bi_w"]), jnp.float32(PARAMS["pos_w"]), image),
                       jax.block_until_ready, REPEATS.value) if BACKWARD.value else None)
      if reference is None and name == "xla":
        reference = q
      of_floor = f"{floor_fwd / fwd:.1%}"
      if bwd is not None:
        of_floor += f" / {2 * floor_fwd / bwd:.1%}"
      diff = np.abs(q - reference).max() if reference is not None else float("nan")
      differ = (q.argmax(-1) != reference.argmax(-1)).mean() if reference is not None else float("nan")
      emit([size, name, f"{fwd:.1f}", f"{bwd:.1f}" if bwd is not None else "-",
            f"{floor_fwd:.1f}", of_floor, kept, f"{diff:.2e}", f"{differ:.2%}"])
  for note in dict.fromkeys(notes):
    print(f"note: {note}")
  print("floor: forward's (fwd+bwd's is twice it); 'of floor' = forward / fwd+bwd fractions")


if __name__ == "__main__":
  app.run(main)
