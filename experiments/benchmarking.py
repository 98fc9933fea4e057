"""What the benchmark scripts share: the device's peak estimate and timing helpers.

Imports only the standard library at module level (jax is passed in), so a script can parse
its flags before JAX starts.
"""

import os
import re
import statistics
import time


def cpu_peak_gflops() -> tuple[float, str]:
  """Nominal fp32 peak of this machine's CPU cores and how it was estimated."""
  cores = len(os.sched_getaffinity(0))
  info = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
  mhz = re.search(r"cpu MHz\s*:\s*([\d.]+)", info)
  flags_line = re.search(r"^flags\s*:(.*)$", info, re.M)
  cpu_flags = set(flags_line.group(1).split()) if flags_line else set()
  family = re.search(r"cpu family\s*:\s*(\d+)", info)
  vendor_amd = "AuthenticAMD" in info
  ghz = float(mhz.group(1)) / 1000 if mhz else 2.0
  if "avx512f" in cpu_flags and not (vendor_amd and family and int(family.group(1)) <= 0x19):
    lanes, isa = 16, "AVX-512"
  elif "avx512f" in cpu_flags:
    lanes, isa = 8, "AVX-512 on a 256-bit datapath (AMD family 0x19)"
  elif "avx2" in cpu_flags or "avx" in cpu_flags:
    lanes, isa = 8, "AVX2"
  else:
    lanes, isa = 4, "SSE"
  peak = cores * ghz * lanes * 2 * 2
  return peak, f"{cores} cores x {ghz:.2f} GHz x {lanes} fp32 lanes ({isa}) x 2 FMA pipes x 2"


def measured_matmul_gflops(jax, jnp, n: int = 2048, dtype=None) -> float:
  """GFLOP/s of the best of 5 timed n^3 matmuls (float32 unless `dtype`), after a warm-up."""
  a = jnp.ones((n, n), dtype or jnp.float32)
  matmul = jax.jit(lambda a: a @ a)
  matmul(a).block_until_ready()
  best = float("inf")
  for _ in range(5):
    start = time.perf_counter()
    matmul(a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * n**3 / best / 1e9


def time_ms(run, sync, repeats, min_window_s):
  """Median ms per call over `repeats` windows, and the last result. `run` is warmed up already."""
  start = time.perf_counter()
  result = sync(run())
  once = time.perf_counter() - start
  inner = max(1, min(1000, int(min_window_s / max(once, 1e-6))))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(inner):
      result = run()
    sync(result)  # one device, one stream: the last call finishing means all have
    times.append((time.perf_counter() - start) / inner)
  return statistics.median(times) * 1e3, result


def measured_bandwidth(jax, jnp, nbytes, min_window_s):
  """GB/s of a jitted in-place `x + 1` over `nbytes` of float32 ((read + write) / best time).

  The array is donated, so every call reuses its buffer: a fresh output buffer each call would
  time the operating system's first-touch page faults on a CPU, not the memory.
  """
  add = jax.jit(lambda x: x + 1, donate_argnums=0)
  x = jax.block_until_ready(add(jnp.zeros((nbytes // 4,), jnp.float32)))
  start = time.perf_counter()
  x = jax.block_until_ready(add(x))
  inner = max(1, min(1000, int(min_window_s / (time.perf_counter() - start))))
  best = float("inf")
  for _ in range(10):
    start = time.perf_counter()
    for _ in range(inner):
      x = add(x)
    jax.block_until_ready(x)
    best = min(best, (time.perf_counter() - start) / inner)
  return 2 * nbytes / best / 1e9


def first_line(error) -> str:
  """The error's first line, without the C++ source location torch puts in front."""
  text = (str(error).strip().splitlines() or [""])[0]
  if ".cpp:" in text or ".cu:" in text:
    text = text.rsplit(", ", 1)[-1]
  return f"{type(error).__name__}: {text}"[:200]
