r"""Times Swin's window attention (kernels/) and whole Swin-T / ViT-B/16 training steps.

    python -m experiments.bench_swin [--parts=kernel,train --implementations=xla,pallas_tpu \
        --dtypes=float32,bfloat16 --stages=1,3 --shifts=0,3 --kernel_batch=64 \
        --models=swin_t,vit_b16 --batch_size=64 --train_dtype=auto \
        --torch_python=/path/to/python-with-torch-and-timm]
    python -m experiments.bench_swin --quick       # small batches: a smoke test, minutes on a CPU

Part "kernel": `kernels.window_attention` on the attention of Swin-T at 224x224 (window M = 7,
head dim 32): stage 1 is a (B, 56, 56, 3 * 96) qkv map with 3 heads, stage 3 a (B, 14, 14,
3 * 384) map with 12 heads; B = --kernel_batch (64). Each stage runs unshifted and shifted by
M // 2 = 3 (--shifts). Rows, one per (stage, shift, implementation, dtype), for every
implementation `kernels.IMPLEMENTATIONS` lists but "auto" (`--implementations` narrows them): a
Pallas one on a
machine without its accelerator would run in Pallas interpret mode, which is a correctness
tool, not a benchmark, so it is skipped with a note (unless `--interpret`, for smoke tests).
  forward   the op alone;
  fwd+bwd   the op and its VJP with a fixed random cotangent: the output and the gradients of
            sum(out * cotangent) with respect to qkv and the relative position bias table;
both jitted, inputs on the device, compilation excluded, timed with `jax.block_until_ready`;
each repeat is a window of calls lasting at least --min_window_ms, the implementations of one
configuration take turns window by window, and the row reports the median of --repeats
windows ("windows" lists them all). The byte floor is the traffic nothing can avoid: qkv and the table read
once and the output written once; fwd+bwd adds the cotangent read once and the qkv and table
gradients written once. It is divided by the device's bandwidth, measured with an in-place
`x + 1` over a 256 MiB float32 array (read + write counted, best of 10 windows; the array is
donated so no call times page faults), and "of floor" = floor time / measured time. "max abs
diff vs xla" compares output / qkv gradient with the xla row (float32).

Part "train": one training step of the zoo's `swin_t` and `vit_b16` (1000 classes, 224x224,
no dropout or drop path, so that both frameworks do the same work): forward, mean softmax
cross-entropy, backward, optax AdamW (lr 1e-3, weight decay 0.05), jitted with parameters and
optimizer state donated, on random images and labels; compute dtype --train_dtype ("auto":
bfloat16 on an accelerator, float32 on a CPU; parameters stay float32). Reported in images/s
(median over --windows windows of --steps steps, after --warmup steps; "windows" lists them
all). The peer is timm's `swin_tiny_patch4_window7_224` / `vit_base_patch16_224` (same sizes,
drop_path_rate 0, torch.optim.AdamW), timed in its OWN process
(experiments/peers/timm_train_step.py, run by `--torch_python`, default this interpreter; it
needs torch and timm, not jax): timing it in-process next to XLA's thread pool was found to be
contended. Its windows alternate with ours, model by model. On a GPU the peer runs eager and torch.compile'd, both under bfloat16 autocast; on a
CPU eager float32 only, with torch.set_num_threads(cores). The FLOP floor is XLA's cost
analysis of our step over the device's peak (`benchmarking.peak_gflops`: on a CPU cores x
clock x fp32 FMA lanes x 2 pipes x 2, or a timed 2048^3 matmul if faster, as a VM reports its
base clock; on an accelerator a timed 8192^3 matmul in the step's dtype); --peak_tflops
overrides both.

Imports jax, numpy, absl, kernels (and zoo, optax, flax for part "train").
"""

import os
import statistics

from absl import flags

from experiments import benchmarking

PARTS = ("kernel", "train")
MODELS = {"swin_t": "swin_tiny_patch4_window7_224", "vit_b16": "vit_base_patch16_224"}
# Swin-T's attention at 224x224: stage -> (tokens per side, heads); channels = heads * 32.
SWIN_T_STAGES = {1: (56, 3), 2: (28, 6), 3: (14, 12), 4: (7, 24)}
SWIN_T_WINDOW, SWIN_T_HEAD_DIM = 7, 32

