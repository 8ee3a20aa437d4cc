"""Test-wide set-up: eight host devices for the sharding tests.

The flag must be set before JAX is first imported, hence here.
"""

import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

# Hypothesis profiles for the property suites (tests/test_seam_properties.py):
# `ci` (the default) draws few small examples so the suite fits the CI budget;
# `long` draws many more, for a run by hand:
#   HYPOTHESIS_PROFILE=long python -m pytest -q tests/test_seam_properties.py
# Tests that pin their own `max_examples` keep it under either profile.
import hypothesis  # after the environment set-up above

# No shrinking in `ci`: every example compiles a train step, so shrinking a
# failure could take minutes; rerun with `long` for a minimal example.
hypothesis.settings.register_profile(
    'ci', max_examples=15, deadline=None, derandomize=True,
    phases=(hypothesis.Phase.explicit, hypothesis.Phase.reuse,
            hypothesis.Phase.generate),
    suppress_health_check=[hypothesis.HealthCheck.too_slow],
)
hypothesis.settings.register_profile(
    'long', max_examples=500, deadline=None,
    suppress_health_check=[hypothesis.HealthCheck.too_slow],
)
hypothesis.settings.load_profile(os.environ.get('HYPOTHESIS_PROFILE', 'ci'))
