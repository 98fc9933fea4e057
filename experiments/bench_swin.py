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
implementation the kernel module lists (`--implementations` narrows them): a Pallas one on a
machine without its accelerator would run in Pallas interpret mode, which is a correctness
tool, not a benchmark, so it is skipped with a note (unless `--interpret`, for smoke tests).
  forward   the op alone;
  fwd+bwd   the op and its VJP with a fixed random cotangent: the output and the gradients of
            sum(out * cotangent) with respect to qkv and the relative position bias table;
both jitted, inputs on the device, compilation excluded, timed with `jax.block_until_ready`;
each repeat is a window of calls lasting at least --min_window_ms, the row reports the median
of --repeats windows. The byte floor is the traffic nothing can avoid: qkv and the table read
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
(median over --windows windows of --steps steps, after --warmup steps). The peer is timm's
`swin_tiny_patch4_window7_224` / `vit_base_patch16_224` (same sizes, drop_path_rate 0,
torch.optim.AdamW), timed in its OWN process (`--torch_python`, default this interpreter; it
needs torch and timm, not jax): timing it in-process next to XLA's thread pool was found to be
contended. On a GPU the peer runs eager and torch.compile'd, both under bfloat16 autocast; on a
CPU eager float32 only, with torch.set_num_threads(cores). The FLOP floor is XLA's cost
analysis of our step over the device's peak: on a CPU cores x clock x fp32 FMA lanes x 2 pipes
x 2, or a timed 2048^3 matmul if faster (a VM reports its base clock); on a GPU a timed 8192^3
matmul in the step's dtype; --peak_tflops overrides both.

Imports jax, numpy, absl, kernels (and zoo, optax, flax for part "train").
"""

import importlib
import inspect
import json
import os
import statistics
import subprocess
import sys
import textwrap
import time

from absl import flags

from experiments.benchmarking import (cpu_peak_gflops, first_line, measured_bandwidth,
                                     measured_matmul_gflops, time_ms)

PARTS = ("kernel", "train")
MODELS = {"swin_t": "swin_tiny_patch4_window7_224", "vit_b16": "vit_base_patch16_224"}
# Swin-T's attention at 224x224: stage -> (tokens per side, heads); channels = heads * 32.
SWIN_T_STAGES = {1: (56, 3), 2: (28, 6), 3: (14, 12), 4: (7, 24)}
SWIN_T_WINDOW, SWIN_T_HEAD_DIM = 7, 32

PARTS_FLAG = flags.DEFINE_list("parts", list(PARTS), f"What to time, from {PARTS}.")
IMPLS = flags.DEFINE_list("implementations", None,
                          "window_attention implementations (default: every one the kernel "
                          "module lists).")
DTYPES = flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "qkv dtypes of the kernel rows.")
STAGES = flags.DEFINE_list("stages", ["1", "3"], "Swin-T stages (1-4) whose attention to time.")
SHIFTS = flags.DEFINE_list("shifts", ["0", "3"], "Cyclic shifts, tokens (0 <= shift < 7).")
KERNEL_BATCH = flags.DEFINE_integer("kernel_batch", 64, "B of the kernel rows.")
REPEATS = flags.DEFINE_integer("repeats", 5, "Kernel: timed windows per row (median).")
MIN_WINDOW_MS = flags.DEFINE_float("min_window_ms", 20.0,
                                   "Kernel: a timed window repeats the call this long at least.")
INTERPRET = flags.DEFINE_bool("interpret", False,
                              "Also run Pallas implementations without their accelerator, in "
                              "interpret mode (meaningless times; use with --quick).")
BANDWIDTH = flags.DEFINE_float("bandwidth_gbs", None,
                               "Device bandwidth in GB/s for the byte floor (default: measured).")
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
TORCH_PYTHON = flags.DEFINE_string("torch_python", sys.executable,
                                   "Train: the Python interpreter that runs the timm peer in its "
                                   "own process ('' = no peer).")
PEAK_TFLOPS = flags.DEFINE_float("peak_tflops", None, "Device peak TFLOP/s (default: estimated).")
SEED = flags.DEFINE_integer("seed", 0, "Seed of the inputs.")
QUICK = flags.DEFINE_bool("quick", False,
                          "Small problem unless those flags are given: kernel batch 2, 3 "
                          "repeats; train batch 2, 2 steps x 3 windows, 1 warm-up step.")
MARKDOWN = flags.DEFINE_bool("markdown", False, "Print the tables as Markdown.")

_QUICK = {"kernel_batch": 2, "repeats": 3, "batch_size": 2, "steps": 2, "windows": 3, "warmup": 1}


def setting(flag):
  """A flag's value, or its --quick default when --quick is on and the flag was not given."""
  if QUICK.value and flag.name in _QUICK and not flags.FLAGS[flag.name].present:
    return _QUICK[flag.name]
  return flag.value


