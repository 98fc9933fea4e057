"""The public API is what README.md shows: `import zoo` alone reaches every subpackage
(zoo.SUBPACKAGES, imported on first use, so `import zoo` loads none of them) and every
`zoo.<name>` the README writes."""

import importlib
import os
import re
import subprocess
import sys

import pytest

import zoo

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_names() -> list[str]:
  """Every dotted `zoo.<name>...` README.md writes, in order, without repeats."""
  with open(os.path.join(REPO, "README.md")) as f:
    text = f.read()
  names = [name.rstrip(".") for name in re.findall(r"\bzoo\.[A-Za-z_][\w.]*", text)]
  return list(dict.fromkeys(names))


def resolve(dotted: str):
  """The object `dotted` names, reached from `zoo` by attribute access; a part that is no
  attribute (yet) is imported as a module (the README names a module, e.g. zoo.detection.task)."""
  parts = dotted.split(".")
  value = zoo
  for i, part in enumerate(parts[1:], start=2):
    value = (getattr(value, part) if hasattr(value, part)
             else importlib.import_module(".".join(parts[:i])))
  return value


def test_import_zoo_loads_no_subpackage_until_used():
  """In a fresh process: `import zoo` loads no subpackage but zoo.weights (zoo.load_checkpoint
  is it); `zoo.metrics.coco_evaluate` then imports zoo.metrics and no other subpackage."""
  code = """
import sys
def loaded():
  import zoo
  return sorted(name for name in zoo.SUBPACKAGES if f"zoo.{name}" in sys.modules)
import zoo
print(loaded())
evaluate = zoo.metrics.coco_evaluate
print(loaded(), evaluate.__module__, zoo.metrics is sys.modules["zoo.metrics"])
"""
  result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  by_import, by_use = result.stdout.strip().splitlines()[-2:]
  assert by_import in ("[]", "['weights']"), f"import zoo loaded the subpackages {by_import}"
  assert by_use in ("['metrics'] zoo.metrics.coco True",
                    "['metrics', 'weights'] zoo.metrics.coco True"), by_use


def test_every_subpackage_is_an_attribute_of_zoo():
  for name in zoo.SUBPACKAGES:
    assert zoo.__getattr__(name) is importlib.import_module(f"zoo.{name}")
    assert getattr(zoo, name) is sys.modules[f"zoo.{name}"]
  assert set(zoo.SUBPACKAGES) <= set(dir(zoo))
  assert set(zoo.__all__) <= set(dir(zoo))


def test_every_subpackage_is_listed():
  """SUBPACKAGES is every package and top-level module under zoo/ that is not imported into
  `zoo` already (factory, registry: their public names are zoo's)."""
  root = os.path.join(REPO, "zoo")
  found = {name.removesuffix(".py") for name in os.listdir(root)
           if os.path.isfile(os.path.join(root, name, "__init__.py"))
           or (name.endswith(".py") and name != "__init__.py")}
  assert found - {"factory", "registry"} == set(zoo.SUBPACKAGES)


def test_the_readmes_names_exist():
  names = readme_names()
  assert {"zoo.create", "zoo.list_models", "zoo.load_checkpoint", "zoo.metrics.coco_evaluate",
          "zoo.data.load_data_source"} <= set(names)
  for name in names:
    assert resolve(name) is not None, name
  assert callable(resolve("zoo.metrics.coco_evaluate"))
  assert callable(resolve("zoo.data.load_data_source"))


def test_an_unknown_attribute_is_an_attribute_error_naming_the_module():
  for name in ("metric", "coco_evaluate", "_private"):
    with pytest.raises(AttributeError, match=f"^module 'zoo' has no attribute '{name}'$"):
      getattr(zoo, name)