PARTS_FLAG = flags.DEFINE_list("parts", list(PARTS), f"What to time, from {PARTS}.")
IMPLS = flags.DEFINE_list("implementations", None,
                          "window_attention implementations (default: every one of "
                          "kernels.IMPLEMENTATIONS but auto).")
DTYPES = flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "qkv dtypes of the kernel rows.")
STAGES = flags.DEFINE_list("stages", ["1", "3"], "Swin-T stages (1-4) whose attention to time.")
SHIFTS = flags.DEFINE_list("shifts", ["0", "3"], "Cyclic shifts, tokens (0 <= shift < 7).")
KERNEL_BATCH = flags.DEFINE_integer("kernel_batch", 64, "B of the kernel rows.")
MODELS_FLAG = flags.DEFINE_list("models", list(MODELS), f"Train: models, from {tuple(MODELS)}.")
BATCH_SIZE = flags.DEFINE_integer("batch_size", None,
                                  "Train: images per step (default 64 on an accelerator, 4 on "
                                  "a CPU).")
IMAGE_SIZE = flags.DEFINE_integer("image_size", 224, "Train: image side, pixels.")
TRAIN_DTYPE = flags.DEFINE_enum("train_dtype", "auto", ["auto", "float32", "bfloat16"],
                                "Train: compute dtype of our models (auto: bfloat16 on an "
                                "accelerator, float32 on a CPU).")
STEPS = flags.DEFINE_integer("steps", 10, "Train: steps per timed window.")
WINDOWS = flags.DEFINE_integer("windows", 5, "Train: timed windows per row (median).")
WARMUP = flags.DEFINE_integer("warmup", 3, "Train: untimed steps after compilation.")
PEAK_TFLOPS = flags.DEFINE_float("peak_tflops", None, "Device peak TFLOP/s (default: estimated).")
SEED = flags.DEFINE_integer("seed", 0, "Seed of the inputs.")
BENCH = benchmarking.BenchmarkFlags(kernel=True, quick={
    "kernel_batch": 2, "repeats": 3, "batch_size": 2, "steps": 2, "windows": 3, "warmup": 1})


# ------------------------------------------------------------------------------------------------
# Part "kernel"