def peak_tflops(jax, jnp, platform, dtype) -> tuple[float, str]:
  """The device's peak for the FLOP floor, and how it was obtained."""
  if PEAK_TFLOPS.value:
    return PEAK_TFLOPS.value, "--peak_tflops"
  if platform != "cpu":
    n = 8192
    measured = measured_matmul_gflops(jax, jnp, n, dtype) / 1e3
    return measured, f"a {n}^3 {jnp.dtype(dtype).name} matmul (--peak_tflops for the datasheet)"
  measured = measured_matmul_gflops(jax, jnp) / 1e3
  nominal, how = cpu_peak_gflops()
  return max(nominal / 1e3, measured), (f"{how} = {nominal:.0f} GFLOP/s nominal; a 2048^3 matmul "
                                        f"ran at {measured * 1e3:.0f}")


class Table:
  """Prints rows as they come, aligned or as Markdown."""

  def __init__(self, header, widths):
    self.header, self.widths = header, widths
    self.emit(header)
    if MARKDOWN.value:
      self.emit(["---"] * len(header))

  def emit(self, cells):
    cells = list(cells) + [""] * (len(self.header) - len(cells))
    if MARKDOWN.value:
      print("| " + " | ".join(str(c) for c in cells) + " |")
    else:
      print(" ".join(f"{str(c):{w}s}" for c, w in zip(cells, self.widths)).rstrip())
    sys.stdout.flush()


# ------------------------------------------------------------------------------------------------
# Part "kernel"


def kernel_part(jax, jnp, np, platform):
  module = importlib.import_module("kernels.window_attention")
  from kernels import _common
  listed = tuple(getattr(module, "IMPLEMENTATIONS", None) or module._IMPLEMENTATIONS)
  names = IMPLS.value or list(listed)
  impls = []
  for name in names:
    if name not in listed:
      raise ValueError(f"--implementations: window_attention has no {name!r}; it lists {listed}.")
    if name.startswith("pallas") and _common.interpret(name) and not INTERPRET.value:
      print(f"{name}: skipped, no {name.removeprefix('pallas_').upper()} here (interpret mode is "
            f"a correctness tool, not a benchmark; --interpret runs it anyway)")
    else:
      impls.append(name)
  if not impls:
    print("window attention: nothing to time on this backend.")
    return
  batch, repeats = setting(KERNEL_BATCH), setting(REPEATS)
  min_window_s = MIN_WINDOW_MS.value / 1e3
  try:
    stages = [int(s) for s in STAGES.value]
    shifts = [int(s) for s in SHIFTS.value]
  except ValueError as e:
    raise ValueError(f"--stages and --shifts take integers ({e}).") from None
  for stage in stages:
    if stage not in SWIN_T_STAGES:
      raise ValueError(f"--stages: {stage} is not a Swin-T stage (1-4).")
  if BANDWIDTH.value:
    bandwidth, how = BANDWIDTH.value, "--bandwidth_gbs"
  else:
    nbytes = 256 << 20
    bandwidth = measured_bandwidth(jax, jnp, nbytes, min_window_s)
    how = f"measured: in-place x + 1 over {nbytes >> 20} MiB float32, best of 10 windows"
  print(f"\nwindow attention (Swin-T at 224x224: window {SWIN_T_WINDOW}, head dim "
        f"{SWIN_T_HEAD_DIM}), batch {batch}; bandwidth {bandwidth:.1f} GB/s ({how}); median of "
        f"{repeats} windows of >= {MIN_WINDOW_MS.value:g} ms")
  table = Table(["stage (B,H,W,3C), heads", "shift", "impl", "dtype", "fwd ms", "fwd+bwd ms",
                 "floor ms (fwd / fwd+bwd)", "of floor (fwd / fwd+bwd)",
                 "max abs diff vs xla (out / dqkv)"],
                [28, 5, 11, 8, 9, 10, 24, 24, 31])
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
        floor_fwd = (qkv_bytes + table_bytes + out_bytes) / (bandwidth * 1e6)
        floor_bwd = floor_fwd + (out_bytes + qkv_bytes + table_bytes) / (bandwidth * 1e6)
        label = [f"{stage} ({batch},{side},{side},{3 * channels}), {heads}", shift]
        reference = None
        for name in impls:
          try:
            attend = lambda q, t, name=name: module.window_attention(
                q, t, num_heads=heads, window_size=window, shift=shift, implementation=name)
            forward = jax.jit(attend)

            def fwd_bwd(q, t, ct, attend=attend):
              out, vjp = jax.vjp(attend, q, t)
              return (out,) + vjp(ct)

            fwd_bwd = jax.jit(fwd_bwd)
            jax.block_until_ready(forward(qkv, table_values))
            jax.block_until_ready(fwd_bwd(qkv, table_values, cotangent))
            fwd_ms, _ = time_ms(lambda: forward(qkv, table_values), jax.block_until_ready,
                                repeats, min_window_s)
            bwd_ms, last = time_ms(lambda: fwd_bwd(qkv, table_values, cotangent),
                                   jax.block_until_ready, repeats, min_window_s)
            out, grad = (np.asarray(a, np.float32) for a in last[:2])
            if name == "xla":
              reference, diff = (out, grad), "-"
            elif reference is None:
              diff = "-"
            else:
              diff = (f"{np.max(np.abs(out - reference[0])):.1e} / "
                      f"{np.max(np.abs(grad - reference[1])):.1e}")
            table.emit(label + [name, dtype, f"{fwd_ms:.2f}", f"{bwd_ms:.2f}",
                                f"{floor_fwd:.3f} / {floor_bwd:.3f}",
                                f"{floor_fwd / fwd_ms:.1%} / {floor_bwd / bwd_ms:.1%}", diff])
            del last
          except Exception as e:  # one failing row must not stop the others
            table.emit(label + [name, dtype, f"failed: {first_line(e)}"])


