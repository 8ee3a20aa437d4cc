"""The guard's adaptive clip follows a level shift its spike rule accepts
(issue 23, item 8).

A linear regression learns teacher ``w1``; at step 300 the data change for
good: a new teacher ``w2`` and targets 20x noisier (the gradient norm is
about 20x higher). The spike rule skips ``shift_after`` steps, then accepts
the new level and rebuilds its window. On main before the fix ZClip inside
the guard kept clipping the new level (its EMA learns from clipped norms):
400 steps after the shift its weight error was 2.2x the unclipped run's
(0.146 against 0.068). Now the guard seeds the clip's statistics from the
norms of the accepted level (``clipping.rebase``); ZClip used alone is
unchanged (it follows the reference: ``tests/test_clipping.py``).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_guard as og

_BEFORE, _AFTER, _DIM = 300, 400, 8
_SPIKES = (250, 600)  # steps whose batch is scaled 4x (gradient norm ~16x)


def _data(with_spikes, seed=0):
  rng = np.random.default_rng(seed)
  steps = _BEFORE + _AFTER
  x = rng.standard_normal((steps, 32, _DIM)).astype(np.float32)
  w1 = rng.standard_normal(_DIM).astype(np.float32)
  w2 = w1 + rng.standard_normal(_DIM).astype(np.float32)
  noise = 0.1 * rng.standard_normal((steps, 32)).astype(np.float32)
  noise[_BEFORE:] *= 20.0
  teacher = np.where(np.arange(steps)[:, None] < _BEFORE, w1, w2)
  y = np.einsum('bnd,bd->bn', x, teacher) + noise
  scale = np.ones((steps, 1, 1), np.float32)
  if with_spikes:
    scale[list(_SPIKES)] = 4.0
  return jnp.asarray(x * scale), jnp.asarray(y * scale[:, :, 0]), w2


def _run(tx, with_spikes=False):
  """Relative weight error to ``w2`` per step, and the guard's reports."""
  x, y, w2 = _data(with_spikes)

  def loss_fn(w, x, y):
    return jnp.mean(jnp.square(x @ w['w'] - y))

  def step(carry, batch):
    w, state = carry
    loss, grads = jax.value_and_grad(loss_fn)(w, *batch)
    updates, state = tx.update(grads, state, w, value=loss)
    w = optax.apply_updates(w, updates)
    report = og.metrics(state) if hasattr(state, 'last_step') else {}
    return (w, state), (w['w'], report)

  w = {'w': jnp.zeros(_DIM)}
  _, (ws, reports) = jax.jit(lambda c, b: jax.lax.scan(step, c, b))(
      (w, tx.init(w)), (x, y))
  error = np.linalg.norm(np.asarray(ws) - w2, axis=1) / np.linalg.norm(w2)
  return error, reports


@pytest.fixture(scope='module')
def unclipped_error():
  return _run(optax.sgd(0.05))[0][-1]


@pytest.mark.parametrize('clip', [og.zclip, og.autoclip],
                         ids=['zclip', 'autoclip'])
def test_the_guards_clip_learns_the_new_level_as_fast_as_unclipped(
    clip, unclipped_error):
  error, reports = _run(og.guard(optax.sgd(0.05), spikes={}, clip=clip()))
  # Measured: no clip 0.0677, spike rule alone 0.0677, guard with ZClip
  # 0.0670 (0.146 before the fix), with AutoClip 0.0677.
  assert error[-1] <= 1.5 * unclipped_error
  # The shift cost the spike rule's shift_after skips, no more.
  assert int(np.asarray(reports['skipped'][_BEFORE:]).sum()) <= 16


def test_the_spike_rule_alone_learns_as_fast_as_unclipped(unclipped_error):
  error, _ = _run(og.guard(optax.sgd(0.05), spikes={}))
  assert error[-1] <= 1.5 * unclipped_error


def test_spikes_before_and_after_the_shift_are_still_caught():
  _, reports = _run(og.guard(optax.sgd(0.05), spikes={}, clip=og.zclip()),
                    with_spikes=True)
  for step in _SPIKES:
    skipped = bool(reports['skipped'][step])
    clipped = float(reports['clip_threshold'][step]) < float(
        reports['grad_norm'][step])
    assert skipped or clipped, step
  # And the rebased ZClip clips ordinary steps of the new level rarely, as
  # it clips those of the old one (z > 2.5 of a near-normal spread).
  after = np.isfinite(np.asarray(reports['clip_threshold'][_BEFORE + 50:]))
  assert after.mean() < 0.1


def test_zclip_alone_keeps_the_published_behaviour():
  # Without the spike rule nothing rebases it: it keeps clipping the new
  # level, as ZClip's reference does (the guide explains).
  error, reports = _run(og.guard(optax.sgd(0.05), clip=og.zclip()))
  after = np.isfinite(
      np.asarray(reports['clip_threshold'][_BEFORE:_BEFORE + 50]))
  assert after.mean() > 0.5
  assert error[-1] > 1.5 * _run(optax.sgd(0.05))[0][-1]  # 0.1365
