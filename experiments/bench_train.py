r"""Times one U-Net training step on the current device, against its physical floor and PyTorch.

    python -m experiments.bench_train [--batch_size=32 --image_size=64 --base_width=16 \
        --depth=3 --padding=SAME --norm=none --dtype=float32 --steps=10 --windows=5]

The step is what training does: forward, mean softmax cross-entropy over pixels, backward,
Adam update; jitted with the parameters and optimizer state donated, warmed up, timed with
`block_until_ready`. Rows:
  zoo     the zoo's `UNet` (up-convolution as one matmul + depth-to-space, max-pool as a
          reshape + max: zoo/layers/upsample.py, zoo/layers/pool.py);
  plain   the same network written the straightforward way (nn.ConvTranspose, nn.max_pool);
          same parameter tree, and the script checks that both give the same loss;
  torch   the same architecture in PyTorch (same widths, batch, resolution, Adam, float32,
          torch.set_num_threads(cores)), when `torch` is importable. Not a dependency.
The frameworks run in alternating windows of `--steps` steps and each row reports the median
over `--windows` windows (the best in brackets), so load from other processes on the machine
hits all rows alike.

The floor is the step's FLOPs (XLA's cost analysis of the un-optimised step: convolutions and
matmuls as 2 x multiply-adds, plus elementwise work) over the device's peak. On a CPU the peak
is estimated as cores x clock (/proc/cpuinfo) x fp32 lanes of the FMA datapath x FMA pipes
(2) x 2 FLOPs; AMD Zen 3/4 (family 0x19) execute AVX-512 as two 256-bit halves, so 8 lanes
there. A virtual machine reports its base clock, not its boost clock, so the script also
times a 2048^3 matmul and uses the larger of the two; `--peak_gflops` overrides both.
`--profile` adds where the zoo step's time goes, per kind of XLA operation (jax.profiler).
"""

import collections
import math
import os
import re
import statistics
import tempfile
import time

from absl import flags

from experiments.benchmarking import cpu_peak_gflops, measured_matmul_gflops

BATCH_SIZE = flags.DEFINE_integer("batch_size", 32, "Images per step.")
IMAGE_SIZE = flags.DEFINE_integer("image_size", 64, "Input height = width, pixels.")
BASE_WIDTH = flags.DEFINE_integer("base_width", 16, "Channels of the first U-Net stage.")
DEPTH = flags.DEFINE_integer("depth", 3, "Number of 2x2 max-pool downsamplings.")
PADDING = flags.DEFINE_enum("padding", "SAME", ["SAME", "VALID"], "U-Net padding.")
NORM = flags.DEFINE_enum("norm", "none", ["none", "batch"], "Normalisation after each 3x3 conv.")
UPSAMPLE = flags.DEFINE_enum("upsample", "transpose", ["transpose", "bilinear"], "Upsampling.")
NUM_CLASSES = flags.DEFINE_integer("num_classes", 11, "Output classes.")
DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "JAX compute dtype.")
STEPS = flags.DEFINE_integer("steps", 10, "Steps per timed window.")
WINDOWS = flags.DEFINE_integer("windows", 5, "Timed windows per row (alternating rows).")
WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps per row before timing.")
PEAK_GFLOPS = flags.DEFINE_float("peak_gflops", None, "Device peak GFLOP/s (default: estimated).")
TORCH = flags.DEFINE_bool("torch", True, "Also time PyTorch when it is importable.")
PLAIN = flags.DEFINE_bool("plain", True, "Also time the straightforward Flax formulation.")
PROFILE = flags.DEFINE_bool("profile", False, "Print the zoo step's time per kind of XLA op.")


def build_jax(model, variables, images, labels, optax, jax):
  """(jitted step, state): step(params, opt_state, extra) -> (params, opt_state, extra, loss)."""
  params, extra = variables["params"], {k: v for k, v in variables.items() if k != "params"}
  optimizer = optax.adam(1e-3)

  def loss_fn(params, extra):
    (logits, _), updates = model.apply({"params": params, **extra}, images, train=True,
                                       mutable=list(extra))
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, updates

  def step(params, opt_state, extra):
    (loss, extra), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, extra)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, dict(extra), loss

  return jax.jit(step, donate_argnums=(0, 1, 2)), (params, optimizer.init(params), extra)


