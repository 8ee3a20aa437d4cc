"""The check of the optimizer's output folds its mask (issue 24, items 1, 5).

``numerics.folded_all`` ANDs ``k`` consecutive rows of a large mask before
the one boolean reduction, so that XLA:CPU writes ``k`` times fewer mask
bytes. These tests pin that the fold loses nothing (a NaN or Inf at any
element of any piece fails the check), that the fused, checked guard's
compiled temporaries shrink by the fold, and that a sharded parameter
folds without moving data between devices.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import optax_guard as og
from optax_guard.transforms import fused, numerics

# (shape, pieces): 8, 3 (24 / 8 would leave 3 row groups, not a multiple
# of 8) and 5 consecutive rows combined, none (131 is prime), none (the
# size where folding starts).
_SHAPES = [((2048, 11), 8), ((24, 1000), 3), ((20000,), 5), ((131, 127), 1),
           ((128, 128), 1)]


@pytest.mark.parametrize(('shape', 'pieces'), _SHAPES)
def test_a_nonfinite_element_in_any_piece_fails_the_check(shape, pieces):
  rows = shape[0]
  folds = int(np.prod(shape)) > numerics._FOLD_FROM
  assert (numerics._fold_factor(rows) if folds else 1) == pieces

  @jax.jit
  def check(row, column, bad):
    flat = jnp.zeros((rows, int(np.prod(shape[1:]))), jnp.float32)
    flat = flat.at[row, column].set(bad)
    return numerics.outputs_finite({'u': flat.reshape(shape)}, None, None)

  assert bool(check(0, 0, 1.0))
  # Every piece of the first two and the last row group, first and last
  # column.
  row_indices = sorted(set(range(min(2 * pieces, rows)))
                       | set(range(rows - pieces, rows)))
  columns = int(np.prod(shape[1:]))
  for bad in (jnp.nan, jnp.inf, -jnp.inf):
    for row in row_indices:
      for column in sorted({0, columns - 1}):
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
  rows = (4096, 2048, 24, 20000, 4104, 22041, 131, 1)
  assert [numerics._fold_factor(n) for n in rows] == [8, 8, 3, 5, 3, 3, 1, 1]


def _placed(sharding, replicated, leaf):
  return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=(
      sharding if leaf.shape == (4096, 1024) else replicated))


def test_a_sharded_parameter_folds_on_each_device():
  # Only the rows are folded: a parameter sharded along its columns, or
  # along rows over 8 devices, needs no data from another device (the
  # boolean all-reduce of the verdict is all).
  tx = og.guard(optax.adamw(1e-3))
  apply = fused.update_and_apply(tx)
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ('a', 'b'))
  for spec in (P(None, ('a', 'b')), P(('a', 'b'), None), P('a', 'b')):
    sharding = NamedSharding(mesh, spec)
    params = {'w': jax.ShapeDtypeStruct((4096, 1024), jnp.float32,
                                        sharding=sharding)}
    # The moments sharded like the params, the step count replicated.
    state = jax.tree.map(
        functools.partial(_placed, sharding, NamedSharding(mesh, P())),
        jax.eval_shape(tx.init, params))
    hlo = jax.jit(lambda p, s, g: apply(g, s, p)).lower(
        params, state, params).compile().as_text()
    for collective in ('collective-permute', 'all-gather', 'all-to-all'):
      assert collective not in hlo, (spec, collective)


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
