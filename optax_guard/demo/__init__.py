"""The ``optax-guard demo``: a real model on real data, broken on purpose."""
