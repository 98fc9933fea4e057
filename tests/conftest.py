"""Test-session setup: 8 virtual CPU devices, so multi-device tests run on any machine.

XLA reads the flag when jax initialises its backends, so it is set before any test imports
jax. Single-device tests simply use the first device.
"""

import os

os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8"]).strip()
