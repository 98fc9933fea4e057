"""What every launcher shares: flags common to all, start-up, and clean errors.

A launcher's `main` parses nothing itself beyond its flags and calls library code; `run`
turns a ValueError (bad config, bad input, bad workdir: our own checks, which name the
problem and the fix) into one line on stderr and exit status 2 instead of a traceback.
"""

import os
import sys

from absl import app, flags, logging

JAX_DISTRIBUTED = flags.DEFINE_bool(
    "jax_distributed", False,
    "Call jax.distributed.initialize() first: set on every host of a multi-host (pod) job.")


def start():
  """Joins the multi-host job when asked; call before touching any device."""
  import jax
  if JAX_DISTRIBUTED.value:
    jax.distributed.initialize()
  logging.info("JAX %s, process %d of %d, %d local %s device(s).", jax.__version__,
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.default_backend())


def run(main):
  """`app.run(main)`, reporting our own ValueErrors as one clean line (exit status 2)."""

  def guarded(argv):
    try:
      return main(argv)
    except ValueError as e:
      if os.environ.get("ZOO_TRACEBACK"):
        raise
      print(f"error: {e}\n(set ZOO_TRACEBACK=1 for the traceback)", file=sys.stderr)
      sys.exit(2)

  app.run(guarded)
