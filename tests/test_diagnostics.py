"""Per-leaf hold (granularity="leaf"), vanishing counters and og.diagnose."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import optax_guard as og
from optax_guard.transforms.numerics import float_leaf_paths

PARAMS = {'dense': {'w': jnp.linspace(-1.0, 1.0, 6).reshape(2, 3),
                    'b': jnp.full(3, 0.5)},
          'head': {'w': jnp.ones((3, 1))}}


def _grads(step, scale=1.0):
  key = jax.random.PRNGKey(step)
  return jax.tree.map(
      lambda p: scale * jax.random.normal(jax.random.fold_in(key, p.size),
                                          p.shape),
      PARAMS)


def _poison_bias(grads):
  return {**grads, 'dense': {**grads['dense'],
                             'b': grads['dense']['b'].at[1].set(jnp.nan)}}


def _zero_bias(grads):
  return {**grads, 'dense': {**grads['dense'],
                             'b': jnp.zeros_like(grads['dense']['b'])}}


def _warm(tx, update, steps=3):
  state = tx.init(PARAMS)
  for step in range(steps):
    _, state = update(_grads(step), state, PARAMS, value=jnp.array(1.0))
  return state


@pytest.mark.parametrize('make,match', [
    (lambda: og.guard(optax.sgd(1.0), granularity='layer'), 'granularity'),
    (lambda: og.guard(optax.sgd(1.0), vanishing_ratio=0.0), 'vanishing_ratio'),
    (lambda: og.guard(optax.sgd(1.0), vanishing_ratio=-1e-3),
     'vanishing_ratio'),
])
def test_bad_options_raise_at_construction(make, match):
  with pytest.raises(ValueError, match=match):
    make()


def test_leaf_granularity_holds_only_the_faulty_leaf():
  clip = og.clip_by_global_norm(1.0)
  tx = og.guard(optax.adam(0.1), clip=clip, granularity='leaf')
  reference = optax.chain(clip, optax.adam(0.1))
  update = jax.jit(tx.update)
  state = _warm(tx, update)
  ref_state = (clip.init(PARAMS), state.inner_state)
  grads = _poison_bias(_grads(7))

  updates, new_state = update(grads, state, PARAMS, value=jnp.array(1.0))
  # What the healthy leaves should get: the chain on the gradients with the
  # faulty leaf zeroed (so the clip's norm covers the healthy leaves only).
  want, want_state = jax.jit(reference.update)(_zero_bias(grads), ref_state,
                                               PARAMS)
  adam, old_adam = new_state.inner_state[0], state.inner_state[0]

  np.testing.assert_array_equal(updates['dense']['b'], 0.0)
  chex.assert_trees_all_equal(adam.mu['dense']['b'], old_adam.mu['dense']['b'])
  chex.assert_trees_all_equal(adam.nu['dense']['b'], old_adam.nu['dense']['b'])
  for path in (('dense', 'w'), ('head', 'w')):
    get = lambda tree: tree[path[0]][path[1]]
    chex.assert_trees_all_close(get(updates), get(want), rtol=1e-5)
    chex.assert_trees_all_close(get(adam.mu), get(want_state[1][0].mu),
                                rtol=1e-6)
  assert int(adam.count) == int(old_adam.count) + 1
  healthy_norm = float(optax.tree.norm(_zero_bias(grads)))
  assert not new_state.skipped and new_state.nonfinite
  np.testing.assert_allclose(new_state.grad_norm, healthy_norm, rtol=1e-6)
  assert new_state.clip_threshold == 1.0
  assert int(new_state.total_nonfinite) == 1
  assert int(new_state.total_skips) == 0


def test_leaf_granularity_equals_global_when_all_is_finite():
  by_leaf = og.guard(optax.adam(0.1), clip=og.zclip(warmup_steps=2),
                     granularity='leaf')
  whole = og.guard(optax.adam(0.1), clip=og.zclip(warmup_steps=2))
  leaf_update, update = jax.jit(by_leaf.update), jax.jit(whole.update)
  leaf_state, state = by_leaf.init(PARAMS), whole.init(PARAMS)
  for step in range(4):
    leaf_updates, leaf_state = leaf_update(_grads(step), leaf_state, PARAMS)
    updates, state = update(_grads(step), state, PARAMS)
    # The same decisions and norms; the selects in the compiled branch may
    # change how XLA fuses (and rounds) adam's arithmetic by an ulp.
    chex.assert_trees_all_close(leaf_updates, updates, rtol=1e-6)
  chex.assert_trees_all_close(leaf_state, state, rtol=1e-6)
  chex.assert_trees_all_equal(leaf_state._replace(inner_state=None),
                              state._replace(inner_state=None))


@pytest.mark.parametrize('fault', ['every_leaf', 'loss'])
def test_leaf_granularity_skips_the_whole_step(fault):
  tx = og.guard(optax.adam(0.1), granularity='leaf')
  update = jax.jit(tx.update)
  state = _warm(tx, update)
  grads, loss = _grads(9), jnp.array(1.0)
  if fault == 'every_leaf':
    grads = jax.tree.map(lambda g: g.at[0].set(jnp.inf), grads)
  else:
    loss = jnp.array(jnp.nan)
  updates, new_state = update(grads, state, PARAMS, value=loss)
  assert new_state.skipped and new_state.nonfinite
  chex.assert_trees_all_equal(new_state.inner_state, state.inner_state)
  chex.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like, PARAMS))


def _sqrt_model_loss(params, batch):
  # d/dw sqrt(|w|) is infinite at w = 0 while the loss stays finite: a
  # gradient fault confined to one leaf.
  hidden = jnp.tanh(batch['x'] @ params['dense']['w'] + params['dense']['b'])
  return (jnp.mean((hidden @ params['head']['w'] - batch['y']) ** 2)
          + 1e-3 * jnp.sum(jnp.sqrt(jnp.abs(params['dense']['b']))))


def test_leaf_granularity_in_the_train_step_equals_the_pure_path():
  tx = og.guard(optax.adam(0.05), clip=og.zclip(warmup_steps=2),
                granularity='leaf', vanishing_ratio=1e-3)

  @jax.jit
  def reference(params, opt_state, batch):
    loss, grads = jax.value_and_grad(_sqrt_model_loss)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params, value=loss)
    return optax.apply_updates(params, updates), opt_state, og.metrics(opt_state)

  step = og.make_train_step(_sqrt_model_loss, tx)
  rng = np.random.default_rng(0)
  params = {**PARAMS, 'dense': {**PARAMS['dense'],
                                'b': jnp.array([0.5, 0.0, -0.5])}}
  opt_state = tx.init(params)
  for _ in range(3):
    batch = {'x': jnp.asarray(rng.normal(size=(8, 2)), jnp.float32),
             'y': jnp.asarray(rng.normal(size=(8, 1)), jnp.float32)}
    want = reference(params, opt_state, batch)
    got = step(jax.tree.map(jnp.copy, params),
               jax.tree.map(jnp.copy, opt_state), batch)
    chex.assert_trees_all_equal({k: got[2][k] for k in want[2]}, want[2])
    chex.assert_trees_all_equal(got[1], want[1])
    chex.assert_trees_all_close(got[0], want[0], rtol=1e-6)
    assert bool(got[2]['nonfinite']) and not bool(got[2]['skipped'])
    chex.assert_trees_all_equal(got[0]['dense']['b'], params['dense']['b'])
    assert not np.array_equal(got[0]['dense']['w'], params['dense']['w'])
    params, opt_state = want[0], want[1]
  assert og.diagnose(opt_state, params).nonfinite == ("['dense']['b']",)


def test_vanishing_counters_count_accepted_steps_in_a_row():
  tx = og.guard(optax.sgd(0.1), vanishing_ratio=1e-6)
  update = jax.jit(tx.update)
  state = tx.init(PARAMS)
  tiny_head = lambda step: {**_grads(step), 'head': {'w': jnp.full((3, 1),
                                                                   1e-9)}}
  for step in range(3):
    _, state = update(tiny_head(step), state, PARAMS, value=jnp.array(1.0))
  _, state = update(tiny_head(3), state, PARAMS, value=jnp.array(jnp.nan))
  assert state.skipped  # a skipped step neither counts nor resets
  assert _vanishing_by_name(state) == {"['dense']['b']": 0,
                                      "['dense']['w']": 0, "['head']['w']": 3}
  report = og.diagnose(state, PARAMS, vanishing_steps=3)
  assert report.vanished == ("['head']['w']",) and report.vanishing_tracked
  assert og.diagnose(state, PARAMS, vanishing_steps=4).vanished == ()
  _, state = update(_grads(4), state, PARAMS, value=jnp.array(1.0))
  assert _vanishing_by_name(state)["['head']['w']"] == 0


def _vanishing_by_name(state):
  """The guard's vanishing counters (one vector) by leaf name."""
  names = [jax.tree_util.keystr(path)
           for path, _ in float_leaf_paths(PARAMS)]
  return dict(zip(names, state.vanishing.tolist()))


