"""The fused update-and-apply: which compositions take it, and what it gives."""

import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_guard as og
from optax_guard.transforms.guard import GuardState
from optax_guard.transforms.loss_scale import LossScaleState

PARAMS = {f'w{i}': jnp.zeros((256, 256)) for i in range(4)}
PARAM_BYTES = sum(x.nbytes for x in jax.tree.leaves(PARAMS))


def _guard():
  return og.guard(optax.adamw(1e-2), clip=og.zclip(warmup_steps=2),
                  spikes=dict(window=8, sigma=3.0, min_history=4))


def _loss(params, batch):
  return sum(jnp.vdot(p, batch[k]) + jnp.sum(p ** 2) for k, p in params.items())


def _batch(step):
  key = jax.random.PRNGKey(step)
  batch = {k: jax.random.normal(jax.random.fold_in(key, i), p.shape)
           for i, (k, p) in enumerate(PARAMS.items())}
  if step == 3:
    batch['w1'] = batch['w1'].at[0, 0].set(jnp.nan)
  return batch


FUSED = {
    'guard': _guard,
    'chain(..., guard)': lambda: optax.chain(
        optax.add_decayed_weights(1e-4), _guard()),
    'dynamic_loss_scale(guard)': lambda: og.dynamic_loss_scale(_guard()),
    'dynamic_loss_scale(chain(guard))': lambda: og.dynamic_loss_scale(
        optax.chain(_guard())),
    'chain(dynamic_loss_scale(guard))': lambda: optax.chain(
        og.dynamic_loss_scale(_guard())),
}

UNFUSED = {
    'chain(guard, scale)': (
        lambda: optax.chain(_guard(), optax.scale(1.0)), 'tuple[0]'),
    'chain(guard, guard)': (
        lambda: optax.chain(og.skip_nonfinite(optax.scale(1.0)), _guard()),
        'two guards'),
    'multi_transform(guard)': (
        lambda: optax.multi_transform(
            {'a': _guard(), 'b': optax.sgd(0.1)},
            {f'w{i}': 'a' if i < 2 else 'b' for i in range(4)}),
        "inner_states['a'].inner_state"),
    'inject_hyperparams(guard)': (
        lambda: optax.inject_hyperparams(
            lambda learning_rate: og.guard(optax.sgd(learning_rate)))(
                learning_rate=0.1),
        'HyperparamsState.inner_state'),
}


def _trace(tx):
  """Builds and compiles the train step; returns its temporaries in bytes and
  the warnings raised while tracing it."""
  step = og.make_train_step(_loss, tx)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    compiled = step.lower(PARAMS, tx.init(PARAMS), _batch(0)).compile()
  return compiled.memory_analysis().temp_size_in_bytes, caught


@pytest.mark.parametrize('name', FUSED)
def test_fused_compositions_write_no_update_tree_and_do_not_warn(name):
  temp_bytes, caught = _trace(FUSED[name]())
  assert not caught, [str(w.message) for w in caught]
  # The gradients are one params-sized temporary (read by the check and by
  # the update); the cond around update and apply adds nothing to them.
  assert temp_bytes < 1.25 * PARAM_BYTES


@pytest.mark.parametrize('name', UNFUSED)
def test_unfused_compositions_warn_once_naming_where_and_the_cost(name):
  make, where = UNFUSED[name]
  temp_bytes, caught = _trace(make())
  if name == 'chain(guard, scale)':  # the updates tree, beside the gradients
    assert temp_bytes > 1.9 * PARAM_BYTES
  assert len(caught) == 1, [str(w.message) for w in caught]
  message = str(caught[0].message)
  assert where in message and 'materialises one more updates tree' in message


def test_unguarded_optimizer_does_not_warn():
  _, caught = _trace(optax.adamw(1e-2))
  assert not caught


@pytest.mark.parametrize('name', FUSED)
def test_fused_step_equals_update_then_apply(name):
  tx = FUSED[name]()
  step = og.make_train_step(_loss, tx, donate=False)

  @jax.jit
  def reference(params, opt_state, batch):
    scale = 1.0
    found = [s for s in jax.tree.leaves(
        opt_state, is_leaf=lambda x: isinstance(x, LossScaleState))
             if isinstance(s, LossScaleState)]
    if found:
      scale = found[0].loss_scale
    loss, grads = jax.value_and_grad(
        lambda p: _loss(p, batch).astype(jnp.float32) * scale)(params)
    updates, opt_state = tx.update(grads, opt_state, params,
                                   value=_loss(params, batch))
    return (optax.apply_updates(params, updates), opt_state,
            {'loss': _loss(params, batch), **og.metrics(opt_state)})

  params, opt_state = PARAMS, tx.init(PARAMS)
  for index in range(5):
    want = reference(params, opt_state, _batch(index))
    got = step(params, opt_state, _batch(index))
    chex.assert_trees_all_equal(got[1], want[1])
    chex.assert_trees_all_equal(got[2], want[2])
    chex.assert_trees_all_close(got[0], want[0], rtol=1e-6, atol=1e-7)
    assert bool(got[2]['skipped']) == (index == 3)
    params, opt_state = want[0], want[1]


def test_loss_scale_reuses_a_guard_first_in_a_chain():
  tx = og.dynamic_loss_scale(optax.chain(_guard(), optax.scale(1.0)))
  state = tx.init(PARAMS)
  assert isinstance(state.inner_state[0], GuardState)
  assert not isinstance(state.inner_state[0].inner_state, GuardState)
  bad = jax.tree.map(lambda p: p.at[0, 0].set(jnp.inf), PARAMS)
  _, new_state = tx.update(bad, state, PARAMS)
  assert float(new_state.loss_scale) == float(state.loss_scale) / 2
  chex.assert_trees_all_equal(new_state.inner_state[0].inner_state,
                              state.inner_state[0].inner_state)


@pytest.mark.parametrize('inner,match', [
    (lambda: optax.chain(optax.scale(2.0), _guard()), 'not the first'),
    (lambda: optax.chain(_guard(), og.skip_nonfinite(optax.sgd(0.1))),
     'found 2 guards'),
    (lambda: optax.MultiSteps(_guard(), 2).gradient_transformation(),
     'not the first'),
])
def test_loss_scale_refuses_a_guard_it_cannot_reuse(inner, match):
  with pytest.raises(ValueError, match=match):
    og.dynamic_loss_scale(inner()).init(PARAMS)


def test_metrics_report_every_guard_by_path():
  tx = optax.chain(og.skip_nonfinite(optax.scale(1.0)), _guard())
  state = tx.init(PARAMS)
  bad = jax.tree.map(lambda p: p.at[0, 0].set(jnp.nan), PARAMS)
  _, state = tx.update(bad, state, PARAMS, value=jnp.array(1.0))
  m = og.metrics(state)
  # The first guard skips and hands zeros on; the second accepts them.
  assert bool(m['[0]/skipped']) and not bool(m['[1]/skipped'])
  assert bool(m['skipped']) and bool(m['nonfinite'])
  assert int(m['total_skips']) == 1 and int(m['[1]/total_skips']) == 0
  np.testing.assert_array_equal(m['grad_norm'], m['[0]/grad_norm'])