def kernel_part(jax, jnp, np, platform):
  import kernels
  listed = [name for name in kernels.IMPLEMENTATIONS if name != "auto"]
  names = benchmarking.checked_names(IMPLS, kernels.IMPLEMENTATIONS) if IMPLS.value else listed
  impls = []
  for name in names:
    reason = benchmarking.without_accelerator(name, platform)
    if reason and not BENCH.interpret.value:
      print(f"{name}: skipped, {reason}; --interpret runs it anyway")
    else:
      impls.append(name)
  if not impls:
    print("window attention: nothing to time on this backend.")
    return
  batch, repeats = BENCH.setting(KERNEL_BATCH), BENCH.setting(BENCH.repeats)
  min_window_s = BENCH.min_window_ms.value / 1e3
  stages, shifts = benchmarking.integers(STAGES), benchmarking.integers(SHIFTS)
  for stage in stages:
    if stage not in SWIN_T_STAGES:
      raise ValueError(f"--stages: {stage} is not a Swin-T stage (1-4).")
  bandwidth, how = benchmarking.bandwidth_gbs(jax, BENCH.bandwidth_gbs.value, min_window_s)
  print(f"\nwindow attention (Swin-T at 224x224: window {SWIN_T_WINDOW}, head dim "
        f"{SWIN_T_HEAD_DIM}), batch {batch}; bandwidth {bandwidth:.1f} GB/s ({how}); median of "
        f"{repeats} windows of >= {BENCH.min_window_ms.value:g} ms, the implementations taking "
        "turns")
  table = benchmarking.Table(
      ["stage (B,H,W,3C), heads", "shift", "impl", "dtype", "fwd ms", "fwd+bwd ms",
       "floor ms (fwd / fwd+bwd)", "of floor (fwd / fwd+bwd)",
       "max abs diff vs xla (out / dqkv)", "windows ms (fwd | fwd+bwd)"],
      widths={"stage (B,H,W,3C), heads": 28, "impl": 11, "dtype": 8}, labels=4,
      markdown=BENCH.markdown.value)
  rng = np.random.default_rng(SEED.value)
  for stage in stages:
    side, heads = SWIN_T_STAGES[stage]
    channels = heads * SWIN_T_HEAD_DIM
    window = min(SWIN_T_WINDOW, side)
    qkv_np = rng.standard_normal((batch, side, side, 3 * channels), np.float32)
    table_np = 0.02 * rng.standard_normal(((2 * window - 1) ** 2, heads), np.float32)
    cotangent_np = rng.standard_normal((batch, side, side, channels), np.float32)
    for shift in shifts:
      if not 0 <= shift < window or (shift and side <= SWIN_T_WINDOW):
        print(f"stage {stage}: shift {shift} skipped (Swin does not shift a stage whose "
              f"resolution is not larger than the window; 0 <= shift < {window}).")
        continue
      for dtype in DTYPES.value:
        qkv, table_values = jnp.asarray(qkv_np, dtype), jnp.asarray(table_np)
        cotangent = jnp.asarray(cotangent_np, dtype)
        itemsize = np.dtype(qkv.dtype).itemsize
        qkv_bytes, out_bytes = qkv.size * itemsize, cotangent.size * itemsize
        table_bytes = table_values.size * 4
        floor_fwd = (qkv_bytes + table_bytes + out_bytes) / (bandwidth * 1e9)
        floor_bwd = floor_fwd + (out_bytes + qkv_bytes + table_bytes) / (bandwidth * 1e9)
        rows = {}
        for name in impls:
          attend = lambda q, t, name=name: kernels.window_attention(
              q, t, num_heads=heads, window_size=window, shift=shift, implementation=name)
          forward = jax.jit(attend)

          def fwd_bwd(q, t, ct, attend=attend):
            out, vjp = jax.vjp(attend, q, t)
            return (out,) + vjp(ct)

          fwd_bwd = jax.jit(fwd_bwd)
          rows[name, "fwd"] = benchmarking.Timed(
              lambda forward=forward: forward(qkv, table_values), jax.block_until_ready,
              min_window_s=min_window_s)
          rows[name, "fwd+bwd"] = benchmarking.Timed(
              lambda fwd_bwd=fwd_bwd: fwd_bwd(qkv, table_values, cotangent),
              jax.block_until_ready, min_window_s=min_window_s)
        timings = benchmarking.alternate(rows, repeats)
        label = [f"{stage} ({batch},{side},{side},{3 * channels}), {heads}", shift]
        reference = None
        for name in impls:
          fwd, bwd = timings[name, "fwd"], timings[name, "fwd+bwd"]
          if fwd.error or bwd.error:
            table.row(label + [name, dtype, f"failed: {fwd.error or bwd.error}"])
            continue
          out, grad = (np.asarray(a, np.float32) for a in rows[name, "fwd+bwd"].result[:2])
          if name == "xla":
            reference, diff = (out, grad), "-"
          elif reference is None:
            diff = "-"
          else:
            diff = (f"{np.max(np.abs(out - reference[0])):.1e} / "
                    f"{np.max(np.abs(grad - reference[1])):.1e}")
          table.row(label + [name, dtype, f"{fwd.median * 1e3:.2f}", f"{bwd.median * 1e3:.2f}",
                             f"{floor_fwd * 1e3:.3f} / {floor_bwd * 1e3:.3f}",
                             f"{benchmarking.percent(floor_fwd, fwd.median)} / "
                             f"{benchmarking.percent(floor_bwd, bwd.median)}", diff,
                             f"{fwd.windows()} | {bwd.windows()}"])
        del rows


# ------------------------------------------------------------------------------------------------
# Part "train"


def zoo_train_step(jax, jnp, np, name, batch_size, image_size, dtype):
  """(step() -> loss, FLOPs per step, parameter count) of our model `name` with AdamW."""
  import optax

  import zoo
  extra = {"drop_path_rate": 0.0, "img_size": image_size} if name.startswith("swin") else {}
  model = zoo.create(name, num_classes=1000, dtype=dtype, **extra)
  rng = np.random.default_rng(SEED.value)
  images = jnp.asarray(rng.standard_normal((batch_size, image_size, image_size, 3)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 1000, (batch_size,)), jnp.int32)
  params = jax.jit(lambda: model.init(jax.random.key(0), images[:1], train=False)["params"])()
  optimizer = optax.adamw(1e-3, weight_decay=0.05)

  def step(params, opt_state, images, labels):
    def loss_fn(params):
      logits, _ = model.apply({"params": params}, images, train=True,
                              rngs={"dropout": jax.random.key(1)})
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  state = (params, optimizer.init(params))
  jitted = jax.jit(step, donate_argnums=(0, 1))
  flops = jitted.lower(*state, images, labels).cost_analysis()["flops"]
  count = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))

  def run():
    nonlocal state
    *state, loss = jitted(*state, images, labels)
    return loss

  return run, flops, count


