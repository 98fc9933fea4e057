"""The benchmark scripts' harness: flags, timing windows, tables, floors and peer processes.

Every `experiments/bench_*.py` times implementations of one computation side by side:

    BENCH = BenchmarkFlags(quick={"repeats": 3})   # module level: --quick, --markdown, ...
    ...
    rows = {"xla": Timed(lambda: f(x), jax.block_until_ready, min_window_s=0.02),
            "pallas_gpu": Timed(lambda: g(x), jax.block_until_ready, min_window_s=0.02)}
    timings = alternate(rows, windows=5)     # {name: Timing}: seconds per call, per window
    table = Table(["implementation", "ms", "windows ms"], markdown=BENCH.markdown.value)
    table.row(["xla", f"{timings['xla'].median * 1e3:.2f}", timings["xla"].windows()])

The rows take turns window by window (`alternate`), so that load from other processes on the
machine falls on every row alike, and each row keeps all its windows: the tables print them.

A peer (PyTorch, torchvision, timm, pydensecrf) runs in a process of its own: `Peer` starts a
script of `experiments/peers/` with the interpreter `--torch_python` names and sends it one
JSON request a line on stdin; `serve`, the script's main loop, answers on stdout. Timed next
to XLA in one process, PyTorch was found starved of threads (both size their thread pools to
the cores). A peer's rows are `Timed` on its side and `PeerRow`s here, so they take their
turns in `alternate` with ours; arrays travel as .npz files whose paths the requests name.
On a GPU both processes hold device memory at once: JAX preallocates 75% of it (unless
XLA_PYTHON_CLIENT_MEM_FRACTION says otherwise) and the peer has the rest.

The floor of a computation is the time this device cannot beat: bytes / bandwidth for a
memory-bound op (`bandwidth_gbs`), FLOPs / peak for a compute-bound step (`peak_gflops`);
"of floor" = floor / measured time.

Only the standard library is imported at module level (jax and numpy come in as arguments,
absl inside `BenchmarkFlags`): a script parses its flags before JAX starts, and a peer script
imports this module in a Python that has torch but maybe neither jax nor absl.
"""

import dataclasses
import importlib
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_REPLY = "@benchmarking "  # marks the protocol's lines among whatever else a peer prints

# ------------------------------------------------------------------------------------------------
# Flags and the launcher


class BenchmarkFlags:
  """The flags every benchmark has: --quick, --markdown and --torch_python; with `kernel`,
  also the kernel benchmarks' --repeats, --min_window_ms, --interpret and --bandwidth_gbs.

  Make one at module level (absl defines flags at import time). `quick` maps names of the
  script's flags to the values --quick gives them, each unless it is passed.
  """

  def __init__(self, quick: dict[str, Any], *, kernel: bool = False):
    from absl import flags
    self.quick_values = quick
    given = " ".join(f"--{name}={_flag_text(value)}" for name, value in quick.items())
    self.quick = flags.DEFINE_bool("quick", False,
                                   f"A small problem, to smoke-test the script: {given}.")
    self.markdown = flags.DEFINE_bool("markdown", False, "Print the tables as Markdown.")
    self.torch_python = flags.DEFINE_string(
        "torch_python", sys.executable,
        "The Python interpreter that runs the peer (PyTorch, torchvision, timm or pydensecrf) "
        "in a process of its own; it needs the peer's packages, not jax ('' = no peer).")
    if kernel:
      self.repeats = flags.DEFINE_integer("repeats", 5, "Kernel rows: timed windows per row; "
                                          "the median is reported.")
      self.min_window_ms = flags.DEFINE_float("min_window_ms", 20.0, "Kernel rows: a timed "
                                              "window repeats the call until it lasts this long.")
      self.interpret = flags.DEFINE_bool(
          "interpret", False, "Also run Pallas implementations without their accelerator, in "
          "interpret mode (meaningless times; use with --quick).")
      self.bandwidth_gbs = flags.DEFINE_float(
          "bandwidth_gbs", None, "Device bandwidth in GB/s for the byte floor (default: measured).")

  def setting(self, flag):
    """`flag`'s value, or its --quick value when --quick is on and the flag was not passed."""
    if self.quick.value and flag.name in self.quick_values and not flag.present:
      return self.quick_values[flag.name]
    return flag.value


