"""What the benchmark scripts share: the device's peak estimate and timing helpers.

Imports only the standard library at module level (jax is passed in), so a script can parse
its flags before JAX starts.
"""

import os
import re
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


def measured_matmul_gflops(jax, jnp) -> float:
  n = 2048
  a = jnp.ones((n, n), jnp.float32)
  matmul = jax.jit(lambda a: a @ a)
  matmul(a).block_until_ready()
  best = float("inf")
  for _ in range(5):
    start = time.perf_counter()
    matmul(a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * n**3 / best / 1e9
