"""The repository's structure (DESIGN.md, "Layout" and "Kernels"): dependencies point one way
(experiments -> zoo -> kernels), no import cycles, no module reaching into another module's
underscore names, and no Pallas backend loaded until a kernel that needs it is chosen.

The static checks parse the sources with `ast` (imports inside functions count too: a cycle
through a lazy import is still a cycle) over the packages of PACKAGES.
"""

import ast
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
# Each package may import only the packages after it.
PACKAGES = ["experiments", "zoo", "kernels"]


def package_modules(root: pathlib.Path, package: str) -> dict[str, pathlib.Path]:
  """Module name -> source file for every .py file under root/package (a package is its
  __init__.py)."""
  modules = {}
  for path in sorted((root / package).rglob("*.py")):
    parts = path.relative_to(root).with_suffix("").parts
    if parts[-1] == "__init__":
      parts = parts[:-1]
    modules[".".join(parts)] = path
  return modules


def _is_private(name: str) -> bool:
  return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _resolve_from(module: str, path: pathlib.Path, node: ast.ImportFrom) -> str:
  """The absolute module name of `from <node.module> import ...` (relative ones too)."""
  if not node.level:
    return node.module or ""
  package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
  base = package[:len(package) - node.level + 1]
  return ".".join(base + ([node.module] if node.module else []))


def _dotted(node: ast.expr) -> list[str] | None:
  """["a", "b", "c"] for the expression a.b.c, None for anything else."""
  names = []
  while isinstance(node, ast.Attribute):
    names.append(node.attr)
    node = node.value
  if not isinstance(node, ast.Name):
    return None
  return [node.id] + names[::-1]


def analyse(root: pathlib.Path, modules: dict[str, pathlib.Path]):
  """(graph, violations) of the `modules` under `root`: graph maps each module to the package
  modules it imports (anywhere in the file); violations lists "file:line: what" for every use
  of another module's underscore name (`from m import _x`, `import m._x`, `m._x`)."""
  graph, violations = {}, []
  for module, path in modules.items():
    tree = ast.parse(path.read_text(), str(path))
    edges, bound = set(), {}   # bound: local name -> package module it names
    where = lambda node: f"{path.relative_to(root)}:{node.lineno}"
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        for alias in node.names:
          parts = alias.name.split(".")
          known = [".".join(parts[:i]) for i in range(1, len(parts) + 1)
                   if ".".join(parts[:i]) in modules]
          if not known:
            continue
          edges.add(known[-1])
          if any(_is_private(p) for p in parts):
            violations.append(f"{where(node)}: import {alias.name} (a private module)")
          bound[alias.asname or parts[0]] = alias.name if alias.asname else parts[0]
      elif isinstance(node, ast.ImportFrom):
        base = _resolve_from(module, path, node)
        for alias in node.names:
          target = f"{base}.{alias.name}"
          if target in modules:
            edges.add(target)
            bound[alias.asname or alias.name] = target
          elif base in modules:
            edges.add(base)
          else:
            continue
          if _is_private(alias.name):
            violations.append(f"{where(node)}: from {base} import {alias.name}")
    for node in ast.walk(tree):
      names = _dotted(node) if isinstance(node, ast.Attribute) else None
      if not names or names[0] not in bound:
        continue
      current, rest = bound[names[0]], names[1:]
      while rest and f"{current}.{rest[0]}" in modules:
        current, rest = f"{current}.{rest[0]}", rest[1:]
      if rest and _is_private(rest[0]):
        violations.append(f"{where(node)}: {current}.{rest[0]}")
    edges.discard(module)
    graph[module] = sorted(edges)
  return graph, sorted(set(violations))


def find_cycle(graph: dict[str, list[str]]) -> list[str] | None:
  """One import cycle [a, b, ..., a] in `graph`, or None."""
  state, stack = {}, []   # state: 1 = on the stack, 2 = done

  def visit(module):
    state[module] = 1
    stack.append(module)
    for target in graph.get(module, ()):
      if state.get(target) == 1:
        return stack[stack.index(target):] + [target]
      if target not in state and (cycle := visit(target)):
        return cycle
    stack.pop()
    state[module] = 2
    return None

  for module in sorted(graph):
    if module not in state and (cycle := visit(module)):
      return cycle
  return None


def all_modules() -> dict[str, pathlib.Path]:
  return {name: path for package in PACKAGES for name, path in package_modules(REPO, package).items()}


