"""optax_guard's benchmarks: ``python -m benchmarks --help``."""
