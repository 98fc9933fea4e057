r"""Times the trainer's U-Net training step on the current device, against its floor and PyTorch.

    python -m experiments.bench_train [--batch_size=32 --image_size=64 --base_width=16 \
        --depth=3 --padding=SAME --norm=none --dtype=float32 --steps=10 --windows=5 \
        --torch_python=/path/to/python-with-torch]
    python -m experiments.bench_train --quick      # a narrow U-Net: a smoke test of the script

The step is the trainer's own: `zoo.training.Experiment(config)` built from
experiments/configs/unet.py (variant `res=<--image_size>`, the digit canvases of that size)
with the model, batch size and dtype the flags give, initialised by `experiment.init_state()`
and stepped by `experiment.train_step(state, batch)` as the training loop steps it: the host
batch sharded onto the mesh, forward, the task's loss (softmax cross-entropy over the pixels),
backward, the config's optimizer (Adam, gradients clipped to global norm 1, cosine schedule),
state donated. One batch of the training pipeline is reused for every step (BENCHMARKS.md has
the pipeline's own speed). Rows:
  zoo     the zoo's `UNet` (up-convolution as one matmul + depth-to-space, max-pool as a
          reshape + max: zoo/layers/upsample.py, zoo/layers/pool.py), experiment.train_step;
  plain   the same network written the straightforward way (nn.ConvTranspose, nn.max_pool),
          same parameter tree, stepped by the trainer's `train_step` function with the same
          task and optimizer; the script checks that both give the same loss from one state;
  torch   the same architecture in PyTorch (same widths, batch, resolution, Adam with the
          config's learning rate and clipping, float32, random data, torch.set_num_threads(cores)),
          in a process of its own (experiments/peers/torch_unet_train_step.py, run by
          `--torch_python`, default this interpreter) when torch imports there; next to XLA's
          thread pool in one process it was found starved of threads. Not a dependency.
The rows run in alternating windows of `--steps` steps and each reports the median over
`--windows` windows (the best in brackets, "windows" all of them), so load from other
processes on the machine hits all rows alike.

The floor is the step's FLOPs (XLA's cost analysis of the trainer's un-optimised step:
convolutions and matmuls as 2 x multiply-adds, plus elementwise work) over the device's peak
(`benchmarking.peak_gflops`: on a CPU cores x clock x fp32 lanes of the FMA datapath x 2 FMA
pipes x 2, or a timed 2048^3 matmul if faster, as a virtual machine reports its base clock;
on an accelerator a timed 8192^3 matmul); `--peak_gflops` overrides both.
`--profile` adds where the zoo step's time goes, per kind of XLA operation (jax.profiler).
"""

import collections
import functools
import math
import os
import re
import tempfile

from absl import flags

from experiments import benchmarking

BATCH_SIZE = flags.DEFINE_integer("batch_size", 32, "Images per step.")
IMAGE_SIZE = flags.DEFINE_integer("image_size", 64, "Input height = width, pixels (64 or 96: "
                                  "the digit canvases' sizes).")
BASE_WIDTH = flags.DEFINE_integer("base_width", 16, "Channels of the first U-Net stage.")
DEPTH = flags.DEFINE_integer("depth", 3, "Number of 2x2 max-pool downsamplings.")
PADDING = flags.DEFINE_enum("padding", "SAME", ["SAME", "VALID"], "U-Net padding.")
NORM = flags.DEFINE_enum("norm", "none", ["none", "batch"], "Normalisation after each 3x3 conv.")
UPSAMPLE = flags.DEFINE_enum("upsample", "transpose", ["transpose", "bilinear"], "Upsampling.")
NUM_CLASSES = flags.DEFINE_integer("num_classes", 11, "Output classes (the canvases have 11).")
DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "JAX compute dtype.")
STEPS = flags.DEFINE_integer("steps", 10, "Steps per timed window.")
WINDOWS = flags.DEFINE_integer("windows", 5, "Timed windows per row (alternating rows).")
WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps per row before timing.")
PEAK_GFLOPS = flags.DEFINE_float("peak_gflops", None, "Device peak GFLOP/s (default: estimated).")
TORCH = flags.DEFINE_bool("torch", True, "Also time PyTorch when it is importable.")
PLAIN = flags.DEFINE_bool("plain", True, "Also time the straightforward Flax formulation.")
PROFILE = flags.DEFINE_bool("profile", False, "Print the zoo step's time per kind of XLA op.")
BENCH = benchmarking.BenchmarkFlags(quick={"batch_size": 8, "base_width": 8, "depth": 2,
                                           "steps": 2, "windows": 3, "warmup": 1})


