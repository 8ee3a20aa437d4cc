"""Per-step layer: pure Optax transformations and the code that reads their state.

Imports only jax, optax and chex (flax lazily, where an ``nnx.Optimizer`` is
handed in).
"""
