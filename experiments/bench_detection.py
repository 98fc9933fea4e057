r"""Times Faster R-CNN and Mask R-CNN (ResNet-50 + FPN) inference and training steps per image.

    python -m experiments.bench_detection [--models=faster_rcnn_r50_fpn,mask_rcnn_r50_fpn \
        --height=800 --width=1344 --batch_size=2 --dtype=float32 --repeats=3 \
        --torch_python=/path/to/python/with/torchvision]
    python -m experiments.bench_detection --quick     # 2 x 320x320: a smoke test on a CPU

The problem is the issue's: batch 2 at 800 x 1333 (padded to 800 x 1344, a multiple of 32),
torchvision's default sizes (90 classes + background, 2000/1000 proposals, 512 RoIs per image in training,
100 detections per image), random weights, random images, 20 random ground-truth boxes and
masks per image. Rows:
  zoo          our jitted model: `inference` = one jitted apply (train=False) to the padded
               detections; `train step` = loss, gradients and an SGD update, one jitted
               function (proposals, sampling and all);
  torchvision  `torchvision.models.detection.fasterrcnn_resnet50_fpn` / `maskrcnn_resnet50_fpn`
               (weights=None) in its own process (`--torch_python`, default this interpreter,
               when torch and torchvision import there): eval mode for inference, train mode +
               SGD for the step, images already at the size (its transform's min_size/max_size
               set to it), on CUDA with autocast (AMP, bfloat16) when torch sees a GPU, also
               without it; on a CPU in float32.
Times are medians of `--repeats` timed calls after a warm-up call (compilation excluded), per
image. The floor is the step's FLOPs (XLA's cost analysis of the compiled step) over the
device's peak (bench_train's estimate on a CPU; `--peak_gflops` to give it), and "of floor"
is floor / measured. XLA's cost analysis counts a conditional's branches as if they ran, so
Mask R-CNN's FLOPs include the mask head on all 128 slots per image although it skips the
chunks without a positive (`RCNN.mask_chunk`): its "of floor" overstates.
"""

import json
import subprocess
import sys
import time

from absl import app, flags

from experiments.benchmarking import cpu_peak_gflops, measured_matmul_gflops

MODELS = flags.DEFINE_list("models", ["faster_rcnn_r50_fpn", "mask_rcnn_r50_fpn"], "Models.")
HEIGHT = flags.DEFINE_integer("height", 800, "Image height (a multiple of 32).")
WIDTH = flags.DEFINE_integer("width", 1344, "Image width (a multiple of 32; 1333 padded).")
BATCH_SIZE = flags.DEFINE_integer("batch_size", 2, "Images per step.")
DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype (ours).")
REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls per row.")
QUICK = flags.DEFINE_bool("quick", False, "2 x 320x320, 1 repeat.")
TORCH_PYTHON = flags.DEFINE_string("torch_python", None,
                                   "Python with torch + torchvision (default: this one).")
PEAK_GFLOPS = flags.DEFINE_float("peak_gflops", None, "Device peak GFLOP/s (default: estimated).")
NUM_OBJECTS = 20

_TORCH_SCRIPT = r"""
import contextlib, json, sys, time
import torch, torchvision
from torchvision.models.detection import fasterrcnn_resnet50_fpn, maskrcnn_resnet50_fpn
name, batch, height, width, repeats = sys.argv[1], *map(int, sys.argv[2:6])
cuda = torch.cuda.is_available()
device = torch.device("cuda" if cuda else "cpu")
build = {"faster_rcnn_r50_fpn": fasterrcnn_resnet50_fpn, "mask_rcnn_r50_fpn": maskrcnn_resnet50_fpn}[name]
model = build(weights=None, weights_backbone=None, min_size=height, max_size=max(height, width)).to(device)
g = torch.Generator().manual_seed(0)
images = [torch.rand(3, height, width, generator=g).to(device) for _ in range(batch)]
targets = []
for _ in range(batch):
  xy = torch.rand(20, 2, generator=g) * torch.tensor([width - 64, height - 64])
  wh = 16 + torch.rand(20, 2, generator=g) * 240
  boxes = torch.cat([xy, torch.minimum(xy + wh, torch.tensor([width, height]))], 1)
  t = {"boxes": boxes.to(device), "labels": torch.randint(1, 91, (20,), generator=g).to(device)}
  if name.startswith("mask"):
    masks = torch.zeros(20, height, width, dtype=torch.uint8)
    for k, (x1, y1, x2, y2) in enumerate(boxes.int().tolist()):
      masks[k, y1:y2, x1:x2] = 1
    t["masks"] = masks.to(device)
  targets.append(t)
def timed(fn):
  fn()
  if cuda: torch.cuda.synchronize()
  out = []
  for _ in range(repeats):
    start = time.perf_counter(); fn()
    if cuda: torch.cuda.synchronize()
    out.append(time.perf_counter() - start)
  return sorted(out)[len(out) // 2]
rows = {}
optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
for amp in ([False, True] if cuda else [False]):
  precision = lambda: torch.autocast("cuda", dtype=torch.bfloat16) if amp else contextlib.nullcontext()
  def infer():
    with torch.no_grad(), precision():
      model(images)
  def step():
    with precision():
      losses = model(images, targets)
    optimizer.zero_grad(); sum(losses.values()).backward(); optimizer.step()
  model.eval(); t_inf = timed(infer); model.train(); t_step = timed(step)
  rows["amp" if amp else "fp32"] = {"inference": t_inf / batch, "train": t_step / batch}
print(json.dumps({"device": torch.cuda.get_device_name() if cuda else "cpu", "rows": rows}))
"""


