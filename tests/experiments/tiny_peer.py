"""A peer script for test_benchmarking.py: the standard library only, so any Python runs it.

spec: seconds (one call's sleep), calls (per window); "fail": prepare raises; "exit": the
process exits with status 3 while preparing.
"""

import os
import sys
import time

from experiments import benchmarking


def prepare(spec: dict) -> benchmarking.Prepared:
  if spec.get("fail"):
    raise RuntimeError("asked to fail")
  if spec.get("exit"):
    print("exiting as asked", file=sys.stderr)
    os._exit(3)
  print("this print must not be taken for a reply")
  row = benchmarking.Timed(lambda: time.sleep(spec["seconds"]), calls=spec["calls"])
  return benchmarking.Prepared(rows={"sleep": row}, info={"pid": os.getpid()},
                               report=lambda: {"calls": row.calls})


if __name__ == "__main__":
  benchmarking.serve(prepare, imports=("json",))
