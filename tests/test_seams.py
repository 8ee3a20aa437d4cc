"""Issue 11: reproductions at the seams between the guard and ordinary code.

Each test is one reproduction from the issue, asserting the behaviour the
issue asks for. The comment above each test names the item and the failure
seen on main before the fix (commit 5955972). Tests that fix a name the issue
left open (a metric, an argument, a helper) are grouped under "Proposed API"
headings so that one place changes if the names do.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen, nnx

import optax_guard as og
from optax_guard.host.recovery import Recovery
from optax_guard.transforms import fused as _fused
from optax_guard.transforms.guard import GuardState
from optax_guard.transforms.loss_scale import scale_ceiling
from optax_guard.transforms.states import find_states


def _copy(tree):
  return jax.tree.map(jnp.copy, tree)


def _assert_zero(updates):
  for leaf in jax.tree.leaves(updates):
    np.testing.assert_array_equal(leaf, np.zeros_like(leaf))


# ---------------------------------------------------------------------------
# Item 1: model state rolls back with the optimizer.
# ---------------------------------------------------------------------------


def _bn_model():
  rngs = nnx.Rngs(0)
  return nnx.Sequential(
      nnx.Linear(3, 8, rngs=rngs), nnx.BatchNorm(8, rngs=rngs), nnx.relu,
      nnx.Linear(8, 1, rngs=rngs),
  )


def _nnx_loss(model, batch):
  return jnp.mean((model(batch['x']) - batch['y']) ** 2)


def _regression_batch(seed, nan=False):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(8, 3)).astype(np.float32)
  if nan:
    x[2, 1] = np.nan
  y = x.sum(axis=1, keepdims=True)
  return {'x': jnp.asarray(x), 'y': jnp.asarray(np.nan_to_num(y))}


# main: the skipped step writes NaN into BatchStat (mean/var all NaN) and the
# model outputs NaN in eval mode after the next clean step.
def test_nnx_batchnorm_statistics_roll_back_on_a_skipped_step():
  model = _bn_model()
  optimizer = nnx.Optimizer(model, og.guard(optax.adam(1e-2)), wrt=nnx.Param)
  step = og.make_nnx_train_step(_nnx_loss)
  step(model, optimizer, _regression_batch(0))
  stats = _copy(nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)))
  params = _copy(nnx.to_pure_dict(nnx.state(model, nnx.Param)))

  m = step(model, optimizer, _regression_batch(1, nan=True))

  assert bool(m['skipped'])
  chex.assert_trees_all_equal(
      nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)), stats)
  chex.assert_trees_all_equal(
      nnx.to_pure_dict(nnx.state(model, nnx.Param)), params)
  assert not bool(step(model, optimizer, _regression_batch(2))['skipped'])
  model.eval()
  assert np.isfinite(np.asarray(model(_regression_batch(3)['x']))).all()


class _LinenBN(linen.Module):

  @linen.compact
  def __call__(self, x, train: bool):
    x = linen.Dense(8)(x)
    x = linen.BatchNorm(use_running_average=not train)(x)
    return linen.Dense(1)(linen.relu(x))


# -- Proposed API: make_train_step(..., has_state=True) -----------------------
# loss_fn(params, model_state, batch) -> (loss, new_model_state), and
# step(params, opt_state, model_state, batch)
#   -> (params, opt_state, model_state, metrics).
# main: TypeError, make_train_step() got an unexpected keyword 'has_state'
# (there is no way to hand it a mutable collection: a user who returns
# batch_stats as aux and stores them keeps the NaN statistics).
def test_linen_batch_stats_roll_back_on_a_skipped_step():
  module = _LinenBN()
  variables = module.init(jax.random.PRNGKey(0), jnp.ones((8, 3)), train=False)
  params, model_state = variables['params'], {
      'batch_stats': variables['batch_stats']}

  def loss_fn(params, model_state, batch):
    out, new_state = module.apply(
        {'params': params, **model_state}, batch['x'], train=True,
        mutable=['batch_stats'])
    return jnp.mean((out - batch['y']) ** 2), new_state

  tx = og.guard(optax.adam(1e-2))
  step = og.make_train_step(loss_fn, tx, has_state=True, donate=False)
  opt_state = tx.init(params)
  params, opt_state, model_state, m = step(
      params, opt_state, model_state, _regression_batch(0))
  assert not bool(m['skipped'])
  held = _copy((params, opt_state, model_state))

  params, opt_state, model_state, m = step(
      params, opt_state, model_state, _regression_batch(1, nan=True))

  assert bool(m['skipped'])
  chex.assert_trees_all_equal(model_state, held[2])
  chex.assert_trees_all_equal(params, held[0])
  chex.assert_trees_all_equal(
      opt_state.inner_state, held[1].inner_state)


# ---------------------------------------------------------------------------
# Item 2: never a non-finite parameter, whoever made the NaN.
# -- Proposed API: metrics 'inner_nonfinite' (this step's update or new inner
#    state was not finite although gradient and loss were) and
#    'total_inner_nonfinite'. Such a step is skipped and counts toward
#    diverged; 'nonfinite' keeps meaning a bad gradient or loss.
# ---------------------------------------------------------------------------

PARAMS = {'w': jnp.array([1.0, 2.0])}


def _assert_inner_fault_rejected(tx, grads, params=PARAMS):
  """Pure and fused forms both reject a step the inner optimizer broke."""
  state = tx.init(params)
  updates, new_state = jax.jit(tx.update)(grads, state, params)
  _assert_zero(updates)
  chex.assert_trees_all_equal(new_state.inner_state, state.inner_state)
  m = og.metrics(new_state)
  assert bool(m['skipped'])
  assert not bool(m['nonfinite'])
  assert bool(m['inner_nonfinite'])
  assert int(m['total_inner_nonfinite']) == 1
  assert bool(m['diverged'])  # built with max_consecutive_skips=1
  new_params, fused_state = jax.jit(_fused.update_and_apply(tx))(
      grads, state, params)
  chex.assert_trees_all_equal(new_params, params)
  chex.assert_trees_all_equal(fused_state, new_state)


# main: updates {'w': [-0.001, nan]}, skipped False.
def test_adam_eps_zero_nan_update_is_not_applied():
  tx = og.guard(optax.adam(1e-3, eps=0.0), max_consecutive_skips=1)
  _assert_inner_fault_rejected(tx, {'w': jnp.array([1.0, 0.0])})


# main: updates {'w': [inf, 0.]}, skipped False.
def test_overflowing_inner_update_is_not_applied():
  tx = og.guard(optax.scale(1e38), max_consecutive_skips=1)
  _assert_inner_fault_rejected(tx, {'w': jnp.array([10.0, 0.0])})


# main: a finite gradient of 1e20 makes Adam's nu inf (the update itself is a
# finite -0.0); the step is accepted and the state is poisoned for good.
def test_nonfinite_new_inner_state_is_not_kept():
  tx = og.guard(optax.adam(1e-3), max_consecutive_skips=1)
  _assert_inner_fault_rejected(tx, {'w': jnp.array([1e20, 0.0])})


# main: scale_hyperparam accepts nan (and 0, -1, inf) and returns a state
# whose learning rate is nan; every later update is then nan.
@pytest.mark.parametrize('factor', [float('nan'), float('inf'), 0.0, -0.5])
def test_scale_hyperparam_refuses_a_bad_factor(factor):
  tx = og.guard(optax.inject_hyperparams(optax.sgd)(learning_rate=0.1))
  state = tx.init(PARAMS)
  with pytest.raises(ValueError, match='factor'):
    og.scale_hyperparam(state, factor)


# ---------------------------------------------------------------------------
# Item 3: og.metrics sees every guard.
# -- Proposed API: the contract keys aggregate over all guards (skipped and
#    diverged: any; counters: summed); each guard's own metrics are also
#    present as 'PATH/NAME', PATH naming where the guard sits in the state.
# ---------------------------------------------------------------------------


def _per_guard(m, name):
  return {key: value for key, value in m.items()
          if key.endswith('/' + name)}


# main: skipped False, total_skips 0, diverged False: the 'd' guard, found
# first, hides the diverged 'e' guard, and Recovery never rolls back.
def test_metrics_aggregate_the_guards_of_multi_transform():
  params = {'e': jnp.ones(2), 'd': jnp.ones(2)}
  tx = optax.multi_transform(
      {'e': og.guard(optax.sgd(0.1), max_consecutive_skips=2),
       'd': og.guard(optax.sgd(0.1))},
      {'e': 'e', 'd': 'd'},
  )
  state = tx.init(params)
  grads = {'e': jnp.array([jnp.nan, 1.0]), 'd': jnp.ones(2)}
  for _ in range(2):
    _, state = tx.update(grads, state, params)
  m = og.metrics(state)
  assert bool(m['skipped']) and bool(m['diverged'])
  assert int(m['total_skips']) == 2
  skipped = _per_guard(m, 'skipped')
  assert len(skipped) == 2
  assert sorted(bool(v) for v in skipped.values()) == [False, True]
  [path] = [k for k, v in skipped.items() if bool(v)]
  assert path == ".inner_states['e'].inner_state/skipped"
  reason = Recovery().observe(0, {'loss': jnp.array(1.0), **m})
  assert reason is not None and 'diverged' in reason


# main: the first guard (accepting) is the one reported; the second guard
# skipped and diverged unseen.
def test_metrics_see_a_second_guard_in_a_chain():
  params = {'w': jnp.ones(2)}
  tx = optax.chain(
      og.guard(optax.identity()),
      optax.add_decayed_weights(1e38),  # 1e38 * 10 overflows after guard 1
      og.guard(optax.sgd(0.1), max_consecutive_skips=1),
  )
  state = tx.init(params)
  updates, state = tx.update({'w': jnp.ones(2)}, state,
                             {'w': jnp.full(2, 10.0)})
  _assert_zero(updates)
  m = og.metrics(state)
  assert bool(m['skipped']) and bool(m['diverged'])
  assert int(m['total_skips']) == 1
  assert len(_per_guard(m, 'diverged')) == 2


# ---------------------------------------------------------------------------
# Item 4: gradient accumulation. The working composition is og.accumulate
# (tests/test_accumulate.py); the stalling one is refused.
# -- Proposed API: make_train_step and og.metrics raise ValueError naming
#    og.accumulate when a guard sits inside optax.MultiSteps.
# ---------------------------------------------------------------------------


def _multisteps_guard():
  return optax.MultiSteps(og.guard(optax.sgd(0.1)), every_k_schedule=4)


def test_multisteps_stalls_after_one_nan_micro_batch():
  """Why it is refused: the NaN never leaves optax's accumulator.

  MultiSteps resets its accumulator by multiplying it with zero, and
  0 * nan is nan, so every later macro step is skipped. This documents
  optax's behaviour and passes on main too.
  """
  tx = optax.MultiSteps(og.guard(optax.sgd(0.1), max_consecutive_skips=2),
                        every_k_schedule=2)
  state = tx.init(PARAMS)
  update = jax.jit(tx.update)
  _, state = update({'w': jnp.array([jnp.nan, 1.0])}, state, PARAMS)
  for _ in range(5):  # clean micro-batches only from here on
    _, state = update({'w': jnp.ones(2)}, state, PARAMS)
  # og.metrics refuses this composition; read the guard's state directly.
  [(_, guard_state)] = find_states(state, GuardState)
  assert bool(guard_state.diverged)


# main: make_train_step builds and runs the stalling composition silently.
def test_train_step_refuses_a_guard_inside_multisteps():
  tx = _multisteps_guard()
  step = og.make_train_step(lambda p, b: jnp.sum(p['w'] * b), tx)
  with pytest.raises(ValueError, match='og.accumulate'):
    step(PARAMS, tx.init(PARAMS), jnp.ones(2))


# main: og.metrics reads the guard's (discarded mini-step) state silently.
def test_metrics_refuses_a_guard_inside_multisteps():
  with pytest.raises(ValueError, match='og.accumulate'):
    og.metrics(_multisteps_guard().init(PARAMS))


# ---------------------------------------------------------------------------
# Item 5: ordinary inputs.
# ---------------------------------------------------------------------------


# main: TypeError 'cond branches must have equal output types' (optax.adam
# returns a float32 update for an integer leaf; the skip branch an int one).
@pytest.mark.parametrize('leaf', [
    jnp.array([1, 2], jnp.int32), jnp.array([True, False])],
    ids=['int32', 'bool'])
def test_non_float_leaves_pass_through_as_optax_does(leaf):
  params = {'w': jnp.ones(2), 'n': leaf}
  grads = {'w': jnp.array([0.5, -1.0]), 'n': jnp.zeros_like(leaf)}
  tx, bare = og.guard(optax.adam(0.1)), optax.adam(0.1)
  state = tx.init(params)
  updates, state = tx.update(grads, state, params)
  want, bare_state = bare.update(grads, bare.init(params), params)
  # The guard's update is compiled (inside lax.cond), the bare one runs op
  # by op: equal dtypes and structure, values within rounding.
  chex.assert_trees_all_equal_dtypes(updates, want)
  chex.assert_trees_all_close(updates, want, rtol=1e-6)
  chex.assert_trees_all_equal_dtypes(state.inner_state, bare_state)
  chex.assert_trees_all_close(state.inner_state, bare_state, rtol=1e-6)
  bad = {**grads, 'w': jnp.array([jnp.nan, 1.0])}
  updates, new_state = tx.update(bad, state, params)
  assert bool(og.metrics(new_state)['skipped'])
  chex.assert_trees_all_equal(optax.apply_updates(params, updates), params)
  chex.assert_trees_all_equal(new_state.inner_state, state.inner_state)


# main: updates {'b': nan, ...}, skipped False: Python scalars are not
# checked.
def test_python_float_gradient_leaf_is_checked():
  params = {'w': jnp.ones(2), 'b': 1.0}
  tx = og.guard(optax.sgd(0.1))
  updates, state = tx.update({'w': jnp.ones(2), 'b': float('nan')},
                             tx.init(params), params)
  assert bool(og.metrics(state)['skipped'])
  _assert_zero(updates)


# main: TypeError 'cond branch outputs must have the same pytree structure'
# (LookaheadParams in one branch, a dict in the other).
def test_lookahead_inside_the_guard():
  fast = optax.lookahead(optax.sgd(0.1), sync_period=2, slow_step_size=0.5)
  tx = og.guard(fast)
  params = optax.LookaheadParams.init_synced({'w': jnp.ones(2)})
  state, bare_state = tx.init(params), fast.init(params)
  bare_params = params
  for grads in ({'w': jnp.ones(2)}, {'w': jnp.array([2.0, -1.0])}):
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    want, bare_state = fast.update(grads, bare_state, bare_params)
    bare_params = optax.apply_updates(bare_params, want)
    chex.assert_trees_all_equal(params, bare_params)
  held = state
  updates, state = tx.update({'w': jnp.array([jnp.nan, 1.0])}, state, params)
  assert bool(og.metrics(state)['skipped'])
  chex.assert_trees_all_equal(optax.apply_updates(params, updates), params)
  chex.assert_trees_all_equal(state.inner_state, held.inner_state)


# The state finder, find_states(opt_state, StateType) -> [(path, state)],
# reads through the guard for helpers like schedule_free_eval_params.
# main: AttributeError 'GuardState' object has no attribute 'b1' (and there
# is no finder).
def test_schedule_free_eval_params_through_the_guard():
  sf = optax.contrib.schedule_free_sgd(0.1)
  tx = og.guard(sf)
  state, bare_state = tx.init(PARAMS), sf.init(PARAMS)
  params, bare_params = PARAMS, PARAMS
  for _ in range(3):
    updates, state = tx.update({'w': jnp.ones(2)}, state, params)
    params = optax.apply_updates(params, updates)
    want, bare_state = sf.update({'w': jnp.ones(2)}, bare_state, bare_params)
    bare_params = optax.apply_updates(bare_params, want)
  [(_, found)] = find_states(state, optax.contrib.ScheduleFreeState)
  chex.assert_trees_all_equal(
      optax.contrib.schedule_free_eval_params(found, params),
      optax.contrib.schedule_free_eval_params(bare_state, bare_params))


# main: TypeError 'Pred must be a scalar, got [ True] of shape (1,)'.
# main (tuple): TypeError "float() argument must be ... not 'dict'".
@pytest.mark.parametrize('value', [
    jnp.ones(1), (jnp.array(1.0), {'acc': jnp.array(0.5)})],
    ids=['shape_1', 'loss_aux_tuple'])
def test_value_must_be_a_scalar(value):
  # Issue 23 made this a TypeError, like every other loss of the wrong kind.
  tx = og.guard(optax.sgd(0.1))
  with pytest.raises(TypeError, match='scalar'):
    tx.update({'w': jnp.ones(2)}, tx.init(PARAMS), PARAMS, value=value)


# main: TypeError "spike_config() got an unexpected keyword argument 'typo'".
def test_unknown_spike_option_names_the_allowed_ones():
  with pytest.raises(ValueError, match=r"typo.*window.*sigma.*min_history"):
    og.guard(optax.sgd(0.1), spikes={'typo': 3})


# ---------------------------------------------------------------------------
# Item 6: fp16 loss scale at its ceiling.
# ---------------------------------------------------------------------------

# 1 / scale must stay a normal float32: 2**-126 is the smallest.
LARGEST_SAFE_SCALE = 2.0**126


# main: the scale grows to 2**127, 1/scale = 2**-127 is subnormal and flushed
# to zero on CPU: every update is 0 and grad_norm 0 while skipped is False;
# good_steps then counts up forever (1, 2, ...) since growth is blocked.
# The ceiling itself is the implementation's choice (at most 2**126); the test
# drives the scale up until it stops growing.
def test_loss_scale_at_its_ceiling_keeps_updating():
  tx = og.dynamic_loss_scale(optax.sgd(1.0), initial_scale=2.0**40,
                             growth_interval=1)
  step = og.make_train_step(lambda p, b: jnp.sum(p['w'] * b), tx,
                            donate=False)
  params, state = {'w': jnp.zeros(2)}, tx.init({'w': jnp.zeros(2)})
  batch = jnp.array([0.25, -0.5])  # the gradient, exact in any power of 2
  scales = []
  for index in range(100):
    new_params, state, m = step(params, state, batch)
    assert not bool(m['skipped'])
    assert float(m['loss_scale']) <= LARGEST_SAFE_SCALE, index
    assert float(m['grad_norm']) == float(np.float32(np.hypot(0.25, 0.5))), index
    np.testing.assert_array_equal(new_params['w'], params['w'] - batch)
    # Reset at every growth interval, grown or not (GradScaler, jmp).
    assert int(state.good_steps) == 0, (index, int(state.good_steps))
    params = new_params
    scales.append(float(m['loss_scale']))
  assert scales[-1] == scales[-10] > scales[0]  # it reached its ceiling


def test_loss_scale_refuses_an_initial_scale_above_its_ceiling():
  # main: accepted; the first step's updates are then zero.
  with pytest.raises(ValueError, match='initial_scale'):
    og.dynamic_loss_scale(optax.sgd(1.0), initial_scale=2.0**127)


def test_float16_loss_scale_stops_where_float16_holds_the_scale():
  # main: the ceiling was 2**126 whatever the gradient dtype; a float16
  # gradient times any scale above 65504 is inf, so every step past 2**16
  # overflowed, was skipped and halved the scale again.
  assert scale_ceiling({'w': jnp.ones(2, jnp.float16)}) == 2.0**15
  tx = og.dynamic_loss_scale(optax.sgd(1.0), initial_scale=2.0**10,
                             growth_interval=1)
  params = {'w': jnp.zeros(2, jnp.float16)}
  state = tx.init(params)
  grads = jnp.array([0.25, -0.5], jnp.float16)
  update = jax.jit(tx.update)
  for index in range(10):
    scale = og.loss_scale(state)
    updates, state = update({'w': grads * scale.astype(jnp.float16)}, state,
                            params)
    assert not bool(og.metrics(state)['skipped']), index
    np.testing.assert_array_equal(updates['w'], -grads)
  assert float(og.loss_scale(state)) == 2.0**15
  with pytest.raises(ValueError, match=r'initial_scale=65536.0 is above 32768'):
    og.dynamic_loss_scale(optax.sgd(1.0), initial_scale=2.0**16).init(params)


def test_masked_guard_sees_only_its_leaves_and_the_guard_outside_sees_all():
  # As documented (guard docstring, composing guide): optax.masked passes
  # masked-out updates on unchanged, so a guard inside it cannot check them;
  # the guard outside the mask skips the step.
  params = {'trained': jnp.ones(2), 'other': jnp.ones(2)}
  mask = {'trained': True, 'other': False}
  grads = {'trained': jnp.ones(2), 'other': jnp.array([jnp.nan, 1.0])}
  inside = optax.masked(og.guard(optax.sgd(0.1)), mask)
  updates, state = inside.update(grads, inside.init(params), params)
  np.testing.assert_array_equal(updates['other'], grads['other'])
  assert not bool(og.metrics(state)['skipped'])
  outside = og.guard(optax.masked(optax.sgd(0.1), mask))
  state = outside.init(params)
  updates, new_state = outside.update(grads, state, params)
  assert bool(og.metrics(new_state)['skipped'])
  chex.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like, params))
  chex.assert_trees_all_equal(new_state.inner_state, state.inner_state)