def plain_unet_class(nn, jnp):
  """The zoo's U-Net written the straightforward way, with the same parameter tree."""
  from zoo.layers.crop import center_crop
  from zoo.segmentation.unet import DoubleConv, UNet

  class PlainUNet(UNet):

    @nn.compact
    def __call__(self, images, *, train: bool):
      stage = lambda f, name: DoubleConv(f, self.padding, self.norm, self.dtype, name=name)
      x, skips = images.astype(self.dtype), []
      for level in range(self.depth):
        x = stage(self.base_width * 2**level, f"encoder_{level}")(x, train=train)
        skips.append(x)
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
      x = stage(self.base_width * 2**self.depth, "bottleneck")(x, train=train)
      for level in reversed(range(self.depth)):
        features = self.base_width * 2**level
        x = nn.ConvTranspose(features, (2, 2), strides=(2, 2), padding="VALID",
                             dtype=self.dtype, name=f"up_{level}")(x)
        x = jnp.concatenate([center_crop(skips[level], x.shape[1:3]), x], axis=-1)
        x = stage(features, f"decoder_{level}")(x, train=train)
      logits = nn.Conv(self.num_classes, (1, 1), dtype=self.dtype, name="head")(x)
      return logits.astype(jnp.float32), {}

  return PlainUNet


def build_torch(torch, threads):
  """The same U-Net, training step and data in PyTorch (NCHW, float32)."""
  tnn, F = torch.nn, torch.nn.functional
  torch.set_num_threads(threads)
  torch.manual_seed(0)
  pad = 1 if PADDING.value == "SAME" else 0

  def double_conv(c_in, c_out):
    layers = []
    for c in (c_in, c_out):
      layers += [tnn.Conv2d(c, c_out, 3, padding=pad, bias=NORM.value == "none")]
      layers += [tnn.BatchNorm2d(c_out)] if NORM.value == "batch" else []
      layers += [tnn.ReLU()]
    return tnn.Sequential(*layers)

  class TorchUNet(tnn.Module):

    def __init__(self):
      super().__init__()
      widths = [BASE_WIDTH.value * 2**level for level in range(DEPTH.value + 1)]
      self.encoder = tnn.ModuleList(
          double_conv(c_in, c_out) for c_in, c_out in zip([3] + widths[:-2], widths[:-1]))
      self.bottleneck = double_conv(widths[-2], widths[-1])
      self.up, self.decoder = tnn.ModuleList(), tnn.ModuleList()
      for level in reversed(range(DEPTH.value)):
        if UPSAMPLE.value == "transpose":
          self.up.append(tnn.ConvTranspose2d(widths[level + 1], widths[level], 2, stride=2))
        else:
          self.up.append(tnn.Sequential(tnn.Upsample(scale_factor=2, mode="bilinear"),
                                        tnn.Conv2d(widths[level + 1], widths[level], 1)))
        self.decoder.append(double_conv(2 * widths[level], widths[level]))
      self.head = tnn.Conv2d(widths[0], NUM_CLASSES.value, 1)

    def forward(self, x):
      skips = []
      for stage in self.encoder:
        x = stage(x)
        skips.append(x)
        x = F.max_pool2d(x, 2)
      x = self.bottleneck(x)
      for up, stage in zip(self.up, self.decoder):
        x = up(x)
        skip = skips.pop()
        top, left = (skip.shape[2] - x.shape[2]) // 2, (skip.shape[3] - x.shape[3]) // 2
        skip = skip[:, :, top:top + x.shape[2], left:left + x.shape[3]]
        x = stage(torch.cat([skip, x], 1))
      return self.head(x)

  model = TorchUNet()
  optimizer = torch.optim.Adam(model.parameters(), 1e-3)
  images = torch.randn(BATCH_SIZE.value, 3, IMAGE_SIZE.value, IMAGE_SIZE.value)
  out_size = model(images[:1]).shape[2]
  labels = torch.randint(0, NUM_CLASSES.value, (BATCH_SIZE.value, out_size, out_size))

  def step():
    optimizer.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(images), labels)
    loss.backward()
    optimizer.step()
    return loss

  return step, sum(p.numel() for p in model.parameters())


