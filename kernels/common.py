"""What every kernel in this package shares: choosing an implementation, lowering for another
platform, integer and float arithmetic the kernels agree on.

`implementation` is one of IMPLEMENTATIONS (DESIGN.md, "Kernels"). "auto" takes the Pallas
version on a Hopper-or-newer GPU or a TPU and "xla" elsewhere. Asking for a Pallas version on a
machine without that accelerator runs the same kernel in Pallas interpret mode, so it can be
checked on a laptop. This module imports only jax (no Pallas): every op's API module imports
it, and `import kernels` must load no Pallas backend.
"""

import contextlib
import contextvars
import importlib
from collections.abc import Sequence

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("auto", "xla", "pallas_gpu", "pallas_tpu")
# The module that implements each concrete implementation inside an op's folder.
BACKEND_MODULES = {"xla": "xla", "pallas_tpu": "pallas_tpu", "pallas_gpu": "pallas_mosaic_gpu"}


def backend(package: str, implementation: str):
  """The backend module of op `package` ("kernels.roi") for a concrete `implementation`,
  imported the first time it is chosen (so `import kernels` loads no Pallas module)."""
  return importlib.import_module(f"{package}.{BACKEND_MODULES[implementation]}")

_PALLAS_PLATFORM = {"pallas_gpu": "gpu", "pallas_tpu": "tpu"}
_lowering_platform = contextvars.ContextVar("lowering_platform", default=None)


@contextlib.contextmanager
def lowering_for(platform: str):
  """Traces Pallas kernels for `platform` ("gpu" or "tpu") instead of the local backend.

  For `jax.export.export(..., platforms=["cuda" | "tpu"])` on a machine without that
  accelerator: inside this context the kernels are lowered for real, not interpreted.
  jit caches traces without regard to this context, so export functions that are not also
  jitted outside it.
  """
  if platform not in ("gpu", "tpu"):
    raise ValueError(f"lowering_for takes 'gpu' or 'tpu', got {platform!r}.")
  token = _lowering_platform.set(platform)
  try:
    yield
  finally:
    _lowering_platform.reset(token)


def local_platform() -> str:
  """"cpu", "gpu" or "tpu": the platform kernels are traced for (`lowering_for`'s, if inside)."""
  return _lowering_platform.get() or jax.default_backend()


def _hopper_or_newer() -> bool:
  if _lowering_platform.get() == "gpu":
    return True
  capability = getattr(jax.devices()[0], "compute_capability", "0")  # only GPU devices have it
  return float(capability) >= 9.0


def resolve_implementation(implementation: str, op: str,
                           available=("xla", "pallas_tpu", "pallas_gpu")) -> str:
  """Returns "xla", "pallas_gpu" or "pallas_tpu" for a requested implementation of `op`.

  `available` lists the implementations `op` has (every op has all three today); "auto" picks
  among them.
  """
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"{op}: implementation={implementation!r} is not one of {IMPLEMENTATIONS}.")
  if implementation == "auto":
    platform = local_platform()
    if platform == "tpu" and "pallas_tpu" in available:
      return "pallas_tpu"
    if platform == "gpu" and _hopper_or_newer() and "pallas_gpu" in available:
      return "pallas_gpu"
    return "xla"
  if implementation == "pallas_gpu" and local_platform() == "gpu" and not _hopper_or_newer():
    raise ValueError(f"{op}: implementation='pallas_gpu' is a Mosaic GPU kernel for Hopper (sm_90) "
                     "and newer GPUs; on this GPU use 'xla' (or 'auto').")
  if implementation not in available:
    raise ValueError(f"{op}: implementation={implementation!r} does not exist yet (this op has "
                     f"{available}); use 'xla' or 'auto', which runs the fastest one there is.")
  return implementation


def unless_unsupported(requested: str, implementation: str, reason: str | None, op: str) -> str:
  """`implementation`, or "xla" where the Pallas GPU kernel cannot take the call (`reason`)
  and "auto" chose it; an explicit "pallas_gpu" gets a ValueError naming the reason."""
  if implementation != "pallas_gpu" or not reason:
    return implementation
  if requested == "pallas_gpu":
    raise ValueError(f"{op}: implementation='pallas_gpu' cannot take this call: {reason}. Use "
                     f"'xla' (or 'auto', which falls back to it).")
  return "xla"


def interpret(implementation: str) -> bool:
  """Whether a Pallas implementation must run in interpret mode on this machine."""
  return local_platform() != _PALLAS_PLATFORM[implementation]


def pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
  """(h, w) from an int or a pair of positive ints; ValueError naming `name` otherwise."""
  values = (value, value) if isinstance(value, int) else tuple(value)
  if len(values) != 2 or not all(isinstance(v, int) and v > 0 for v in values):
    raise ValueError(f"{name} must be a positive int or a pair of positive ints (h, w), "
                     f"got {value!r}.")
  return values


def round_up(value: int, multiple: int) -> int:
  """The smallest multiple of `multiple` >= value (ints, or int arrays)."""
  return -(-value // multiple) * multiple


def divide(x: jax.Array, n: int | float) -> jax.Array:
  """x / n with a true IEEE division, as C++ computes it.

  XLA rewrites a division by a broadcast constant into a multiplication by its reciprocal,
  which can be an ulp off and then flips ceil() at whole numbers (ceil(21 / 7) became 4).
  A divisor that depends on x (n + 0 * x, with x's non-finite values masked) is neither a
  constant nor a broadcast, also under vmap.
  """
  return x / (n + jnp.where(jnp.isfinite(x), x, 0) * 0)
