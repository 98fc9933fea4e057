"""What every launcher shares: flags common to all, start-up, and clean errors.

A launcher's `main` parses nothing itself beyond its flags and calls library code; `run`
turns a ValueError (bad config, bad input, bad workdir: our own checks, which name the
problem and the fix) into one line on stderr and exit status 2 instead of a traceback, and
checks that a --config file exists before anything starts (ml_collections would report a
missing file only at the config's first use, after JAX has started).

`start` keeps the console to what a user acts on: it drops Orbax's INFO chatter and its
read-only notices, JAX's note that no TPU library is installed, TFDS's INFO lines (dataset
info loaded, default builder config chosen, files written), and TFDS's progress bars when
stderr is not a terminal (a log file would fill with escape codes).
"""

import logging as logging_std
import os
import sys

from absl import app, flags, logging

JAX_DISTRIBUTED = flags.DEFINE_bool(
    "jax_distributed", False,
    "Call jax.distributed.initialize() first: set on every host of a multi-host (pod) job.")


class _QuietLibraries(logging_std.Filter):
  """Drops library lines that say nothing to act on (module doc)."""

  def filter(self, record):
    if "/orbax/" in record.pathname:  # Several INFO lines per save; notices of read-only use.
      return (record.levelno > logging_std.INFO
              and not record.getMessage().startswith("Given directory is read only"))
    if "/tensorflow_datasets/" in record.pathname:
      return (record.levelno > logging_std.INFO
              and "has no dataset_info.json" not in record.getMessage())  # Before preparation.
    if record.name == "jax._src.xla_bridge" and record.levelno <= logging_std.INFO:
      return "Unable to initialize backend" not in record.getMessage()  # No TPU: as expected.
    return True


def start():
  """Joins the multi-host job when asked; call before touching any device."""
  import jax
  import tensorflow_datasets as tfds
  logging.get_absl_handler().addFilter(_QuietLibraries())
  if not sys.stderr.isatty():
    tfds.disable_progress_bar()
  if JAX_DISTRIBUTED.value:
    jax.distributed.initialize()
  logging.info("JAX %s, process %d of %d, %d local %s device(s).", jax.__version__,
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.default_backend())


def _check_config_file(argv):
  """Exits with one line if a --config file does not exist (module doc)."""
  for i, argument in enumerate(argv[1:], start=1):
    if argument.startswith("--config="):
      value = argument.split("=", 1)[1]
    elif argument == "--config" and i + 1 < len(argv):
      value = argv[i + 1]
    else:
      continue
    path = value.split(":", 1)[0]
    if not os.path.isfile(path):
      _fail(f"--config={value}: there is no file {path} (relative to {os.getcwd()}). Configs "
            "are Python files such as experiments/configs/unet.py; a variant follows the path "
            "after ':' (experiments/configs/unet.py:smoke).")


def _parse_flags(argv):
  _check_config_file(argv)
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