def test_counters_saturate_instead_of_overflowing():
  tx = og.guard(optax.sgd(0.1), vanishing_ratio=1e-6)
  state = tx.init(PARAMS)
  top = jnp.iinfo(jnp.int32).max
  state = state._replace(
      counters=jax.tree.map(lambda c: jnp.full_like(c, top), state.counters),
      vanishing=jnp.full_like(state.vanishing, top))
  tiny = jax.tree.map(lambda p: jnp.full_like(p, 1e-12), PARAMS)
  _, state = tx.update(tiny, state, PARAMS, value=jnp.array(jnp.nan))
  assert int(state.total_skips) == top and int(state.consecutive_skips) == top
  _, state = tx.update(tiny, state, PARAMS, value=jnp.array(1.0))
  assert state.vanishing.tolist() == [top] * 3
  assert int(state.total_skips) == top and int(state.consecutive_skips) == 0


def test_diagnosis_ranks_the_worst_leaves():
  tx = og.guard(optax.sgd(0.1))
  grads = {'dense': {'w': jnp.full((2, 3), 2.0),
                     'b': jnp.array([jnp.inf, 0.0, 0.0])},
           'head': {'w': jnp.full((3, 1), 1.0)}}
  _, state = tx.update(grads, tx.init(PARAMS), PARAMS)
  worst = og.diagnose(state, PARAMS).worst
  assert [name for name, _ in worst] == [
      "['dense']['b']", "['dense']['w']", "['head']['w']"]
  assert worst[1][1] == pytest.approx(np.sqrt(24.0))