def _torch_rows(name, batch, height, width, repeats):
  python = TORCH_PYTHON.value or sys.executable
  try:
    done = subprocess.run([python, "-c", _TORCH_SCRIPT, name, str(batch), str(height), str(width),
                           str(repeats)], capture_output=True, text=True, timeout=3600)
  except (OSError, subprocess.TimeoutExpired) as e:
    return None, f"torchvision not run: {e}"
  if done.returncode:
    return None, "torchvision not run: " + (done.stderr.strip().splitlines() or ["?"])[-1]
  return json.loads(done.stdout.strip().splitlines()[-1]), None


def main(argv):
  del argv
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax

  import zoo
  from zoo.detection.task import Detection

  batch, height, width, repeats = (BATCH_SIZE.value, HEIGHT.value, WIDTH.value, REPEATS.value)
  if QUICK.value:
    batch, height, width, repeats = 2, 320, 320, 1
  if height % 32 or width % 32:
    raise app.UsageError(f"--height and --width must be multiples of 32 (got {height}x{width}).")
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.random((batch, height, width, 3)), jnp.float32)
  xy = rng.random((batch, NUM_OBJECTS, 2)) * [width - 64, height - 64]
  boxes = np.concatenate([xy, np.minimum(xy + 16 + rng.random(xy.shape) * 240, [width, height])], -1)
  masks = np.zeros((batch, NUM_OBJECTS, height, width), bool)
  for b in range(batch):
    for k, (x1, y1, x2, y2) in enumerate(boxes[b].astype(int)):
      masks[b, k, y1:y2, x1:x2] = True
  targets = dict(boxes=jnp.asarray(boxes, jnp.float32),
                 labels=jnp.asarray(rng.integers(0, 90, (batch, NUM_OBJECTS)), jnp.int32),
                 objects_valid=jnp.ones((batch, NUM_OBJECTS), bool),
                 instance_masks=jnp.asarray(masks))

  device = jax.devices()[0]
  if PEAK_GFLOPS.value:
    peak, how = PEAK_GFLOPS.value, "--peak_gflops"
  elif device.platform == "cpu":
    nominal, how = cpu_peak_gflops()
    peak = max(nominal, measured_matmul_gflops(jax, jnp))
  else:
    peak, how = measured_matmul_gflops(jax, jnp), "a 2048^3 matmul (pass --peak_gflops)"
  print(f"device {device.device_kind} ({device.platform}), jax {jax.__version__}, "
        f"{batch} x {height}x{width}, {DTYPE.value}; peak {peak:.0f} GFLOP/s ({how})")
  print("| model | implementation | inference ms/image | train step ms/image | train GFLOP/image | "
        "of floor |")
  print("| --- | --- | --- | --- | --- | --- |")

  def median_time(fn, *args):
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]

  for name in MODELS.value:
    model = zoo.create(name, dtype=jnp.dtype(DTYPE.value))
    task = Detection(model.num_classes, masks=model.masks)
    variables = jax.jit(lambda key: model.init({"params": key}, images[:1], train=False))(
        jax.random.key(0))
    optimizer = optax.sgd(1e-4)
    opt_state = optimizer.init(variables["params"])
    model_targets = {k: targets[k] for k in task.model_targets}

    @jax.jit
    def step(params, opt_state, key):
      def loss(params):
        (outputs, _), _ = model.apply({**variables, "params": params}, images, train=True,
                                      targets=model_targets, rngs={"sampling": key},
                                      mutable=["batch_stats"])
        return task.loss(outputs, {})[0]
      grads = jax.grad(loss)(params)
      updates, opt_state = optimizer.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state

    infer = jax.jit(lambda v, x: model.apply(v, x, train=False)[0])
    t_inf = median_time(infer, variables, images)
    compiled = step.lower(variables["params"], opt_state, jax.random.key(1)).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    flops = float(cost.get("flops", float("nan"))) / batch
    t_step = median_time(step, variables["params"], opt_state, jax.random.key(1))
    floor = flops / (peak * 1e9)
    print(f"| {name} | zoo | {1e3 * t_inf / batch:.1f} | {1e3 * t_step / batch:.1f} | "
          f"{flops / 1e9:.1f} | {floor / (t_step / batch):.1%} |", flush=True)
    result, why = _torch_rows(name, batch, height, width, repeats)
    if result is None:
      print(f"| {name} | {why} | | | | |")
      continue
    for mode, row in result["rows"].items():
      print(f"| {name} | torchvision {mode} ({result['device']}) | {1e3 * row['inference']:.1f} | "
            f"{1e3 * row['train']:.1f} | | |", flush=True)


if __name__ == "__main__":
  app.run(main)