def profile_breakdown(jax, compiled, kernel_sizes, run_steps) -> list[tuple[str, float]]:
  """Share of the XLA thunks' summed time per kind of operation, from a jax.profiler trace.

  Thunks are named after HLO instructions; the compiled HLO's metadata says which JAX
  operation each came from ("transpose(jvp(...))" marks the backward pass), and a backward
  convolution whose output has a kernel's element count is a weight gradient."""
  kinds = {}
  for line in compiled.as_text().splitlines():
    match = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = \w+\[([\d,]*)\]", line)
    if not match:
      continue
    name, dims = match.groups()
    metadata = re.search(r'op_name="([^"]*)"', line)
    op_name = metadata.group(1) if metadata else ""
    size = math.prod(int(d) for d in dims.split(",") if d)
    if "conv_general_dilated" in op_name and "transpose(" in op_name:
      kind = ("conv weight-gradient" if size in kernel_sizes else "conv input-gradient")
    elif "conv_general_dilated" in op_name:
      kind = "conv forward"
    elif "dot_general" in op_name:
      kind = "matmuls (up-convolution, 1x1 head)"
    elif "reduce_window" in op_name or "max_pool" in op_name or "iota" in name or (
        "scatter" in name):
      kind = "max-pooling (incl. its gradient)"
    elif "transpose" in name or "copy" in name:
      kind = "layout transposes and copies"
    else:
      kind = "elementwise, reductions (ReLU, bias, loss, Adam, ...)"
    kinds[name] = kind
  with tempfile.TemporaryDirectory() as directory:
    with jax.profiler.trace(directory):
      run_steps()
    paths = [os.path.join(root, f) for root, _, files in os.walk(directory) for f in files
             if f.endswith(".xplane.pb")]
    data = jax.profiler.ProfileData.from_file(paths[0])
  total = collections.Counter()
  for plane in data.planes:
    for line in plane.lines:
      if not line.name.startswith("tf_XLA"):
        continue
      for event in line.events:
        if event.name in kinds:
          total[kinds[event.name]] += event.duration_ns
  grand = sum(total.values()) or 1
  return [(kind, ns / grand) for kind, ns in total.most_common()]