def test_vanishing_needs_params():
  tx = og.guard(optax.sgd(0.1), vanishing_ratio=1e-6)
  with pytest.raises(ValueError, match='needs params'):
    tx.update(_grads(0), tx.init(PARAMS))


def test_diagnose_names_exploded_and_nonfinite_leaves():
  tx = og.guard(optax.sgd(0.1), granularity='leaf')
  grads = _poison_bias(_grads(0, scale=0.1))
  grads['head']['w'] = jnp.full((3, 1), 50.0)  # norm 86.6 vs param norm 1.73
  _, state = tx.update(grads, tx.init(PARAMS), PARAMS)
  report = og.diagnose(state, PARAMS)
  assert report.nonfinite == ("['dense']['b']",)
  assert report.exploded == ("['head']['w']",)
  assert report.vanished == () and not report.vanishing_tracked
  assert report.ratios["['head']['w']"] == pytest.approx(50.0)
  assert not report.healthy
  assert "non-finite: ['dense']['b']" in str(report)
  assert og.diagnose(state, PARAMS, explode_ratio=100.0).exploded == ()


def test_diagnose_reads_an_nnx_optimizer_and_model():
  model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, og.guard(optax.sgd(0.1)), wrt=nnx.Param)
  grads = nnx.grad(lambda m: 1e4 * jnp.sum(m(jnp.ones((1, 3)))))(model)
  optimizer.update(model, grads)
  report = og.diagnose(optimizer, model)
  assert set(report.exploded) == {"['bias']", "['kernel']"}
  assert og.diagnose(nnx.Optimizer(model, og.guard(optax.sgd(0.1)),
                                   wrt=nnx.Param), model).healthy


@pytest.mark.parametrize('kwargs,match', [
    (dict(explode_ratio=0.0), 'explode_ratio'),
    (dict(vanishing_steps=0), 'vanishing_steps'),
])
def test_diagnose_rejects_bad_arguments(kwargs, match):
  state = og.guard(optax.sgd(0.1)).init(PARAMS)
  with pytest.raises(ValueError, match=match):
    og.diagnose(state, PARAMS, **kwargs)
  with pytest.raises(ValueError, match='no GuardState'):
    og.diagnose(optax.sgd(0.1).init(PARAMS), PARAMS)


def test_a_nonfinite_update_is_named_in_the_parameters():
  # adam with eps=0 divides 0 by 0 where a gradient entry is zero: the
  # gradient is finite, the update is not. With check_updates=False the NaN
  # lands and diagnose names the parameter; the default skips it.
  grads = _zero_bias(_grads(0))
  unchecked = og.guard(optax.adam(1e-3, eps=0.0), check_updates=False)
  updates, state = unchecked.update(grads, unchecked.init(PARAMS), PARAMS)
  params = optax.apply_updates(PARAMS, updates)
  report = og.diagnose(state, params)
  assert report.nonfinite == ()
  assert report.nonfinite_params == ("['dense']['b']",)
  assert not report.healthy
  assert ("non-finite parameters: ['dense']['b'] (an update, not a gradient,"
          in str(report))
  checked = og.guard(optax.adam(1e-3, eps=0.0))
  updates, state = checked.update(grads, checked.init(PARAMS), PARAMS)
  assert bool(state.skipped) and bool(state.inner_nonfinite)
  report = og.diagnose(state, optax.apply_updates(PARAMS, updates))
  assert report.nonfinite_params == ()
