"""The check of the optimizer's output folds its mask (issue 24, items 1, 5).

``numerics.folded_all`` ANDs a large mask in ``k`` pieces before the one
boolean reduction, so that XLA:CPU writes ``k`` times fewer mask bytes.
These tests pin that the fold loses nothing (a NaN or Inf at any element
of any piece, of every fold kind, fails the check) and that the fused,
checked guard's compiled temporaries shrink by the fold.
"""


import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_guard as og
from optax_guard.transforms import fused, numerics

# (shape, pieces, how): folded within rows (1000 = 8 x 125), across rows
# (11 columns, 2048 = 8 x 256 rows), not at all (131 and 127 are prime),
# a 1-D leaf (20000 = 8 x 2500), and one at the size where folding starts.
_SHAPES = [((24, 1000), 'columns'), ((2048, 11), 'rows'),
           ((131, 127), 'none'), ((20000,), 'columns'),
           ((128, 128), 'none')]


def _boundaries(length, pieces):
  """Indices of the first and last element of every piece (and 0, -1)."""
  size = length // pieces
  return sorted({0, length - 1} | {i * size for i in range(pieces)}
                | {i * size + size - 1 for i in range(pieces)})


@pytest.mark.parametrize(('shape', 'how'), _SHAPES)
def test_a_nonfinite_element_in_any_piece_fails_the_check(shape, how):
  columns = shape[-1]
  rows = int(np.prod(shape)) // columns
  pieces = {'columns': numerics._fold_factor(columns),
            'rows': numerics._fold_factor(rows), 'none': 1}[how]
  assert (pieces > 1) == (how != 'none')

  @jax.jit
  def check(row, column, bad):
    flat = jnp.zeros((rows, columns), jnp.float32).at[row, column].set(bad)
    return numerics.outputs_finite({'u': flat.reshape(shape)}, None, None)

  assert bool(check(0, 0, 1.0))
  row_indices = _boundaries(rows, pieces if how == 'rows' else 1)
  column_indices = _boundaries(columns, pieces if how == 'columns' else 1)
  for bad in (jnp.nan, jnp.inf, -jnp.inf):
    for row in row_indices:
      for column in column_indices:
        assert not bool(check(row, column, bad)), (row, column, bad)


def test_folded_all_is_all_for_random_masks():
  rng = np.random.default_rng(0)
  fold = jax.jit(numerics.folded_all)
  for shape in [(24, 1000), (2048, 11), (131, 127), (20000,), (3, 8, 2000)]:
    for _ in range(5):
      mask = np.ones(shape, bool)
      mask.flat[rng.integers(mask.size)] = False
      assert not bool(fold(jnp.asarray(mask)))
    assert bool(fold(jnp.ones(shape, bool)))


def test_fold_factor():
  assert [numerics._fold_factor(n) for n in (1000, 972, 561, 187, 11, 1)] == [
      8, 6, 3, 1, 1, 1]


def _fused_temp_bytes(shape, count):
  """Temporaries of the checked fused update of ``count`` adamw leaves of
  ``shape``, jitted and donated as in ``og.make_train_step`` (compiled for
  abstract inputs)."""
  tx = og.guard(optax.adamw(1e-3))
  apply = fused.update_and_apply(tx)
  params = {f'w{i}': jax.ShapeDtypeStruct(shape, jnp.float32)
            for i in range(count)}
  state = jax.eval_shape(tx.init, params)
  step = jax.jit(lambda p, s, g: apply(g, s, p), donate_argnums=(0, 1),
                 keep_unused=True)
  return step.lower(params, state, params).compile().memory_analysis(
  ).temp_size_in_bytes


def test_the_checked_fused_update_keeps_a_folded_mask_only(monkeypatch):
  # Unfolded, XLA:CPU keeps one byte per element of the largest leaf shape
  # as the check's mask (4 MiB here); folded by 8, 512 KiB.
  elements = 4096 * 1024
  folded = _fused_temp_bytes((4096, 1024), 3)
  assert elements / 8 <= folded < elements / 8 + (64 << 10), folded
  monkeypatch.setattr(numerics, '_MAX_FOLD', 1)
  unfolded = _fused_temp_bytes((4096, 1024), 3)
  assert elements <= unfolded < elements + (64 << 10), unfolded
