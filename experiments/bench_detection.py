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
               (weights=None) in its own process (experiments/peers/torchvision_detection.py,
               run by `--torch_python`, default this interpreter, when torch and torchvision
               import there): eval mode for inference, train mode + SGD for the step, images
               already at the size (its transform's min_size/max_size set to it), on CUDA with
               autocast (AMP, bfloat16) when torch sees a GPU, also without it; on a CPU in
               float32.
Ours is stepped by the trainer's own `train_step` function (zoo/training/trainer.py) with the
`detection` task and SGD (lr 1e-4), its state from the trainer's `create_train_state`.
Times are medians of `--repeats` timed calls after a warm-up call (compilation excluded), per
image, every row taking its turn call by call ("windows" lists every call). The floor is the
step's FLOPs (XLA's cost analysis of the compiled step) over the device's peak
(`benchmarking.peak_gflops`; `--peak_gflops` to give it), and "of floor" is floor / measured. XLA's cost analysis counts a conditional's branches as if they ran, so
Mask R-CNN's FLOPs include the mask head on all 128 slots per image although it skips the
chunks without a positive (`RCNN.mask_chunk`): its "of floor" overstates.
"""

import functools
import os

from absl import flags

from experiments import benchmarking

MODELS = flags.DEFINE_list("models", ["faster_rcnn_r50_fpn", "mask_rcnn_r50_fpn"], "Models.")
HEIGHT = flags.DEFINE_integer("height", 800, "Image height (a multiple of 32).")
WIDTH = flags.DEFINE_integer("width", 1344, "Image width (a multiple of 32; 1333 padded).")
BATCH_SIZE = flags.DEFINE_integer("batch_size", 2, "Images per step.")
DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype (ours).")
REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls per row.")
PEAK_GFLOPS = flags.DEFINE_float("peak_gflops", None, "Device peak GFLOP/s (default: estimated).")
BENCH = benchmarking.BenchmarkFlags(quick={"batch_size": 2, "height": 320, "width": 320,
                                           "repeats": 1})
NUM_OBJECTS = 20


def synthetic_batch(np, batch, height, width) -> dict:
  """Random images and NUM_OBJECTS random boxes (16-256 px), labels and box-filled masks each."""
  rng = np.random.default_rng(0)
  xy = rng.random((batch, NUM_OBJECTS, 2)) * [width - 64, height - 64]
  boxes = np.concatenate([xy, np.minimum(xy + 16 + rng.random(xy.shape) * 240, [width, height])],
                         -1)
  masks = np.zeros((batch, NUM_OBJECTS, height, width), bool)
  for b in range(batch):
    for k, (x1, y1, x2, y2) in enumerate(boxes[b].astype(int)):
      masks[b, k, y1:y2, x1:x2] = True
  return dict(image=rng.random((batch, height, width, 3), np.float32),
              boxes=boxes.astype(np.float32),
              labels=rng.integers(0, 90, (batch, NUM_OBJECTS)).astype(np.int32),
              objects_valid=np.ones((batch, NUM_OBJECTS), bool), instance_masks=masks)


def main():
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax

  import zoo
  from zoo.detection.task import Detection
  from zoo.training import trainer

  batch_size, height, width = (BENCH.setting(BATCH_SIZE), BENCH.setting(HEIGHT),
                               BENCH.setting(WIDTH))
  repeats = BENCH.setting(REPEATS)
  if height % 32 or width % 32:
    raise ValueError(f"--height and --width must be multiples of 32 (got {height}x{width}).")
  data = synthetic_batch(np, batch_size, height, width)
  peak, how = benchmarking.peak_gflops(jax, jnp, given=PEAK_GFLOPS.value,
                                       given_how="--peak_gflops", dtype=DTYPE.value)
  print(f"{batch_size} x {height}x{width}, {DTYPE.value}, {NUM_OBJECTS} objects per image; peak "
        f"{peak:.0f} GFLOP/s ({how})")
  print(benchmarking.device_line(jax))
  peer, note = benchmarking.start_peer("experiments.peers.torchvision_detection",
                                       BENCH.torch_python.value, "torchvision")
  if note:
    print(note)
  table = benchmarking.Table(
      ["model", "implementation", "inference ms/image", "train step ms/image",
       "train GFLOP/image", "of floor", "windows ms/image (inference | train)"],
      widths={"model": 19, "implementation": 30}, labels=2, markdown=BENCH.markdown.value)
  optimizer = optax.sgd(1e-4)

  for name in MODELS.value:
    model = zoo.create(name, dtype=jnp.dtype(DTYPE.value))
    task = Detection(model.num_classes, masks=model.masks)
    batch = jax.device_put(data)  # what training reads: the image and the targets
    first = {k: v[:1] for k, v in batch.items()}
    state = jax.jit(functools.partial(trainer.create_train_state, model, optimizer))(
        jax.random.key(0), task.model_inputs(first, train=False))
    step = jax.jit(functools.partial(trainer.train_step, model=model, task=task,
                                     optimizer=optimizer, schedule=optax.constant_schedule(1e-4)),
                   donate_argnums=0)
    step_rng = jax.random.key(1)
    cost = step.lower(state, batch, step_rng).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    flops = float(cost.get("flops", float("nan"))) / batch_size
    infer = jax.jit(lambda state, batch: model.apply(
        {"params": state.params, **state.model_state}, **task.model_inputs(batch, train=False),
        train=False)[0])
    train_state = jax.tree.map(jnp.copy, state)

    def train():
      nonlocal train_state
      train_state, metrics = step(train_state, batch, step_rng)
      return metrics["loss"]

    rows = {("zoo", "inference"): benchmarking.Timed(lambda: infer(state, batch),
                                                     jax.block_until_ready, calls=1),
            ("zoo", "train"): benchmarking.Timed(train, jax.block_until_ready, calls=1)}
    if peer is not None:
      spec = dict(model=name, batch_size=batch_size, height=height, width=width,
                  num_objects=NUM_OBJECTS, threads=len(os.sched_getaffinity(0)))
      try:
        for row_name, row in peer.prepare(spec).items():
          precision, part = row_name.split()
          rows[f"torchvision {precision}", part] = row
      except benchmarking.PeerError as e:
        table.row([name, benchmarking.peer_problem("torchvision", e)])
    timings = benchmarking.alternate(rows, repeats)
    for impl in dict.fromkeys(impl for impl, _ in rows):
      inference, train_timing = timings[impl, "inference"], timings[impl, "train"]
      if inference.error or train_timing.error:
        table.row([name, impl, f"failed: {inference.error or train_timing.error}"])
        continue
      per_image = train_timing.median / batch_size
      ours = impl == "zoo"
      table.row([name, impl, f"{1e3 * inference.median / batch_size:.1f}", f"{1e3 * per_image:.1f}",
                 f"{flops / 1e9:.1f}" if ours else "",
                 benchmarking.percent(flops / (peak * 1e9), per_image) if ours else "",
                 f"{inference.windows(1e3 / batch_size, 1)} | "
                 f"{train_timing.windows(1e3 / batch_size, 1)}"])
    del rows, state, train_state
  benchmarking.close_peer(peer)


if __name__ == "__main__":
  benchmarking.run(main)