def train_part(jax, jnp, np, platform):
  models = benchmarking.checked_names(MODELS_FLAG, MODELS)
  accelerator = platform != "cpu"
  batch = BENCH.setting(BATCH_SIZE) or (64 if accelerator else 4)
  size, steps = IMAGE_SIZE.value, BENCH.setting(STEPS)
  windows, warmup = BENCH.setting(WINDOWS), BENCH.setting(WARMUP)
  dtype = TRAIN_DTYPE.value if TRAIN_DTYPE.value != "auto" else (
      "bfloat16" if accelerator else "float32")
  peak, how = benchmarking.peak_gflops(
      jax, jnp, given=PEAK_TFLOPS.value and PEAK_TFLOPS.value * 1e3, given_how="--peak_tflops",
      dtype=dtype)
  print(f"\ntraining steps: batch {batch}, {size}x{size}, 1000 classes, AdamW; ours in {dtype} "
        f"(params float32); median of {windows} windows of {steps} steps after {warmup} warm-up "
        f"steps, ours and the peer's taking turns; peak {peak / 1e3:.2f} TFLOP/s ({how})")
  peer, note = benchmarking.start_peer("experiments.peers.timm_train_step",
                                       BENCH.torch_python.value, "timm")
  if note:
    print(note)
  table = benchmarking.Table(
      ["model", "implementation", "images/s", "(best)", "FLOP floor images/s", "of floor",
       "windows images/s", "note"],
      widths={"model": 8, "implementation": 52, "windows images/s": 20}, labels=2,
      markdown=BENCH.markdown.value)

  for name in models:
    ours = f"zoo (jax {dtype})"
    try:
      step, flops, count = zoo_train_step(jax, jnp, np, name, batch, size, jnp.dtype(dtype))
    except Exception as e:  # the model could not be built or compiled: say so, go on
      table.row([name, ours, "-", "-", "-", "-", "-", f"failed: {benchmarking.first_line(e)}"])
      continue
    floor = batch / (flops / (peak * 1e9))
    notes = {ours: f"{count:,} params, {flops / batch / 1e9:.1f} GFLOP/image per step"}
    rows = {ours: benchmarking.Timed(step, jax.block_until_ready, calls=steps, warmup=warmup)}
    if peer is not None:
      spec = dict(model=MODELS[name], batch_size=batch, image_size=size, steps=steps,
                  warmup=warmup, seed=SEED.value, threads=len(os.sched_getaffinity(0)))
      try:
        for mode, row in peer.prepare(spec).items():
          rows[f"timm {MODELS[name]} ({mode})"] = row
      except benchmarking.PeerError as e:
        table.row([name, f"timm {MODELS[name]}", "-", "-", "-", "-", "-",
                   benchmarking.peer_problem("timm", e)])
    for impl, timing in benchmarking.alternate(rows, windows).items():
      if timing.error:
        table.row([name, impl, "-", "-", "-", "-", "-", f"failed: {timing.error}"])
        continue
      rates = [batch / seconds for seconds in timing.seconds]
      rate = statistics.median(rates)
      table.row([name, impl, f"{rate:.2f}", f"{max(rates):.2f}",
                 f"{floor:.1f}" if impl == ours else "-",
                 f"{rate / floor:.1%}" if impl == ours else "-",
                 " ".join(f"{r:.2f}" for r in rates), notes.get(impl, "")])
    del rows, step
  benchmarking.close_peer(peer)


def main():
  parts = benchmarking.checked_names(PARTS_FLAG, PARTS)
  benchmarking.checked_names(DTYPES, ("float32", "bfloat16"))
  import jax
  import jax.numpy as jnp
  import numpy as np

  print(benchmarking.device_line(jax), flush=True)
  platform = jax.devices()[0].platform
  if "kernel" in parts:
    kernel_part(jax, jnp, np, platform)
  if "train" in parts:
    train_part(jax, jnp, np, platform)


if __name__ == "__main__":
  benchmarking.run(main)
