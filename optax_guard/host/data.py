"""A small restorable data iterator for in-memory datasets."""

from typing import Any, Mapping

import numpy as np


class ShuffledBatches:
  """Endless shuffled minibatches of in-memory arrays, with a restorable state.

  Each epoch draws a fresh permutation from ``numpy.random.default_rng((seed,
  epoch))``; a partial batch at the end of an epoch is dropped. The state is a
  small JSON dict (``get_state`` / ``set_state``, the protocol of grain's
  iterators), so a :class:`optax_guard.Checkpointer` saves it with the model
  and a resumed run draws exactly the batches the interrupted one would have.

  Examples:
    >>> import numpy as np
    >>> import optax_guard as og
    >>> data = og.ShuffledBatches({'x': np.arange(10)}, batch_size=4, seed=0)
    >>> first = next(data)['x']
    >>> state = data.get_state()
    >>> second = next(data)['x']
    >>> data.set_state(state)
    >>> bool(np.array_equal(next(data)['x'], second)), state
    (True, {'seed': 0, 'epoch': 0, 'position': 4})

  Args:
    arrays: a dict of arrays sharing their first dimension (the examples).
    batch_size: examples per batch, at most the number of examples.
    seed: the shuffling seed.
  """

  def __init__(
      self, arrays: Mapping[str, Any], batch_size: int, *, seed: int = 0
  ):
    self._arrays = {name: np.asarray(a) for name, a in arrays.items()}
    sizes = {name: a.shape[0] if a.ndim else None for name, a in
             self._arrays.items()}
    if not sizes or len(set(sizes.values())) != 1 or None in sizes.values():
      raise ValueError(
          'arrays must be a non-empty dict of arrays with the same first'
          f' dimension, got leading sizes {sizes}.'
      )
    self._size = int(next(iter(self._arrays.values())).shape[0])
    if not isinstance(batch_size, int) or not 1 <= batch_size <= self._size:
      raise ValueError(
          f'batch_size must be an int in [1, {self._size}], got'
          f' {batch_size!r}.'
      )
    if not isinstance(seed, int):
      raise ValueError(f'seed must be an int, got {seed!r}.')
    self._batch_size = batch_size
    self._seed = seed
    self._epoch = 0
    self._position = 0
    self._order = self._permutation(0)

  def _permutation(self, epoch: int) -> np.ndarray:
    return np.random.default_rng((self._seed, epoch)).permutation(self._size)

  def __iter__(self) -> 'ShuffledBatches':
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._position + self._batch_size > self._size:
      self._epoch += 1
      self._position = 0
      self._order = self._permutation(self._epoch)
    index = self._order[self._position:self._position + self._batch_size]
    self._position += self._batch_size
    return {name: a[index] for name, a in self._arrays.items()}

  def get_state(self) -> dict[str, int]:
    """The position in the stream: seed, epoch and offset in the epoch."""
    return {'seed': self._seed, 'epoch': self._epoch,
            'position': self._position}

  def set_state(self, state: Mapping[str, int]) -> None:
    """Moves to a position returned by :meth:`get_state`."""
    if state['seed'] != self._seed:
      raise ValueError(
          f'state was saved with seed {state["seed"]}, this iterator uses'
          f' seed {self._seed}.'
      )
    self._epoch = int(state['epoch'])
    self._position = int(state['position'])
    self._order = self._permutation(self._epoch)