# ------------------------------------------------------------------------------------------------
# Part "train"


def timm_train_rates(models, batch_size, image_size, steps, windows, warmup, seed):
  """Runs in its own process (only torch and timm): timm training steps, images/s per mode.

  Returns {"versions": str, "rows": [{"model", "mode", "rates": [images/s per window]} or
  {"model", "mode", "error"}]}.
  """
  import time as time_lib

  import timm
  import torch

  cuda = torch.cuda.is_available()
  device = "cuda" if cuda else "cpu"
  if not cuda:
    torch.set_num_threads(len(os.sched_getaffinity(0)))
  torch.manual_seed(seed)
  versions = (f"torch {torch.__version__}, timm {timm.__version__} on " +
              (torch.cuda.get_device_name() if cuda else
               f"the CPU, {torch.get_num_threads()} threads"))
  modes = ["eager, bf16 autocast", "torch.compile, bf16 autocast"] if cuda else ["eager, float32"]
  rows = []
  for ours, timm_name in models:
    for mode in modes:
      try:
        model = timm.create_model(timm_name, num_classes=1000, drop_path_rate=0.0,
                                  img_size=image_size).to(device).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
        images = torch.randn(batch_size, 3, image_size, image_size, device=device)
        labels = torch.randint(0, 1000, (batch_size,), device=device)
        forward = torch.compile(model) if mode.startswith("torch.compile") else model

        def step():
          optimizer.zero_grad(set_to_none=True)
          with torch.autocast(device, dtype=torch.bfloat16, enabled=cuda):
            loss = torch.nn.functional.cross_entropy(forward(images), labels)
          loss.backward()
          optimizer.step()
          return loss

        sync = torch.cuda.synchronize if cuda else (lambda: None)
        for _ in range(max(warmup, 3 if "compile" in mode else 1)):
          step()
        sync()
        rates = []
        for _ in range(windows):
          start = time_lib.perf_counter()
          for _ in range(steps):
            step()
          sync()
          rates.append(batch_size * steps / (time_lib.perf_counter() - start))
        rows.append({"model": ours, "mode": mode, "rates": rates})
        del model, optimizer, forward
      except Exception as e:  # noqa: BLE001 - reported as the row's note
        rows.append({"model": ours, "mode": mode,
                     "error": f"{type(e).__name__}: {str(e).strip().splitlines()[0][:150]}"})
  return {"versions": versions, "rows": rows}


def run_timm_peer(spec: dict) -> dict:
  """`timm_train_rates(**spec)` in a fresh `--torch_python` process (its JSON on stdout)."""
  source = "import os\n" + textwrap.dedent(inspect.getsource(timm_train_rates)) + textwrap.dedent("""
      import json, sys
      print("RESULT " + json.dumps(timm_train_rates(**json.loads(sys.argv[1]))))
      """)
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  done = subprocess.run([TORCH_PYTHON.value, "-c", source, json.dumps(spec)], capture_output=True,
                        text=True, env=env, check=False)
  for line in done.stdout.splitlines():
    if line.startswith("RESULT "):
      return json.loads(line.removeprefix("RESULT "))
  lines = [l for l in done.stderr.strip().splitlines() if l.strip()] or ["no output"]
  return {"error": f"{TORCH_PYTHON.value} exited with status {done.returncode}: {lines[-1][:200]}"}