def experiment_config():
  """experiments/configs/unet.py at --image_size, with the model and batch the flags give."""
  from experiments.configs import unet

  config = unet.get_config(f"res={IMAGE_SIZE.value}")
  config.model.update(width=BENCH.setting(BASE_WIDTH), depth=BENCH.setting(DEPTH),
                      padding=PADDING.value, norm=NORM.value, upsample=UPSAMPLE.value)
  config.model.dtype = DTYPE.value
  config.model.num_classes = NUM_CLASSES.value  # the task's too (one FieldReference)
  config.batch_size = BENCH.setting(BATCH_SIZE)
  return config


def plain_unet(model_config, nn, jnp):
  """The zoo's UNet with `model_config`'s hyper-parameters, written the straightforward way
  (nn.ConvTranspose, nn.max_pool), with the same parameter tree."""
  from zoo.layers.crop import center_crop
  from zoo.segmentation.unet import DoubleConv, UNet

  class PlainUNet(UNet):

    @nn.compact
    def __call__(self, images, *, train: bool):
      stage = lambda f, name: DoubleConv(f, self.padding, self.norm, self.dtype, name=name)
      x, skips = images.astype(self.dtype), []
      for level in range(self.depth):
        x = stage(self.width * 2**level, f"encoder_{level}")(x, train=train)
        skips.append(x)
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
      x = stage(self.width * 2**self.depth, "bottleneck")(x, train=train)
      for level in reversed(range(self.depth)):
        features = self.width * 2**level
        x = nn.ConvTranspose(features, (2, 2), strides=(2, 2), padding="VALID",
                             dtype=self.dtype, name=f"up_{level}")(x)
        x = jnp.concatenate([center_crop(skips[level], x.shape[1:3]), x], axis=-1)
        x = stage(features, f"decoder_{level}")(x, train=train)
      logits = nn.Conv(self.num_classes, (1, 1), dtype=self.dtype, name="head")(x)
      return logits.astype(jnp.float32), {}

  hyperparameters = {k: v for k, v in model_config.items() if k != "name"}
  hyperparameters["dtype"] = jnp.dtype(hyperparameters["dtype"])
  return PlainUNet(**hyperparameters)


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


