"""Test-wide set-up: eight host devices for the sharding tests.

The flag must be set before JAX is first imported, hence here.
"""

import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
