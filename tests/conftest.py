"""Test-wide set-up: eight host devices for the sharding tests.

The flag must be set before JAX is first imported, hence here.
"""

import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

# Hypothesis profiles for the property suites (tests/test_seam_properties.py,
# the norm properties of test_numerics.py and test_clipping.py, which compile
# for every new shape): `ci` (the default) draws few small examples so the
# suite fits the CI budget; `long` draws many more, for a run by hand:
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


# `pytest -n 2` hands tests to the workers one by one (xdist's `load`), so the
# tests of one module can land on both workers, and each worker then builds
# the module's scope='module' fixtures (the benchmark run, the crash-resume
# reference, the multi-process runs...), so the slowest set-ups can run twice.
# `loadscope` sends each module to one worker; in collection order, not
# largest-module first, so that the slow modules of few tests start early
# and the many small doctests at the end even out the workers' finish. An
# explicit `--dist load` is overridden too; pass another mode to choose it.
def pytest_configure(config):
  if config.getoption('dist', 'no') == 'load':
    config.option.dist = 'loadscope'
    config.option.loadscopereorder = False