def test_no_import_cycles():
  graph, _ = analyse(REPO, all_modules())
  assert {module.split(".")[0] for module in graph} == set(PACKAGES)
  cycle = find_cycle(graph)
  assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_dependencies_point_one_way():
  graph, _ = analyse(REPO, all_modules())
  rank = {package: i for i, package in enumerate(PACKAGES)}
  backwards = [f"{module} imports {target}" for module, targets in graph.items()
               for target in targets
               if rank[target.split(".")[0]] < rank[module.split(".")[0]]]
  assert not backwards, "imports against experiments -> zoo -> kernels:\n" + "\n".join(backwards)


@pytest.mark.parametrize("package", PACKAGES)
def test_no_module_uses_another_modules_underscore_names(package):
  _, violations = analyse(REPO, package_modules(REPO, package))
  assert not violations, "underscore names used across modules:\n" + "\n".join(violations)


def test_the_checks_find_what_they_look_for(tmp_path):
  """A package with a lazy-import cycle and every kind of underscore access."""
  files = {
      "pkg/__init__.py": "",
      "pkg/a.py": "from pkg import b\nfrom pkg.b import _helper\n",
      "pkg/b.py": "def f():\n  from pkg import a\n  return a._x\n",
      "pkg/c.py": "import pkg._private\nfrom . import b as bee\ny = bee._z\n",
      "pkg/_private.py": "",
  }
  for name, text in files.items():
    (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / name).write_text(text)
  graph, violations = analyse(tmp_path, package_modules(tmp_path, "pkg"))
  assert find_cycle(graph) in (["pkg.a", "pkg.b", "pkg.a"], ["pkg.b", "pkg.a", "pkg.b"])
  assert violations == ["pkg/a.py:2: from pkg.b import _helper", "pkg/b.py:3: pkg.a._x",
                        "pkg/c.py:1: import pkg._private (a private module)",
                        "pkg/c.py:3: pkg.b._z"]


def test_import_and_xla_kernels_load_no_pallas_backend():
  """`import kernels` loads no Pallas or Mosaic module beyond those `import jax` loads, and
  `import zoo; zoo.create("unet")` and running every kernel as "auto" on the CPU (which is xla)
  none beyond those `import flax.linen, optax` load (flax reaches jax._src.pallas.core through
  jax.extend): no kernels backend, nothing of jax.experimental.pallas. A JAX upgrade that breaks
  a Pallas backend then cannot break them. Choosing a Pallas implementation loads its backend."""
  code = """
import sys
def loaded():
  return {m for m in sys.modules if "pallas" in m or "mosaic" in m}
import jax, jax.numpy as jnp
base = loaded()
import kernels
print(sorted(loaded() - base))
import flax.linen, optax
base = loaded()
import zoo
zoo.create("unet")
print(sorted(loaded() - base))
boxes, index = jnp.array([[0., 0., 4., 4.]]), jnp.zeros(1, jnp.int32)
kernels.roi_align(jnp.ones((1, 8, 8, 4)), boxes, index, 2)
kernels.multilevel_roi_align([jnp.ones((1, 8, 8, 4))] * 2, boxes, index, 2, strides=(4, 8))
kernels.roi_pool(jnp.ones((1, 8, 8, 4)), boxes, index, 2)
kernels.window_attention(jnp.ones((1, 4, 4, 6)), jnp.zeros((9, 1)), num_heads=1, window_size=2,
                         shift=1)
kernels.dense_crf(jnp.zeros((1, 4, 4, 2)), jnp.zeros((1, 4, 4, 3)), iterations=1)
print(sorted(loaded() - base))
kernels.roi_align(jnp.ones((1, 8, 8, 4)), boxes, index, 2, implementation="pallas_tpu")
print(sorted(loaded() - base))
"""
  result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  by_kernels, by_zoo, by_xla, by_tpu = result.stdout.strip().splitlines()[-4:]
  assert by_kernels == "[]", f"import kernels loaded {by_kernels}"
  assert by_zoo == "[]", f"import zoo; zoo.create('unet') loaded {by_zoo}"
  assert by_xla == "[]", f"the xla kernels loaded {by_xla}"
  assert "'kernels.roi.pallas_tpu'" in by_tpu and "'jax.experimental.pallas.tpu'" in by_tpu
  assert "kernels.roi.pallas_mosaic_gpu" not in by_tpu and "kernels.mosaic_gpu_common" not in by_tpu