def main():
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import numpy as np

  from zoo.training import trainer

  config = experiment_config()
  experiment = trainer.Experiment(config)
  batch = next(iter(experiment.train_iterator()))
  state = experiment.init_state()
  # The trainer's step function, jitted alone: for its FLOPs, the profile and the plain row.
  step_of = lambda model: jax.jit(functools.partial(
      trainer.train_step, model=model, task=experiment.task, optimizer=experiment.optimizer,
      schedule=experiment.schedule), donate_argnums=0)
  zoo_step, step_rng = step_of(experiment.model), jax.random.key(0)
  flops = zoo_step.lower(state, batch, step_rng).cost_analysis()["flops"]
  copy = lambda tree: jax.tree.map(jnp.copy, tree)

  def stepping(step):
    """step(state, batch) -> (state, metrics) as a timed call that carries its own state."""
    current = copy(state)

    def run():
      nonlocal current
      current, metrics = step(current, batch)
      return metrics["loss"]

    return benchmarking.Timed(run, jax.block_until_ready, calls=BENCH.setting(STEPS),
                              warmup=BENCH.setting(WARMUP))

  rows = {"zoo": stepping(experiment.train_step)}
  if PLAIN.value and UPSAMPLE.value == "transpose":
    plain_step = step_of(plain_unet(config.model, nn, jnp))
    # The same state into both: the same loss, or the comparison is void.
    loss_zoo = float(experiment.train_step(copy(state), batch)[1]["loss"])
    loss_plain = float(plain_step(copy(state), batch, step_rng)[1]["loss"])
    if abs(loss_zoo - loss_plain) > 1e-4 * abs(loss_zoo):
      raise ValueError(f"zoo and plain U-Nets disagree: loss {loss_zoo} vs {loss_plain}.")
    rows["plain"] = stepping(lambda state, batch: plain_step(state, batch, step_rng))

  threads = len(os.sched_getaffinity(0))
  torch_note, peer = "", None
  if not TORCH.value:
    torch_note = "no PyTorch row (--notorch)"
  elif DTYPE.value != "float32":
    torch_note = "PyTorch row skipped: it runs float32 only here."
  else:
    peer, torch_note = benchmarking.start_peer("experiments.peers.torch_unet_train_step",
                                               BENCH.torch_python.value, "torch")
  if peer is not None:
    model = config.model
    spec = dict(batch_size=config.batch_size, image_size=IMAGE_SIZE.value, base_width=model.width,
                depth=model.depth, padding=model.padding, norm=model.norm,
                upsample=model.upsample, num_classes=model.num_classes,
                learning_rate=config.optimizer.learning_rate,
                grad_clip_norm=config.optimizer.grad_clip_norm, steps=BENCH.setting(STEPS),
                warmup=BENCH.setting(WARMUP), threads=threads)
    try:
      rows.update(peer.prepare(spec))
      torch_note = (f"{peer.info['versions']}, {peer.info['parameters']:,} parameters "
                    "(own process)")
    except benchmarking.PeerError as e:
      torch_note = benchmarking.peer_problem("torch", e)

  timings = benchmarking.alternate(rows, BENCH.setting(WINDOWS))
  peak, how = benchmarking.peak_gflops(jax, jnp, given=PEAK_GFLOPS.value,
                                       given_how="--peak_gflops", dtype=DTYPE.value)
  floor = flops / (peak * 1e9)

  num_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(state.params))
  model, size = config.model, IMAGE_SIZE.value
  out = experiment.model.output_size(size)
  print(f"U-Net training step (zoo.training.Experiment on experiments/configs/unet.py): batch "
        f"{config.batch_size}, {size}x{size}x3 -> {out}x{out}x{model.num_classes}, widths "
        f"{model.width}..{model.width * 2**model.depth}, {model.padding}, norm={model.norm}, "
        f"upsample={model.upsample}, {DTYPE.value}, {config.optimizer.name}; "
        f"{num_params:,} parameters")
  print(f"{benchmarking.device_line(jax)}; {torch_note}")
  print(f"step FLOPs {flops / 1e9:.1f} G; peak {peak:.0f} GFLOP/s ({how}); "
        f"floor {floor * 1e3:.0f} ms/step = {1 / floor:.2f} steps/s")
  table = benchmarking.Table(["", "steps/s", "(best)", "images/s", "ms/step", "of floor",
                              "windows ms/step"], widths={"": 6, "steps/s": 8, "(best)": 8},
                             markdown=BENCH.markdown.value)
  rate = {}
  for name, timing in timings.items():
    if timing.error:
      table.row([name, f"failed: {timing.error}"])
      continue
    rate[name] = 1 / timing.median
    table.row([name, f"{1 / timing.median:.2f}", f"{1 / timing.best:.2f}",
               f"{config.batch_size / timing.median:.1f}", f"{timing.median * 1e3:.1f}",
               benchmarking.percent(floor, timing.median), timing.windows(digits=1)])
  for name in ("plain", "torch"):
    if name in rate and "zoo" in rate:
      print(f"zoo / {name}: {rate['zoo'] / rate[name]:.2f}x")
  if "plain" in rate and "torch" in rate:
    print(f"plain / torch: {rate['plain'] / rate['torch']:.2f}x")
  if peer is not None:
    peer.close()

  if PROFILE.value:
    kernel_sizes = {int(np.prod(a.shape)) for a in jax.tree.leaves(state.params) if a.ndim == 4}
    compiled = zoo_step.lower(state, batch, step_rng).compile()
    timed = stepping(lambda state, batch: zoo_step(state, batch, step_rng))
    timed.warm_up()
    print("where the zoo step's XLA time goes (share of summed thunk time):")
    for kind, share in profile_breakdown(jax, compiled, kernel_sizes, timed.window):
      print(f"  {share:6.1%}  {kind}")


if __name__ == "__main__":
  benchmarking.run(main)