def zoo_train_step(jax, jnp, np, name, batch_size, image_size, dtype):
  """(jitted step, state, FLOPs per step, parameter count) of our model `name` with AdamW."""
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
  return (lambda state: jitted(*state, images, labels)), state, flops, count


def train_part(jax, jnp, np, platform):
  for name in MODELS_FLAG.value:
    if name not in MODELS:
      raise ValueError(f"--models: {name!r} is not one of {tuple(MODELS)}.")
  accelerator = platform != "cpu"
  batch = setting(BATCH_SIZE) or (64 if accelerator else 4)
  size, steps, windows, warmup = IMAGE_SIZE.value, setting(STEPS), setting(WINDOWS), setting(WARMUP)
  dtype = TRAIN_DTYPE.value if TRAIN_DTYPE.value != "auto" else (
      "bfloat16" if accelerator else "float32")
  peak, how = peak_tflops(jax, jnp, platform, jnp.dtype(dtype))
  print(f"\ntraining steps: batch {batch}, {size}x{size}, 1000 classes, AdamW; ours in {dtype} "
        f"(params float32); median of {windows} windows of {steps} steps after {warmup} warm-up "
        f"steps; peak {peak:.2f} TFLOP/s ({how})")
  table = Table(["model", "implementation", "images/s", "(best)", "FLOP floor images/s",
                 "of floor", "note"], [8, 52, 9, 8, 20, 9, 40])
  floors = {}

  def emit(model, impl, rates, note):
    if rates is None:
      table.emit([model, impl, "-", "-", "-", "-", note])
      return
    rate, floor = statistics.median(rates), floors.get(model)
    table.emit([model, impl, f"{rate:.2f}", f"{max(rates):.2f}", f"{floor:.1f}" if floor else "-",
                f"{rate / floor:.1%}" if floor else "-", note])

  for name in MODELS_FLAG.value:
    try:
      step, state, flops, count = zoo_train_step(jax, jnp, np, name, batch, size, jnp.dtype(dtype))
      for _ in range(warmup):
        *state, loss = step(state)
      jax.block_until_ready(loss)
      rates = []
      for _ in range(windows):
        start = time.perf_counter()
        for _ in range(steps):
          *state, loss = step(state)
        jax.block_until_ready(loss)
        rates.append(batch * steps / (time.perf_counter() - start))
      floors[name] = batch / (flops / (peak * 1e12))
      emit(name, f"zoo (jax {dtype})", rates,
           f"{count:,} params, {flops / batch / 1e9:.1f} GFLOP/image per step")
      del step, state
    except Exception as e:
      emit(name, f"zoo (jax {dtype})", None, f"failed: {first_line(e)}")
  if not TORCH_PYTHON.value:
    print("no timm peer (--torch_python='')")
    return
  result = run_timm_peer(dict(models=[(m, MODELS[m]) for m in MODELS_FLAG.value],
                              batch_size=batch, image_size=size, steps=steps, windows=windows,
                              warmup=warmup, seed=SEED.value))
  if "error" in result:
    print(f"timm peer skipped: {result['error']}")
    return
  for row in result["rows"]:
    emit(row["model"], f"timm {MODELS[row['model']]} ({row['mode']})", row.get("rates"),
         row.get("error", ""))
  print(f"peer: {result['versions']} (own process, after ours)")


def main(argv):
  if len(argv) > 1:
    raise ValueError(f"Unexpected arguments {argv[1:]}: every setting is a flag.")
  for part in PARTS_FLAG.value:
    if part not in PARTS:
      raise ValueError(f"--parts: {part!r} is not one of {PARTS}.")
  for dtype in DTYPES.value:
    if dtype not in ("float32", "bfloat16"):
      raise ValueError(f"--dtypes: {dtype!r} is not float32 or bfloat16.")
  import jax
  import jax.numpy as jnp
  import numpy as np

  device = jax.devices()[0]
  platform = device.platform
  print(f"device: {device.device_kind} ({platform}), jax {jax.__version__}, "
        f"{len(os.sched_getaffinity(0))} host cores (load average {os.getloadavg()[0]:.1f} at the "
        f"start: other processes share them), XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
  sys.stdout.flush()
  if "kernel" in PARTS_FLAG.value:
    kernel_part(jax, jnp, np, platform)
  if "train" in PARTS_FLAG.value:
    train_part(jax, jnp, np, platform)


if __name__ == "__main__":
  from experiments import launcher
  launcher.run(main)
