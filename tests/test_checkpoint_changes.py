"""Checkpointer: a changed tree is an error, plain Orbax both ways, the best
checkpoint by a user metric (issue 13, items 1, 2 and 7)."""

import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import optax_guard as og
from optax_guard.host import state as state_lib
from optax_guard.host.checkpoint import CorruptCheckpointWarning
from optax_guard.transforms.guard import GuardState

# A damaged step makes Orbax abandon its other reads; og keeps them off the
# console (integrity.quiet_abandoned_reads): nothing unraisable may leak.
pytestmark = pytest.mark.filterwarnings(
    'error::pytest.PytestUnraisableExceptionWarning'
)

TX = og.guard(optax.adam(1e-2))


def make_state(step=0, dtype=jnp.float32, seed=0, tx=TX):
  params = {
      'w': (jax.random.normal(jax.random.key(seed), (8, 4)) / 3).astype(dtype),
      'b': jnp.arange(4, dtype=dtype) / 8,
  }
  return og.TrainState(step, params, tx.init(params))


@jax.jit
def _one_update(params, opt_state):
  grads = jax.tree.map(lambda x: x * 0.5 + 0.25, params)
  updates, opt_state = TX.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state


def trained(step, seed=0):
  """A state whose optimizer moments are not zero (one real update)."""
  state = make_state(step, seed=seed)
  params, opt_state = _one_update(state.params, state.opt_state)
  return state._replace(params=params, opt_state=opt_state)


