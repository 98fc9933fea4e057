"""What every launcher shares: flags common to all, start-up, and clean errors.

A launcher's `main` parses nothing itself beyond its flags and calls library code; `run`
turns a ValueError (bad config, bad input, bad workdir: our own checks, which name the
problem and the fix) into one line on stderr and exit status 2 instead of a traceback.
"""

import logging as logging_std
import os
import sys

from absl import app, flags, logging

JAX_DISTRIBUTED = flags.DEFINE_bool(
    "jax_distributed", False,
    "Call jax.distributed.initialize() first: set on every host of a multi-host (pod) job.")


class _QuietLibraries(logging_std.Filter):
  """Drops the INFO chatter of Orbax (several lines per save) from the console."""

  def filter(self, record):
    return record.levelno > logging_std.INFO or "/orbax/" not in record.pathname


def start():
  """Joins the multi-host job when asked; call before touching any device."""
  import jax
  logging.get_absl_handler().addFilter(_QuietLibraries())
  if JAX_DISTRIBUTED.value:
    jax.distributed.initialize()
  logging.info("JAX %s, process %d of %d, %d local %s device(s).", jax.__version__,
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.default_backend())


def _parse_flags(argv):
  try:
    return flags.FLAGS(argv)
  except (KeyError, AttributeError) as e:
    message = str(e.args[0] if e.args else e).replace("'", "").replace("\n", "; ")
    overrides = " ".join(a for a in argv[1:] if a.startswith("--config."))
    _fail(f"a --config.* override names a field the config does not have ({message}). "
          f"Overrides given: {overrides}. A run's full config is written to <workdir>/config.json.")
  except flags.Error as e:
    lines = [line for line in str(e).splitlines() if line.strip()]
    if len(lines) > 1 and lines[1].startswith("Traceback"):
      lines = [lines[0], lines[-1]]  # The config file raised: its own message is the last line.
    _fail(" ".join(lines).rstrip(". ") + ". Pass --helpfull to list the flags.")


def _fail(message: str):
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def run(main):
  """`app.run(main)`, reporting bad flags and our own ValueErrors as one clean line (exit 2)."""

  def guarded(argv):
    try:
      return main(argv)
    except ValueError as e:
      if os.environ.get("ZOO_TRACEBACK"):
        raise
      _fail(f"{e}\n(set ZOO_TRACEBACK=1 for the traceback)")

  app.run(guarded, flags_parser=_parse_flags)
