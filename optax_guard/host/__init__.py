"""Host layer: checkpoints, recovery, the training loop and data iterators."""