def assert_bitwise(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# -- 1. A changed tree is the user's change -----------------------------------


def test_dtype_change_is_an_error_naming_each_leaf_and_moves_nothing(tmp_path):
  # Issue 13, reproduction 1: fp32 -> bf16 was quarantined and gave step 0.
  with og.Checkpointer(tmp_path, save_interval_steps=1) as ckpt:
    ckpt.save(trained(3))
  with warnings.catch_warnings():
    warnings.simplefilter('error', CorruptCheckpointWarning)
    with og.Checkpointer(tmp_path) as ckpt:
      with pytest.raises(ValueError) as error:
        ckpt.restore_or_init(make_state(dtype=jnp.bfloat16))
      assert ckpt.all_steps() == [3]
  message = str(error.value)
  assert '6 difference(s)' in message
  for leaf in ('params/w', 'opt_state/inner_state/0/mu/w',
               'opt_state/inner_state/0/nu/w'):
    shape = '[8, 4]'
    assert (f'{leaf}: saved float32{shape}, target bfloat16{shape}'
            ' (cast_dtypes=True would cast it)') in message
  assert 'params/b: saved float32[4], target bfloat16[4]' in message
  assert not (tmp_path / 'corrupted').exists()


def test_cast_dtypes_restores_float32_as_bfloat16(tmp_path):
  saved = trained(3)
  with og.Checkpointer(tmp_path, save_interval_steps=1) as ckpt:
    ckpt.save(saved)
  target = make_state(dtype=jnp.bfloat16)
  with og.Checkpointer(tmp_path, cast_dtypes=True) as ckpt:
    restored, _ = ckpt.restore_or_init(target)
  assert restored.step == 3
  expected = jax.tree.map(lambda x, t: x.astype(t.dtype),
                          (saved.params, saved.opt_state),
                          (target.params, target.opt_state))
  assert_bitwise((restored.params, restored.opt_state), expected)
  assert isinstance(restored.opt_state, GuardState)


def test_cast_dtypes_never_casts_between_integers_and_floats(tmp_path):
  state = make_state(1)
  with og.Checkpointer(tmp_path, save_interval_steps=1) as ckpt:
    ckpt.save(state)
  target = state._replace(params={**state.params,
                                  'b': jnp.arange(4, dtype=jnp.int32)})
  with og.Checkpointer(tmp_path, cast_dtypes=True) as ckpt:
    with pytest.raises(ValueError,
                       match=r'params/b: saved float32\[4\], target int32\[4\]\n'):
      ckpt.restore_or_init(target)


def test_changed_optimizer_names_the_leaves_on_both_sides(tmp_path):
  with og.Checkpointer(tmp_path, save_interval_steps=1) as ckpt:
    ckpt.save(make_state(2))
  sgd = og.guard(optax.sgd(1e-2, momentum=0.9))
  with og.Checkpointer(tmp_path) as ckpt:
    with pytest.raises(ValueError) as error:
      ckpt.restore_or_init(make_state(tx=sgd))
    assert ckpt.all_steps() == [2]
  message = str(error.value)
  assert ('opt_state/inner_state/0/nu/w: saved float32[8, 4], not in the'
          ' target') in message
  assert ('opt_state/inner_state/0/trace/w: not saved, target'
          ' float32[8, 4]') in message


def _plain_orbax_single_item(directory, state):
  with ocp.CheckpointManager(directory) as manager:
    manager.save(state.step, args=ocp.args.StandardSave(
        {'params': state.params, 'opt_state': state.opt_state}))


def test_plain_orbax_step_is_an_error_naming_its_items_not_corruption(
    tmp_path):
  # Issue 13, reproduction 1: a plain Orbax directory was quarantined.
  _plain_orbax_single_item(tmp_path, trained(5))
  with warnings.catch_warnings():
    warnings.simplefilter('error', CorruptCheckpointWarning)
    with og.Checkpointer(tmp_path) as ckpt:
      with pytest.raises(ValueError,
                         match=r"step 5 .* plain Orbax \(items \['default'\]\)"
                         r'.*from_orbax'):
        ckpt.restore_or_init(make_state())
      assert ckpt.all_steps() == [5]
  assert os.listdir(tmp_path / '5' / 'default')


# -- 2. Migration both ways ---------------------------------------------------


def test_resume_from_plain_orbax_single_item_then_continue_in_og_layout(
    tmp_path):
  saved = trained(5)
  _plain_orbax_single_item(tmp_path, saved)
  from_orbax = {'params': 'default/params', 'opt_state': 'default/opt_state'}
  with og.Checkpointer(tmp_path, save_interval_steps=5,
                       from_orbax=from_orbax) as ckpt:
    restored, events = ckpt.restore_or_init(make_state())
    assert restored.step == 5 and events == {}
    assert isinstance(restored.opt_state, GuardState)
    assert_bitwise((restored.params, restored.opt_state),
                   (saved.params, saved.opt_state))
    assert ckpt.save(restored._replace(step=10))
  with og.Checkpointer(tmp_path, from_orbax=from_orbax) as ckpt:
    assert ckpt.all_steps() == [5, 10]
    again, _ = ckpt.restore_or_init(make_state())
  assert again.step == 10
  assert_bitwise(again.params, saved.params)


def test_resume_from_plain_orbax_composite_with_other_item_names(tmp_path):
  saved = trained(7, seed=1)
  with ocp.CheckpointManager(tmp_path, item_names=('model', 'optimizer')) as m:
    m.save(7, args=ocp.args.Composite(
        model=ocp.args.StandardSave(saved.params),
        optimizer=ocp.args.StandardSave(saved.opt_state)))
  with og.Checkpointer(
      tmp_path, from_orbax={'params': 'model', 'opt_state': 'optimizer'}
  ) as ckpt:
    restored, _ = ckpt.restore_or_init(make_state())
  assert restored.step == 7
  assert_bitwise((restored.params, restored.opt_state),
                 (saved.params, saved.opt_state))


def test_plain_orbax_params_only_keeps_the_fresh_optimizer_state(tmp_path):
  saved = trained(4)
  with ocp.CheckpointManager(tmp_path) as manager:
    manager.save(4, args=ocp.args.StandardSave(saved.params))
  init = make_state()
  with og.Checkpointer(tmp_path, from_orbax={'params': 'default'}) as ckpt:
    restored, _ = ckpt.restore_or_init(init)
  assert restored.step == 4
  assert_bitwise(restored.params, saved.params)
  assert restored.opt_state is init.opt_state


def test_from_orbax_naming_a_missing_key_is_an_error(tmp_path):
  _plain_orbax_single_item(tmp_path, trained(5))
  with og.Checkpointer(tmp_path, from_orbax={'params': 'default/model'}) as c:
    with pytest.raises(ValueError, match=r"default/model, which is not saved"
                       r" \(keys there: \['opt_state', 'params'\]\)"):
      c.restore_or_init(make_state())
  with pytest.raises(ValueError, match='from_orbax must map'):
    og.Checkpointer(tmp_path, from_orbax={'weights': 'default'})


def test_plain_orbax_reads_an_og_checkpoint(tmp_path):
  saved = trained(6)
  with og.Checkpointer(tmp_path, save_interval_steps=1) as ckpt:
    ckpt.save(saved, events={'skips': [2]}, metrics={'eval_loss': 0.5})
  tree = {'params': saved.params, 'opt_state': saved.opt_state}
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
  # The layout in the module docstring, read with Orbax alone.
  with ocp.CheckpointManager(tmp_path) as manager:
    assert manager.all_steps() == [6]
    restored = manager.restore(6, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract),
        events=ocp.args.JsonRestore()))
  assert_bitwise(restored['state'], tree)
  assert restored['events'] == {'skips': [2]}


# -- 7. The best checkpoint by a user metric ----------------------------------

LOSSES = {1: 5.0, 2: 3.0, 3: 4.0, 4: 1.0, 5: 2.0, 6: 6.0, 7: float('nan')}


def _save_losses(ckpt, losses, healthy=lambda step: True):
  states = {}
  for step, loss in losses.items():
    states[step] = trained(step, seed=step)
    ckpt.save(states[step], metrics={'eval_loss': loss},
              healthy=healthy(step))
  ckpt.wait_until_finished()
  return states


