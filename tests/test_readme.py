"""README.md runs as written: its shell commands (with relative paths, from a fresh directory)
and its Python blocks.

The shell blocks' `python -m experiments.*` commands run in a temporary directory that holds
only `experiments` (linked to this checkout's, so relative config paths resolve as in a clone);
the zoo itself is the installed one. Two things are scaled down so the test takes about a
minute: the main job trains its `:smoke` variant on the tiny builder config of the digit
canvases (the README's full run takes minutes), and its data is prepared in a temporary
TFDS_DATA_DIR. Everything else (the relative --workdir, predict and eval on it) is the
README's text. Installation (`python3 -m venv`, `pip install`) and the test command itself
are not run. Python blocks run from the checkout's root, in order, in one namespace, as a reader
pastes them into one session; a block that loads checkpoint files is skipped (and says so)
while those files are absent.
"""

import os
import re
import shlex
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = {"experiments.train": ["--config.data.name=digit_canvases/tiny"]}


def readme_blocks(language: str) -> list[str]:
  """The fenced blocks of `language`, each preceded by blank lines up to its place in
  README.md, so that a traceback's line numbers are the README's."""
  with open(os.path.join(REPO, "README.md")) as f:
    text = f.read()
  return ["\n" * text.count("\n", 0, m.start(1)) + m.group(1)
          for m in re.finditer(rf"```{language}\n(.*?)```", text, flags=re.S)]


def readme_commands() -> list[list[str]]:
  """The `python -m experiments.*` commands of the shell blocks, in order, as argument lists."""
  commands = []
  for block in readme_blocks("bash"):
    for line in block.replace("\\\n", " ").splitlines():
      for part in filter(str.strip, line.split("&&")):
        words = shlex.split(part)
        if words[:2] == ["python", "-m"] and words[2].startswith("experiments."):
          commands.append(words)
  return commands


def scaled_down(words: list[str]) -> list[str]:
  """The command with the smoke variant and tiny data for the training run (module doc)."""
  words = [sys.executable] + words[1:]
  if words[2] == "experiments.train":
    words = [f"{w}:smoke" if w.startswith("--config=") and ":" not in w else w for w in words]
  return words + SMALL.get(words[2], [])


def test_readme_has_the_newcomers_commands():
  modules = [words[2] for words in readme_commands()]
  assert {"experiments.train", "experiments.predict", "experiments.eval"} <= set(modules)
  assert modules.index("experiments.train") < modules.index("experiments.predict")


def test_readme_commands_run_with_relative_paths(tmp_path):
  os.symlink(os.path.join(REPO, "experiments"), tmp_path / "experiments")
  environment = dict(os.environ, TFDS_DATA_DIR=str(tmp_path / "tfds"), ZOO_TRACEBACK="1")
  for words in readme_commands():
    command = scaled_down(words)
    result = subprocess.run(command, cwd=tmp_path, env=environment, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, f"{shlex.join(words)} failed:\n{result.stderr[-3000:]}"
    for argument in words:
      if argument.startswith("--workdir="):
        assert not os.path.isabs(argument.split("=", 1)[1])  # What the README shows: relative.
  workdir = tmp_path / "runs" / "unet"
  assert (workdir / "results.json").exists() and (workdir / "config.json").exists()
  pictures = sorted(os.listdir(workdir / "predictions"))
  assert pictures and all(p.endswith(".png") for p in pictures)


def test_readme_python_blocks_run(monkeypatch):
  monkeypatch.chdir(REPO)  # File names in the blocks are relative to a clone's root.
  namespace = {}
  for block in readme_blocks("python"):
    missing = [name for name in re.findall(r"load_checkpoint\(\"([^\"]+)\"", block)
               if not os.path.exists(name)]
    if missing:
      print(f"skipped (no {', '.join(missing)} here):\n{block}")
      continue
    exec(compile(block, "README.md", "exec"), namespace)  # pylint: disable=exec-used
  assert namespace["logits"].shape == (2, 64, 64, 11)
  assert namespace["crops"].shape == (1, 7, 7, 256)
