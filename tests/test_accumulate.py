"""Gradient accumulation with a guard: accumulate drops bad micro-batches."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_guard as og
from optax_guard.transforms import fused as _fused
from optax_guard.transforms.accumulate import AccumulateState, accumulate
from optax_guard.transforms.guard import GuardState

PARAMS = {'w': jnp.array([1.0, -2.0, 3.0]), 'b': jnp.zeros(2)}


def _grads(value, bias=0.5):
  return {'w': jnp.full(3, value, jnp.float32),
          'b': jnp.full(2, bias, jnp.float32)}


NAN = _grads(jnp.nan)


def _run(tx, micro_batches, values=None, params=PARAMS):
  """Updates applied after each micro-batch; returns params and states."""
  state = tx.init(params)
  update = jax.jit(tx.update)
  states = []
  for index, grads in enumerate(micro_batches):
    value = None if values is None else jnp.asarray(values[index])
    updates, state = update(grads, state, params, value=value)
    params = optax.apply_updates(params, updates)
    states.append(state)
  return params, states


def test_a_nan_micro_batch_is_dropped_and_the_mean_of_the_others_applied():
  tx = accumulate(og.guard(optax.sgd(1.0)), every_k=3)
  params, states = _run(tx, [_grads(1.0), NAN, _grads(4.0)])
  # (1 + 4) / 2 = 2.5 on w, (0.5 + 0.5) / 2 on b: exact in float32.
  np.testing.assert_array_equal(params['w'], PARAMS['w'] - 2.5)
  np.testing.assert_array_equal(params['b'], PARAMS['b'] - 0.5)
  assert [bool(s.dropped) for s in states] == [False, True, False]
  assert [int(s.total_dropped) for s in states] == [0, 1, 1]
  assert [int(s.micro_step) for s in states] == [1, 2, 0]
  assert [int(s.accepted) for s in states] == [1, 1, 0]
  m = og.metrics(states[-1])
  assert not bool(m['skipped']) and int(m['total_skips']) == 0


def test_training_goes_on_after_the_dropped_micro_batch():
  tx = accumulate(og.guard(optax.sgd(1.0), max_consecutive_skips=1), 2)
  micro = [NAN, _grads(2.0), _grads(1.0), _grads(3.0), _grads(5.0),
           _grads(7.0)]
  params, states = _run(tx, micro)
  # Macro steps: mean(2) = 2, mean(1, 3) = 2, mean(5, 7) = 6.
  np.testing.assert_array_equal(params['w'], PARAMS['w'] - 10.0)
  assert not any(bool(og.metrics(s)['diverged']) for s in states)
  assert int(states[-1].inner_state.total_skips) == 0


def test_a_nan_loss_drops_the_micro_batch_and_losses_are_averaged():
  tx = accumulate(og.guard(optax.sgd(1.0)), every_k=3)
  params, states = _run(tx, [_grads(1.0), _grads(100.0), _grads(3.0)],
                        values=[1.0, jnp.nan, 2.0])
  np.testing.assert_array_equal(params['w'], PARAMS['w'] - 2.0)
  assert float(og.metrics(states[-1])['loss']) == 1.5


def test_inner_state_moves_only_at_the_macro_step_and_matches_the_bare_one():
  tx = accumulate(og.guard(optax.adam(1e-2)), every_k=2)
  micro = [_grads(1.0), _grads(3.0), _grads(-1.0), NAN, _grads(0.25)]
  _, states = _run(tx, micro)
  chex.assert_trees_all_equal(states[0].inner_state.inner_state,
                              tx.init(PARAMS).inner_state.inner_state)
  chex.assert_trees_all_equal(states[2].inner_state, states[1].inner_state)
  bare = optax.adam(1e-2)
  bare_state = bare.init(PARAMS)
  for mean in ((_grads(1.0), _grads(3.0)), (_grads(-1.0),)):
    grads = jax.tree.map(lambda *g: sum(g) / len(g), *mean)
    _, bare_state = bare.update(grads, bare_state, PARAMS)
  chex.assert_trees_all_equal(states[3].inner_state.inner_state, bare_state)
  chex.assert_trees_all_equal(states[4].inner_state, states[3].inner_state)


def test_a_macro_step_with_only_bad_micro_batches_is_skipped_by_the_guard():
  tx = accumulate(og.guard(optax.adam(1e-2), max_consecutive_skips=1), 2)
  params, states = _run(tx, [_grads(1.0), _grads(1.0), NAN, NAN])
  held = states[1]
  chex.assert_trees_all_equal(states[3].inner_state.inner_state,
                              held.inner_state.inner_state)
  m = og.metrics(states[3])
  assert bool(m['skipped']) and bool(m['diverged'])
  assert int(m['total_skips']) == 1
  # The accumulator restarts clean: the next macro step is accepted.
  state, update = states[3], jax.jit(tx.update)
  for grads in (_grads(2.0), _grads(2.0)):
    _, state = update(grads, state, params)
  m = og.metrics(state)
  assert not bool(m['skipped']) and not bool(m['diverged'])


def test_same_updates_as_multisteps_on_clean_micro_batches():
  micro = [_grads(float(v), bias=0.1 * v) for v in (1, 2, 3, 4, 5, 6)]
  ours, _ = _run(accumulate(optax.adam(1e-2), every_k=3), micro)
  theirs, _ = _run(optax.MultiSteps(optax.adam(1e-2), every_k_schedule=3),
                   micro)
  # Sum-then-divide versus optax's running (Welford) mean: one rounding.
  chex.assert_trees_all_close(ours, theirs, rtol=1e-6)


def test_a_plain_optimizer_is_wrapped_in_a_guard():
  state = accumulate(optax.sgd(0.1), every_k=2).init(PARAMS)
  assert isinstance(state, AccumulateState)
  assert isinstance(state.inner_state, GuardState)


def test_fused_form_equals_update_then_apply():
  tx = accumulate(
      og.guard(optax.adamw(1e-2), clip=og.clip_by_global_norm(1.0)), 2)
  update = jax.jit(tx.update)
  fused = jax.jit(_fused.update_and_apply(tx))
  params, state = PARAMS, tx.init(PARAMS)
  for grads in [_grads(1.0), NAN, _grads(3.0), _grads(0.5), NAN, NAN]:
    got_params, got_state = fused(grads, state, params)
    updates, state = update(grads, state, params, value=None)
    params = optax.apply_updates(params, updates)
    chex.assert_trees_all_equal(got_state, state)
    chex.assert_trees_all_close(got_params, params, rtol=1e-6, atol=1e-7)


def test_in_the_train_step():
  tx = accumulate(og.guard(optax.sgd(1.0)), every_k=2)
  step = og.make_train_step(lambda p, b: jnp.sum(p['w'] * b), tx,
                            donate=False)
  params, state = {'w': jnp.zeros(2)}, tx.init({'w': jnp.zeros(2)})
  for batch in ([1.0, 2.0], [jnp.nan, 0.0], [3.0, 4.0], [5.0, 6.0]):
    params, state, _ = step(params, state, jnp.array(batch))
  np.testing.assert_array_equal(params['w'], [-5.0, -7.0])
  assert int(state.total_dropped) == 1


@pytest.mark.parametrize(('every_k', 'error'), [
    (0, ValueError), (1.5, TypeError), (True, TypeError), (None, TypeError)])
def test_every_k_must_be_a_positive_int(every_k, error):
  # A wrong type is a TypeError since issue 23 (tests/test_arguments.py).
  with pytest.raises(error, match='every_k must be an int >= 1'):
    accumulate(optax.sgd(0.1), every_k=every_k)


# -- Proposed API: og.metrics reports the accumulator too ('dropped' for
#    this micro-batch, 'total_dropped'), so that every skip is visible.
# main: the keys are absent (og.metrics reads only the guard inside).
def test_metrics_report_dropped_micro_batches():
  tx = accumulate(og.guard(optax.sgd(1.0)), every_k=3)
  _, states = _run(tx, [_grads(1.0), NAN])
  m = og.metrics(states[-1])
  assert bool(m['dropped']) and int(m['total_dropped']) == 1