def test_best_checkpoint_outlives_retention_and_restores(tmp_path):
  options = dict(save_interval_steps=1, max_to_keep=2,
                 best_metric='eval_loss', best_mode='min')
  with og.Checkpointer(tmp_path, **options) as ckpt:
    states = _save_losses(ckpt, LOSSES, healthy=lambda step: step <= 2)
    # Newest two (6, 7), last good (2), best eval_loss (4, loss 1.0).
    assert ckpt.all_steps() == [2, 4, 6, 7]
    assert ckpt.best_step() == 4
    assert ckpt.metrics(7) == {'healthy': False, 'eval_loss': None}
  with og.Checkpointer(tmp_path, **options) as ckpt:
    assert ckpt.best_step() == 4
    best, _ = ckpt.restore_best(make_state())
    ckpt.save(trained(8), metrics={'eval_loss': 0.5})
    ckpt.save(trained(9), metrics={'eval_loss': 0.9})
    ckpt.wait_until_finished()
    # 9 is the newest healthy now, 8 the best: 2, 4, 6 and 7 go.
    assert ckpt.all_steps() == [8, 9]
    assert ckpt.best_step() == 8
  assert best.step == 4
  assert_bitwise(best.params, states[4].params)


def test_best_mode_max_and_ties_go_to_the_newest(tmp_path):
  with og.Checkpointer(tmp_path, save_interval_steps=1, max_to_keep=1,
                       best_metric='accuracy', best_mode='max') as ckpt:
    for step, accuracy in [(1, 0.5), (2, 0.75), (3, 0.75), (4, 0.25)]:
      ckpt.save(make_state(step), metrics={'accuracy': accuracy})
    ckpt.save(make_state(5))  # no metric: never the best
    ckpt.wait_until_finished()
    assert ckpt.all_steps() == [3, 5]
    assert ckpt.best_step() == 3


def test_damaged_best_falls_back_to_the_next_best(tmp_path):
  with og.Checkpointer(tmp_path, save_interval_steps=1, max_to_keep=None,
                       best_metric='eval_loss') as ckpt:
    states = _save_losses(ckpt, {1: 3.0, 2: 1.0, 3: 2.0})
    os.remove(tmp_path / '2' / 'state' / 'manifest.ocdbt')
    with pytest.warns(CorruptCheckpointWarning, match='step 2'):
      best, _ = ckpt.restore_best(make_state())
    assert best.step == 3
    assert_bitwise(best.params, states[3].params)
    assert ckpt.all_steps() == [1, 3]


def test_best_metric_arguments(tmp_path):
  with pytest.raises(ValueError, match="best_mode must be 'min' or 'max'"):
    og.Checkpointer(tmp_path, best_metric='loss', best_mode='lowest')
  with pytest.raises(ValueError, match="other than 'healthy'"):
    og.Checkpointer(tmp_path, best_metric='healthy')
  with og.Checkpointer(tmp_path, save_interval_steps=1) as ckpt:
    with pytest.raises(ValueError, match='restore_best needs best_metric'):
      ckpt.restore_best(make_state())
    with pytest.raises(ValueError, match="other than 'healthy'"):
      ckpt.save(make_state(1), metrics={'healthy': 1.0})
    assert ckpt.best_step() is None


_DTYPES = st.sampled_from([np.float32, np.float16, jnp.bfloat16, np.int32])
_LEAVES = st.dictionaries(
    st.sampled_from(['a', 'b', 'c', 'd', 'e']),
    st.tuples(st.lists(st.integers(1, 4), max_size=2), _DTYPES),
    min_size=1,
)


@settings(max_examples=50, deadline=None)
@given(saved=_LEAVES, target=_LEAVES, cast_dtypes=st.booleans())
def test_tree_differences_name_exactly_the_changed_leaves(saved, target,
                                                           cast_dtypes):
  as_metadata = {(k,): jax.ShapeDtypeStruct(tuple(s), d)
                 for k, (s, d) in saved.items()}
  as_target = {(k,): np.zeros(s, d) for k, (s, d) in target.items()}
  differences, casts = state_lib.tree_differences(
      as_metadata, as_target, cast_dtypes)
  named = [line.split(':')[0] for line in differences]
  floating = lambda d: jnp.issubdtype(d, jnp.floating)
  castable = {
      k for k in set(saved) & set(target)
      if saved[k][0] == target[k][0] and saved[k][1] != target[k][1]
      and floating(saved[k][1]) and floating(target[k][1])
  }
  changed = {k for k in set(saved) | set(target)
             if saved.get(k) != target.get(k)}
  expected = changed - castable if cast_dtypes else changed
  assert named == sorted(expected)
  assert casts == ({(k,): np.dtype(saved[k][1]) for k in castable}
                   if cast_dtypes else {})