def _flag_text(value) -> str:
  return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def run(main: Callable[[], None]):
  """Runs a benchmark's `main()` as a launcher does: bad flags and our ValueErrors as one line."""
  from experiments import launcher

  def checked(argv):
    if len(argv) > 1:
      raise ValueError(f"Unexpected arguments {argv[1:]}: every setting is a flag.")
    main()

  launcher.run(checked)


def checked_names(flag, allowed) -> list[str]:
  """A list flag's values, each one of `allowed`, or ValueError naming the flag."""
  for name in flag.value:
    if name not in allowed:
      raise ValueError(f"--{flag.name}: {name!r} is not one of {tuple(allowed)}.")
  return list(flag.value)


def integers(flag, values=None) -> list[int]:
  """A list flag's values (or `values` it gave) as integers, or ValueError naming the flag."""
  try:
    return [int(v) for v in (flag.value if values is None else values)]
  except ValueError as e:
    raise ValueError(f"--{flag.name} takes integers ({e}).") from None


def device_line(jax) -> str:
  """What the numbers ran on: device, jax version, host cores and their load, XLA_FLAGS."""
  device = jax.devices()[0]
  return (f"device: {device.device_kind} ({device.platform}), jax {jax.__version__}, "
          f"{len(os.sched_getaffinity(0))} host cores (load average {os.getloadavg()[0]:.1f} at "
          f"the start: other processes share them), "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")


def without_accelerator(implementation: str, platform: str) -> str:
  """Why a Pallas `implementation` is not timed on `platform` ("gpu", "tpu", "cpu"), or ''."""
  needs = {"pallas_gpu": "gpu", "pallas_tpu": "tpu"}.get(implementation)
  if needs is None or needs == platform:
    return ""
  return f"no {needs.upper()} here (interpret mode is a correctness tool, not a benchmark)"


def first_line(error) -> str:
  """The error's first line, without the C++ source location torch puts in front."""
  text = (str(error).strip().splitlines() or [""])[0]
  if ".cpp:" in text or ".cu:" in text:
    text = text.rsplit(", ", 1)[-1]
  return f"{type(error).__name__}: {text}"[:200]


# ------------------------------------------------------------------------------------------------
# Timing


class Timed:
  """One call, timed in windows: a window makes `calls` calls and waits for the last one.

  Args:
    run: () -> result, the call, its inputs already on the device.
    sync: result -> result, waits for the device (jax.block_until_ready, torch.cuda
      synchronize); identity for host code.
    calls: calls per window; or `min_window_s`: `warm_up` then sets it so that a window
      lasts at least that many seconds (1 to 1000 calls).
    warmup: untimed calls in `warm_up` (compilation, caches, allocator).

  `first` holds the first call's result, `result` the latest (for reproducibility checks).
  """

  def __init__(self, run: Callable[[], Any], sync: Callable[[Any], Any] = lambda result: result,
               *, calls: int | None = None, min_window_s: float | None = None, warmup: int = 1):
    if (calls is None) == (min_window_s is None):
      raise ValueError("Timed takes either calls (per window) or min_window_s, and not both.")
    self.run, self.sync, self.calls, self.min_window_s = run, sync, calls, min_window_s
    self.warmup = max(warmup, 1)
    self.first = self.result = None

  def warm_up(self):
    """The untimed calls; with `min_window_s`, one more timed call sets `calls`."""
    for _ in range(self.warmup):
      self.result = self.sync(self.run())
      if self.first is None:
        self.first = self.result
    if self.min_window_s is not None:
      start = time.perf_counter()
      self.result = self.sync(self.run())
      once = time.perf_counter() - start
      self.calls = max(1, min(1000, int(self.min_window_s / max(once, 1e-6))))

  def window(self) -> float:
    """Seconds per call over one window."""
    start = time.perf_counter()
    for _ in range(self.calls):
      self.result = self.run()
    self.sync(self.result)  # one device, one stream: the last call finishing means all have
    return (time.perf_counter() - start) / self.calls


@dataclasses.dataclass
class Timing:
  """A row's seconds per call, one per window; `error` says why it stopped, if it did."""
  seconds: list[float]
  error: str = ""

  @property
  def median(self) -> float:
    return statistics.median(self.seconds)

  @property
  def best(self) -> float:
    return min(self.seconds)

  def windows(self, scale: float = 1e3, digits: int = 2) -> str:
    """Every window, e.g. '2.01 1.98 2.10' (milliseconds at the default scale)."""
    return " ".join(f"{s * scale:.{digits}f}" for s in self.seconds)


def alternate(rows: dict, windows: int) -> dict[str, Timing]:
  """Warms every row up, then times `windows` windows of each, the rows taking turns.

  Window w of every row runs before window w + 1 of any, so load from other processes falls
  on all rows alike. A row that raises keeps the windows it had, records the error's first
  line and sits out the rest; the others go on.

  Args:
    rows: {name: Timed or PeerRow}, in the order they take their turns.
  """
  timings = {name: Timing([]) for name in rows}

  def attempt(name, call):
    try:
      return call()
    except Exception as e:  # one failing row (an unsupported shape, say) must not stop the rest
      timings[name].error = first_line(e)

  for name, timed in rows.items():
    attempt(name, timed.warm_up)
  for _ in range(windows):
    for name, timed in rows.items():
      if not timings[name].error:
        seconds = attempt(name, timed.window)
        if seconds is not None:
          timings[name].seconds.append(seconds)
  return timings


# ------------------------------------------------------------------------------------------------
# Tables


class Table:
  """Rows printed as they come: aligned columns, or Markdown.

  Args:
    headers: the column names; an aligned column is as wide as its header or `widths[header]`.
    labels: how many leading columns are labels (left-aligned); the rest are numbers.
    markdown: print `| a | b |` rows under a `| --- |` line.
  """

  def __init__(self, headers: list[str], *, widths: dict[str, int] | None = None, labels: int = 1,
               markdown: bool = False):
    self.widths = [max(len(h), (widths or {}).get(h, 0)) for h in headers]
    self.labels, self.markdown = labels, markdown
    self.row(headers)
    if markdown:
      self.row(["---"] * len(headers))

  def row(self, cells):
    """Prints one row; missing trailing cells are empty."""
    cells = [str(c) for c in cells] + [""] * (len(self.widths) - len(cells))
    if self.markdown:
      print("| " + " | ".join(cells) + " |", flush=True)
    else:
      print(" ".join(c.ljust(w) if i < self.labels else c.rjust(w)
                     for i, (c, w) in enumerate(zip(cells, self.widths))).rstrip(), flush=True)


def percent(floor_s: float, measured_s: float) -> str:
  """The fraction of the floor reached: floor time / measured time."""
  return f"{floor_s / measured_s:.1%}"


# ------------------------------------------------------------------------------------------------
# The device's peak and bandwidth, for the floors


def cpu_peak_gflops() -> tuple[float, str]:
  """Nominal fp32 peak of this machine's CPU cores and how it was estimated.

  cores x clock (/proc/cpuinfo) x fp32 lanes of the FMA datapath x 2 FMA pipes x 2 FLOPs;
  AMD Zen 3/4 (family 0x19) execute AVX-512 as two 256-bit halves, so 8 lanes there.
  """
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
  timed = Timed(lambda: matmul(a), jax.block_until_ready, calls=1)
  return 2 * n**3 / alternate({"matmul": timed}, 5)["matmul"].best / 1e9


def peak_gflops(jax, jnp, *, given: float | None, given_how: str, dtype="float32"):
  """(GFLOP/s, how it was obtained): the device's peak for a FLOP floor.

  `given` (from a flag, `given_how` names it) if set; on a CPU the larger of the nominal peak
  (`cpu_peak_gflops`) and a timed 2048^3 float32 matmul (a virtual machine reports its base
  clock, not its boost clock); on an accelerator a timed 8192^3 matmul in `dtype` (give the
  datasheet's peak through the flag instead).
  """
  if given:
    return given, given_how
  if jax.devices()[0].platform != "cpu":
    measured = measured_matmul_gflops(jax, jnp, 8192, jnp.dtype(dtype))
    return measured, f"a 8192^3 {jnp.dtype(dtype).name} matmul ({given_how} for the datasheet's)"
  nominal, how = cpu_peak_gflops()
  measured = measured_matmul_gflops(jax, jnp)
  return max(nominal, measured), (f"{how} = {nominal:.0f} GFLOP/s nominal; a 2048^3 matmul ran "
                                  f"at {measured:.0f}")


def bandwidth_gbs(jax, given: float | None, min_window_s: float, nbytes: int = 256 << 20):
  """(GB/s, how it was obtained): `given` (--bandwidth_gbs) if set, else a jitted in-place
  `x + 1` over `nbytes`, windows of at least `min_window_s` seconds.

  Read + write counted, best of 10 windows. The array is donated, so every call reuses its
  buffer: a fresh output buffer each call would time the operating system's first-touch page
  faults on a CPU, not the memory; and 256 MiB does not sit in a CPU's last-level cache.
  """
  if given:
    return given, "--bandwidth_gbs"
  add = jax.jit(lambda x: x + 1, donate_argnums=0)
  x = add(jax.numpy.zeros((nbytes // 4,), jax.numpy.float32))

  def step():
    nonlocal x
    x = add(x)
    return x

  timed = Timed(step, jax.block_until_ready, min_window_s=min_window_s)
  best = alternate({"x + 1": timed}, 10)["x + 1"].best
  return 2 * nbytes / best / 1e9, (f"measured: in-place x + 1 over {nbytes >> 20} MiB float32, "
                                   "best of 10 windows")


# ------------------------------------------------------------------------------------------------
# Peers: a script of experiments/peers/ in a process of its own


class PeerError(Exception):
  """A peer could not answer: not importable there (`import_error`), failed, or exited."""

  def __init__(self, message: str, import_error: bool = False):
    super().__init__(message)
    self.import_error = import_error


@dataclasses.dataclass
class Prepared:
  """What a peer script's `prepare(spec)` returns to `serve`.

  rows: {name: Timed}, the peer's timed calls (`serve` warms them up).
  info: JSON facts for the harness (versions, device, parameter count ...).
  report: called after the windows, returns JSON facts about the results (it may write
    arrays to a file that the spec names).
  """
  rows: dict
  info: dict = dataclasses.field(default_factory=dict)
  report: Callable[[], dict] | None = None


def serve(prepare: Callable[[dict], Prepared], imports: tuple[str, ...]):
  """A peer script's main loop: one JSON request a line on stdin, one reply each on stdout.

  It first imports the packages `imports` names and says whether it could:
      (at start)        -> {"ready": python version} or {"error": ..., "import_error": true}
      {"prepare": spec} -> {"info": {...}, "rows": [names]}  (prepare(spec), rows warmed up)
      {"window": name}  -> {"seconds": seconds per call, over one window of that row}
      {"report": null}  -> what `report()` returns ({} without one)
      a request that raises -> {"error": "Type: message", "import_error": bool}
  It returns when stdin closes. The script's own prints go to stderr.
  """
  replies, sys.stdout = sys.stdout, sys.stderr

  def reply(message: dict):
    replies.write(_REPLY + json.dumps(message) + "\n")
    replies.flush()

  try:
    for package in imports:
      importlib.import_module(package)
  except ImportError as e:
    reply({"error": first_line(e), "import_error": True})
    return
  reply({"ready": sys.version.split()[0]})
  prepared = None
  for line in sys.stdin:
    request = json.loads(line)
    try:
      if "prepare" in request:
        prepared = None  # the previous rows' memory goes before the next rows are built
        prepared = prepare(request["prepare"])
        for timed in prepared.rows.values():
          timed.warm_up()
        answer = {"info": prepared.info, "rows": list(prepared.rows)}
      elif "window" in request:
        answer = {"seconds": prepared.rows[request["window"]].window()}
      else:
        answer = prepared.report() if prepared.report else {}
    except Exception as e:  # the harness prints it in the peer's rows
      answer = {"error": first_line(e), "import_error": isinstance(e, ImportError)}
    reply(answer)


class Peer:
  """A peer script (module `experiments.peers.<name>`) in its own `python` process.

      with Peer("experiments.peers.torchvision_roi", python) as peer:
        rows = peer.prepare(spec)              # {name: PeerRow}; PeerError if it cannot
        timings = alternate({**ours, **rows}, windows)
        facts = peer.report()

  The process sees this repository on PYTHONPATH and nothing else from ours (another
  Python's site-packages must not leak in). `directory` is a temporary folder for the .npz
  files that carry arrays both ways.
  """

  def __init__(self, module: str, python: str):
    self.module, self.python = module, python
    self.info = {}
    self._directory = tempfile.TemporaryDirectory(prefix="peer-")
    self.directory = self._directory.name
    self._stderr = tempfile.TemporaryFile("w+")
    env = dict(os.environ, PYTHONPATH=REPO_ROOT)
    self._process = None
    try:
      self._process = subprocess.Popen([python, "-m", module], stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, stderr=self._stderr, text=True,
                                       cwd=REPO_ROOT, env=env)
    except OSError as e:
      self.close()
      raise PeerError(f"cannot start {python!r}: {first_line(e)}") from None
    try:
      self.python_version = self._reply()["ready"]
    except PeerError:
      self.close()
      raise

  def request(self, **request) -> dict:
    """Sends one request and returns the reply; PeerError for an error reply or an exit."""
    try:
      self._process.stdin.write(json.dumps(request) + "\n")
      self._process.stdin.flush()
    except BrokenPipeError:
      pass  # it has exited: reading says how
    return self._reply()

  def _reply(self) -> dict:
    for line in self._process.stdout:
      if line.startswith(_REPLY):
        reply = json.loads(line.removeprefix(_REPLY))
        if "error" in reply:
          raise PeerError(reply["error"], reply["import_error"])
        return reply
    status = self._process.wait()
    self._stderr.seek(0)
    lines = [line for line in self._stderr.read().splitlines() if line.strip()] or ["no output"]
    raise PeerError(f"{self.python} -m {self.module} exited with status {status}: "
                    f"{lines[-1][:200]}")

  def prepare(self, spec: dict) -> dict[str, "PeerRow"]:
    """The peer's rows for `spec`, warmed up; `info` holds the facts it sent with them."""
    reply = self.request(prepare=spec)
    self.info = reply["info"]
    return {name: PeerRow(self, name) for name in reply["rows"]}

  def report(self) -> dict:
    """The peer's facts about its latest results (after the windows)."""
    return self.request(report=None)

  def close(self):
    process = self._process
    if process is not None:  # None when the interpreter did not start
      process.stdin.close()
      try:
        process.wait(timeout=60)
      except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
      process.stdout.close()
    self._stderr.close()
    self._directory.cleanup()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


class PeerRow:
  """One of a peer's rows, as `alternate` takes it: its windows run in the peer's process."""

  def __init__(self, peer: Peer, name: str):
    self.peer, self.name = peer, name

  def warm_up(self):
    pass  # the peer warmed its rows up when it prepared them

  def window(self) -> float:
    return self.peer.request(window=self.name)["seconds"]


def start_peer(module: str, python: str, what: str) -> tuple["Peer | None", str]:
  """(the running peer, '') or (None, why there is none), `what` naming the peer."""
  if not python:
    return None, f"{what}: no peer (--torch_python='')"
  try:
    return Peer(module, python), ""
  except PeerError as e:
    return None, peer_problem(f"{what} in {python}", e)


def peer_problem(what: str, error: PeerError) -> str:
  """How a peer's failure reads in a table or note: not importable, or failed."""
  return f"{what}: {'not importable' if error.import_error else 'failed'} ({error})"


def close_peer(peer: Peer | None):
  """Prints the peer's versions, if it sent any (they come with its rows), and stops it."""
  if peer is None:
    return
  if "versions" in peer.info:
    print(f"peer: {peer.info['versions']} (own process)")
  peer.close()