def main(argv):
  if len(argv) > 1:
    raise ValueError(f"Unexpected arguments {argv[1:]}: every setting is a flag.")
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax

  import zoo

  hyper = dict(num_classes=NUM_CLASSES.value, base_width=BASE_WIDTH.value, depth=DEPTH.value,
               padding=PADDING.value, norm=NORM.value, upsample=UPSAMPLE.value, dtype=DTYPE.value)
  model = zoo.create("unet", **hyper)
  size = IMAGE_SIZE.value
  model.check_input_shape((BATCH_SIZE.value, size, size, 3))
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.standard_normal((BATCH_SIZE.value, size, size, 3)), jnp.float32)
  out = model.output_size(size)
  labels = jnp.asarray(rng.integers(0, NUM_CLASSES.value, (BATCH_SIZE.value, out, out)), jnp.int32)

  rows = {}
  variables = jax.jit(lambda: model.init(jax.random.key(0), images[:1], train=False))()
  step, state = build_jax(model, variables, images, labels, optax, jax)
  flops = step.lower(*state).cost_analysis()["flops"]
  rows["zoo"] = [step, state]
  if PLAIN.value and UPSAMPLE.value == "transpose":
    plain = plain_unet_class(nn, jnp)(**{**hyper, "dtype": jnp.dtype(DTYPE.value)})
    copy = lambda tree: jax.tree.map(jnp.copy, tree)
    plain_step, plain_state = build_jax(plain, copy(variables), images, labels, optax, jax)
    # Same parameters into both: the same loss, or the comparison is void.
    loss_zoo = step(copy(state[0]), copy(state[1]), copy(state[2]))[3]
    loss_plain = plain_step(copy(state[0]), copy(state[1]), copy(state[2]))[3]
    if abs(float(loss_zoo) - float(loss_plain)) > 1e-4 * abs(float(loss_zoo)):
      raise ValueError(f"zoo and plain U-Nets disagree: loss {loss_zoo} vs {loss_plain}.")
    rows["plain"] = [plain_step, plain_state]

  def run_jax(name, steps):
    step, state = rows[name]
    for _ in range(steps):
      *state, loss = step(*state)
    loss.block_until_ready()
    rows[name][1] = state

  threads = len(os.sched_getaffinity(0))
  runners = {name: (lambda steps, name=name: run_jax(name, steps)) for name in rows}
  torch_note = ""
  if TORCH.value:
    try:
      import torch
    except ImportError:
      torch_note = "torch not importable: no PyTorch row."
    else:
      if DTYPE.value != "float32":
        torch_note = "PyTorch row skipped: it runs float32 only here."
      else:
        torch_step, torch_params = build_torch(torch, threads)
        runners["torch"] = lambda steps: [torch_step() for _ in range(steps)]
        torch_note = f"torch {torch.__version__}, {torch.get_num_threads()} threads, " \
                     f"{torch_params:,} parameters"

  for run in runners.values():
    run(WARMUP.value)
  seconds = collections.defaultdict(list)
  for _ in range(WINDOWS.value):
    for name, run in runners.items():
      start = time.perf_counter()
      run(STEPS.value)
      seconds[name].append((time.perf_counter() - start) / STEPS.value)

  device = jax.devices()[0]
  measured = measured_matmul_gflops(jax, jnp)
  if PEAK_GFLOPS.value:
    peak, how = PEAK_GFLOPS.value, "--peak_gflops"
  elif device.platform == "cpu":
    nominal, how = cpu_peak_gflops()
    peak = max(nominal, measured)
    how = f"{how} = {nominal:.0f} GFLOP/s nominal; a 2048^3 matmul ran at {measured:.0f}"
  else:
    peak, how = measured, "a 2048^3 matmul (pass --peak_gflops for the datasheet peak)"
  floor = flops / (peak * 1e9)

  num_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(rows["zoo"][1][0]))
  print(f"U-Net training step: batch {BATCH_SIZE.value}, {size}x{size}x3 -> {out}x{out}x"
        f"{NUM_CLASSES.value}, widths {BASE_WIDTH.value}..{BASE_WIDTH.value * 2**DEPTH.value}, "
        f"{PADDING.value}, norm={NORM.value}, upsample={UPSAMPLE.value}, {DTYPE.value}, "
        f"Adam; {num_params:,} parameters")
  print(f"device: {device.device_kind} ({device.platform}), jax {jax.__version__}, "
        f"{threads} cores; {torch_note}")
  print(f"step FLOPs {flops / 1e9:.1f} G; peak {peak:.0f} GFLOP/s ({how}); "
        f"floor {floor * 1e3:.0f} ms/step = {1 / floor:.2f} steps/s")
  print(f"{'':6s} {'steps/s':>8s} {'(best)':>8s} {'images/s':>9s} {'ms/step':>8s} {'of floor':>9s}")
  rate = {}
  for name, times in seconds.items():
    median = statistics.median(times)
    rate[name] = 1 / median
    print(f"{name:6s} {1 / median:8.2f} {1 / min(times):8.2f} {BATCH_SIZE.value / median:9.1f} "
          f"{median * 1e3:8.1f} {floor / median:9.1%}")
  for name in ("plain", "torch"):
    if name in rate:
      print(f"zoo / {name}: {rate['zoo'] / rate[name]:.2f}x")
  if "plain" in rate and "torch" in rate:
    print(f"plain / torch: {rate['plain'] / rate['torch']:.2f}x")

  if PROFILE.value:
    step, state = rows["zoo"]
    compiled = step.lower(*state).compile()
    kernel_sizes = {int(np.prod(a.shape)) for a in jax.tree.leaves(state[0]) if a.ndim == 4}
    print("where the zoo step's XLA time goes (share of summed thunk time):")
    for kind, share in profile_breakdown(jax, compiled, kernel_sizes,
                                         lambda: runners["zoo"](STEPS.value)):
      print(f"  {share:6.1%}  {kind}")


if __name__ == "__main__":
  from experiments import launcher
  launcher.run(main)
