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
  pydensecrf   Krähenbühl's C++ code (pydensecrf / pydensecrf2) on one CPU core, in a process
               of its own (experiments/peers/pydensecrf_mean_field.py, run by `--torch_python`,
               default this interpreter) when it imports there: APPROXIMATE (permutohedral
               lattice, which also blurs each pixel with itself), run with NO_NORMALIZATION and
               Potts compatibilities, the semantics closest to ours; its row reports how many
               pixels' labels (argmax) differ from the exact xla result. It has no backward.
Pallas rows on a machine without their accelerator would run in interpret mode (a correctness
tool, far too slow to time): they are not timed, only their "pairs kept" is printed.

Columns: forward = Q from (logits, image); fwd+bwd = Q and the gradient of sum(Q * cotangent)
with respect to the logits, bi_w and pos_w (the CRF-as-RNN training step's CRF part); jitted,
warm-up excluded, median of --repeats calls, one call per window, the rows of a size taking
turns window by window ("windows" lists them all: forward | fwd+bwd). "pairs kept" is the fraction of (query tile, key
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

import os

from absl import flags

from experiments import benchmarking

IMPLEMENTATIONS = ("xla", "pallas_gpu", "pallas_tpu", "pydensecrf")
SIZES = flags.DEFINE_list("sizes", ["321x321", "500x375"], "Images as HxW (rows x columns).")
LABELS = flags.DEFINE_integer("labels", 21, "L, labels.")
ITERATIONS = flags.DEFINE_integer("iterations", 10, "Mean-field iterations.")
IMPLS = flags.DEFINE_list("implementations", list(IMPLEMENTATIONS),
                          f"Which implementations, from {IMPLEMENTATIONS}.")
BACKWARD = flags.DEFINE_bool("backward", True, "Also time forward+backward.")
REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls per row; the median is reported.")
SEED = flags.DEFINE_integer("seed", 0, "Seed of the synthetic scene, logits and cotangent.")
EXP_RATE = flags.DEFINE_float("exp_rate", None, "Exponentials per second (default: measured).")
MATMUL_FLOPS = flags.DEFINE_float("matmul_flops", None, "Matmul FLOP/s (default: measured).")
BENCH = benchmarking.BenchmarkFlags(quick={"sizes": ["96x128"]})

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


def exp_rate(jax, jnp, platform) -> float:
  """Exponentials per second on the default device, in the filter's own pattern:
  exp(-(a_i - b_j)^2) summed over j, fused, no memory traffic."""
  m = 2048 if platform == "cpu" else 16384
  a = jnp.linspace(0.0, 1.0, m, dtype=jnp.float32)
  f = jax.jit(lambda a, b: jnp.sum(jnp.exp(-jnp.square(a[:, None] - b[None, :])), axis=1))
  timed = benchmarking.Timed(lambda: f(a, a + 0.5), jax.block_until_ready, calls=1)
  return m * m / benchmarking.alternate({"exp": timed}, 5)["exp"].median


def main():
  import jax
  import jax.numpy as jnp
  import numpy as np

  import kernels
  from kernels.crf.api import tile_pairs_kept

  requested = benchmarking.checked_names(IMPLS, IMPLEMENTATIONS)
  try:
    sizes = [tuple(int(v) for v in s.lower().split("x")) for s in BENCH.setting(SIZES)]
  except ValueError:
    raise ValueError(f"--sizes takes HxW values such as 321x321, got {SIZES.value}.") from None
  device = jax.devices()[0]
  platform = device.platform
  exps_per_s = EXP_RATE.value or exp_rate(jax, jnp, platform)
  mm_dtype = "float32" if platform == "cpu" else "bfloat16"
  mm_flops = MATMUL_FLOPS.value or 1e9 * benchmarking.measured_matmul_gflops(
      jax, jnp, 2048 if platform == "cpu" else 4096, jnp.dtype(mm_dtype))
  labels, iterations, repeats = LABELS.value, ITERATIONS.value, REPEATS.value
  print(f"dense CRF mean field: L={labels}, {iterations} iterations, {PARAMS}")
  print(benchmarking.device_line(jax))
  print(f"exp rate {exps_per_s:.3g}/s{'' if EXP_RATE.value else ' (measured)'}, matmul "
        f"{mm_flops:.3g} FLOP/s{'' if MATMUL_FLOPS.value else f' ({mm_dtype}, measured)'}; median "
        f"of {repeats} calls, the rows of a size taking turns")
  peer = None
  if "pydensecrf" in requested:
    peer, note = benchmarking.start_peer("experiments.peers.pydensecrf_mean_field",
                                         BENCH.torch_python.value, "pydensecrf")
    if note:
      print(f"{note}: rows skipped (pip install pydensecrf2 builds Krähenbühl's C++ code)")

  table = benchmarking.Table(
      ["size", "implementation", "forward ms", "fwd+bwd ms", "floor ms", "of floor",
       "pairs kept", "max |Q - xla|", "labels != xla", "windows ms"],
      widths={"size": 9, "of floor": 13}, labels=2, markdown=BENCH.markdown.value)
  notes = []
  for height, width in sizes:
    image_np, logits_np, _ = scene(np, height, width, labels, SEED.value)
    image = jnp.asarray(image_np[None], jnp.float32)
    logits = jnp.asarray(logits_np[None])
    cotangent = jnp.asarray(np.random.default_rng(SEED.value + 1).normal(size=logits.shape),
                            jnp.float32)
    n = height * width
    floor_fwd = max(n * n * iterations / exps_per_s,
                    2 * n * n * (labels + 8) * iterations / mm_flops)
    size = f"{height}x{width}"
    rows, kept = {}, {}
    for name in requested:
      if name == "pydensecrf":
        continue
      if name.startswith("pallas"):
        fraction = tile_pairs_kept(image, bi_xy_std=PARAMS["bi_xy_std"],
                                   bi_rgb_std=PARAMS["bi_rgb_std"], implementation=name)[0]
        kept[name] = f"{float(fraction):.1%}"
      reason = benchmarking.without_accelerator(name, platform)
      if reason:
        notes.append(f"{name}: not timed, {reason}")
        continue
      if name == "pallas_gpu" and float(device.compute_capability) < 9:
        notes.append("pallas_gpu: needs Hopper (sm_90) or newer")
        continue
      forward = jax.jit(lambda lo, im, name=name: kernels.dense_crf(
          lo, im, iterations=iterations, implementation=name, **PARAMS))

      def loss(lo, bi_w, pos_w, im, name=name):
        params = dict(PARAMS, bi_w=bi_w, pos_w=pos_w)
        return jnp.sum(kernels.dense_crf(lo, im, iterations=iterations, implementation=name,
                                         **params) * cotangent)

      fwd_bwd = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
      weights = jnp.float32(PARAMS["bi_w"]), jnp.float32(PARAMS["pos_w"])
      rows[name, "forward"] = benchmarking.Timed(lambda forward=forward: forward(logits, image),
                                                 jax.block_until_ready, calls=1)
      if BACKWARD.value:
        rows[name, "fwd+bwd"] = benchmarking.Timed(
            lambda fwd_bwd=fwd_bwd: fwd_bwd(logits, *weights, image), jax.block_until_ready,
            calls=1)
    if peer is not None:
      spec = dict(inputs=os.path.join(peer.directory, "inputs.npz"),
                  outputs=os.path.join(peer.directory, "outputs.npz"), iterations=iterations,
                  params=PARAMS)
      np.savez(spec["inputs"], image=image_np, logits=logits_np)
      try:
        rows["pydensecrf", "forward"] = peer.prepare(spec)["forward"]
      except benchmarking.PeerError as e:
        table.row([size, "pydensecrf", benchmarking.peer_problem("pydensecrf", e)])
    timings = benchmarking.alternate(rows, repeats)

    reference = None
    for name in requested:
      if (name, "forward") not in rows:
        if name in kept:
          table.row([size, name, "-", "-", "-", "-", kept[name], "-", "-"])
        continue
      fwd, bwd = timings[name, "forward"], timings.get((name, "fwd+bwd"))
      error = fwd.error or (bwd.error if bwd else "")
      if error:
        table.row([size, name, f"failed: {error}"])
        continue
      if name == "pydensecrf":
        peer.report()
        q = np.load(spec["outputs"])["q"]
      else:
        q = np.asarray(rows[name, "forward"].result)[0]
      if reference is None and name == "xla":
        reference = q
      of_floor = benchmarking.percent(floor_fwd, fwd.median)
      if bwd:
        of_floor += f" / {benchmarking.percent(2 * floor_fwd, bwd.median)}"
      diff, differ = "-", "-"  # without an xla row there is nothing exact to compare with
      if reference is not None:
        diff = f"{np.abs(q - reference).max():.2e}"
        differ = f"{(q.argmax(-1) != reference.argmax(-1)).mean():.2%}"
      table.row([size, name, f"{fwd.median * 1e3:.1f}", f"{bwd.median * 1e3:.1f}" if bwd else "-",
                 f"{floor_fwd * 1e3:.1f}" if name != "pydensecrf" else "-",
                 of_floor if name != "pydensecrf" else "-", kept.get(name, "-"), diff, differ,
                 fwd.windows(digits=1) + (f" | {bwd.windows(digits=1)}" if bwd else "")])
  for note in dict.fromkeys(notes):
    print(f"note: {note}")
  benchmarking.close_peer(peer)
  print("floor: forward's (fwd+bwd's is twice it); 'of floor' = forward / fwd+bwd fractions")


if __name__ == "__main__":
  benchmarking.run(main)
