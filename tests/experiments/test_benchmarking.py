"""The benchmark harness (experiments/benchmarking.py): window alternation, tables, peers.

No test here times anything for its own sake (benchmarks are scripts, DESIGN.md "Honesty"):
they check that the harness takes turns, keeps every window, prints what it is given, talks
to a peer process and says why a peer is missing. None needs torch or jax.
"""

import os
import subprocess
import sys

import pytest

from experiments import benchmarking


class Counter:
  """A row for `alternate` that records when its windows ran."""

  def __init__(self, name, log, seconds=1.0, fail_at=None):
    self.name, self.log, self.seconds, self.fail_at = name, log, seconds, fail_at
    self.warmed = False

  def warm_up(self):
    self.warmed = True

  def window(self):
    if len(self.log) == self.fail_at:
      self.log.append(f"{self.name} failed")
      raise RuntimeError(f"{self.name} broke\nsecond line")
    self.log.append(self.name)
    return self.seconds


def test_alternate_takes_turns_and_keeps_every_window():
  log = []
  rows = {"a": Counter("a", log, 1.0), "b": Counter("b", log, 2.0)}
  timings = benchmarking.alternate(rows, windows=3)
  assert log == ["a", "b"] * 3
  assert all(row.warmed for row in rows.values())
  assert timings["a"].seconds == [1.0] * 3 and timings["b"].seconds == [2.0] * 3
  assert timings["b"].median == 2.0 and timings["b"].best == 2.0
  assert timings["a"].windows() == "1000.00 1000.00 1000.00"
  assert timings["a"].windows(scale=1, digits=1) == "1.0 1.0 1.0"


def test_alternate_goes_on_without_a_failing_row():
  log = []
  rows = {"a": Counter("a", log), "b": Counter("b", log, fail_at=4), "c": Counter("c", log)}
  timings = benchmarking.alternate(rows, windows=3)
  assert log == ["a", "b", "c", "a", "b failed", "c", "a", "c"]
  assert timings["b"].seconds == [1.0]
  assert timings["b"].error == "RuntimeError: b broke"
  assert timings["a"].seconds == timings["c"].seconds == [1.0] * 3
  assert not timings["a"].error


def test_timed_counts_calls_and_keeps_first_and_latest_result():
  results = iter(range(100))
  synced = []
  timed = benchmarking.Timed(lambda: next(results), lambda r: synced.append(r) or r, calls=4,
                             warmup=2)
  timed.warm_up()
  assert (timed.first, timed.result) == (0, 1)
  assert timed.window() >= 0
  assert timed.result == 5 and synced == [0, 1, 5]  # one sync per window, on the last call


def test_timed_calibrates_calls_from_the_window_length():
  timed = benchmarking.Timed(lambda: sum(range(1000)), min_window_s=0.05)
  timed.warm_up()
  assert 1 <= timed.calls <= 1000
  with pytest.raises(ValueError, match="either calls"):
    benchmarking.Timed(lambda: None, calls=1, min_window_s=1.0)


def test_table_prints_aligned_and_markdown(capsys):
  table = benchmarking.Table(["op", "impl", "ms"], widths={"impl": 6}, labels=2)
  table.row(["roi", "xla", "1.25"])
  table.row(["roi", "torch", "failed: no"])
  benchmarking.Table(["op", "ms"], markdown=True).row(["roi", "1.25"])
  assert capsys.readouterr().out.splitlines() == [
      "op impl   ms",
      "roi xla    1.25",
      "roi torch  failed: no",
      "| op | ms |",
      "| --- | --- |",
      "| roi | 1.25 |",
  ]


def test_floor_fraction_and_accelerator_notes():
  assert benchmarking.percent(1.0, 4.0) == "25.0%"
  assert benchmarking.without_accelerator("xla", "cpu") == ""
  assert benchmarking.without_accelerator("pallas_tpu", "tpu") == ""
  assert benchmarking.without_accelerator("pallas_gpu", "cpu").startswith("no GPU here")


def test_peer_runs_windows_in_its_own_process():
  with benchmarking.Peer("tests.experiments.tiny_peer", sys.executable) as peer:
    rows = peer.prepare({"seconds": 0.001, "calls": 3})
    assert list(rows) == ["sleep"] and peer.info["pid"] != os.getpid()
    log = []
    timings = benchmarking.alternate({"ours": Counter("ours", log), **rows}, windows=2)
    assert log == ["ours", "ours"]
    assert len(timings["sleep"].seconds) == 2 and min(timings["sleep"].seconds) >= 0.001
    assert peer.report() == {"calls": 3}
    with pytest.raises(benchmarking.PeerError, match="asked to fail") as failed:
      peer.prepare({"fail": True})
    assert not failed.value.import_error
    rows = peer.prepare({"seconds": 0.0, "calls": 1})  # it serves on after an error
    assert list(rows) == ["sleep"]


def test_peer_that_exits_says_how():
  with benchmarking.Peer("tests.experiments.tiny_peer", sys.executable) as peer:
    with pytest.raises(benchmarking.PeerError, match="status 3: exiting as asked"):
      peer.prepare({"exit": True})


def test_missing_peer_packages_are_reported_not_raised():
  # This Python has no timm (tests do not need torch): the harness says so.
  peer, note = benchmarking.start_peer("experiments.peers.timm_train_step", sys.executable,
                                       "timm")
  if peer is not None:
    peer.close()
    pytest.skip("this Python has torch and timm: nothing is missing")
  assert "timm in" in note and "not importable" in note and "No module named" in note
  peer, note = benchmarking.start_peer("experiments.peers.timm_train_step", "", "timm")
  assert peer is None and note == "timm: no peer (--torch_python='')"
  peer, note = benchmarking.start_peer("experiments.peers.timm_train_step",
                                       "/nonexistent/python", "timm")
  assert peer is None and "cannot start '/nonexistent/python'" in note


def test_bench_roi_quick_runs_as_a_script():
  """`python -m experiments.bench_roi --quick`, narrowed to one configuration and short
  windows: the script end to end (flags, timing, floor, table, the missing peer)."""
  env = dict(os.environ, XLA_FLAGS="")  # one CPU device, as a user runs it
  done = subprocess.run(
      [sys.executable, "-m", "experiments.bench_roi", "--quick", "--ops=roi_align",
       "--dtypes=float32", "--output_sizes=7", "--sampling_ratios=2", "--min_window_ms=1",
       "--repeats=2", "--bandwidth_gbs=10", "--markdown", "--torch_python=/nonexistent/python"],
      capture_output=True, text=True, timeout=300, cwd=benchmarking.REPO_ROOT, env=env)
  assert done.returncode == 0, done.stderr[-2000:]
  lines = done.stdout.splitlines()
  assert any(line.startswith("torchvision in /nonexistent/python: failed (cannot start")
             for line in lines), done.stdout
  rows = [line for line in lines if line.startswith("| roi_align | xla |")]
  assert len(rows) == 1, done.stdout
  cells = [c.strip() for c in rows[0].strip("|").split("|")]
  assert cells[:5] == ["roi_align", "xla", "float32", "7x7", "2"]
  assert float(cells[5]) > 0 and cells[9] == "yes"
  assert len(cells[11].split("|")[0].split()) == 2  # both windows of fwd are reported
