"""The floor on the spike rule's spread (issue 23, item 5).

On main before the fix a window of exactly equal values had a std of zero,
so the next value a hair above them was a spike: a constant loss, a window
of zero gradient norms or one of denormals skipped the next ordinary step
(and ``shift_after`` more). The std is now at least ``min_rel_std * |mean| +
min_abs_std``.
"""

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_guard as og
from optax_guard.transforms import spikes as rule

_CONFIG = rule.spike_config(window=16)


@jax.jit
def _verdict(level, value):
  """The rule's verdict on ``value`` after a full window of ``level``."""
  signal = rule.init_window(_CONFIG).grad_norm._replace(
      values=jnp.full((_CONFIG.window,), level, jnp.float32),
      size=jnp.asarray(_CONFIG.window, jnp.int32))
  window = rule.init_window(_CONFIG)._replace(loss=signal, grad_norm=signal)
  return rule.is_spike(window, _CONFIG, value, value).spike


# Zero, denormals (below float32's smallest normal 1.18e-38) and ordinary
# magnitudes, as float32.
_LEVELS = st.one_of(
    st.just(0.0),
    st.floats(1e-45, 1.1e-38),
    st.floats(1e-30, 1e30),
).map(lambda x: float(np.float32(x)))


@hypothesis.given(level=_LEVELS, relative=st.floats(-0.05, 0.05),
                  absolute=st.floats(-5e-6, 5e-6))
def test_a_constant_window_does_not_skip_an_ordinary_value(level, relative,
                                                           absolute):
  # Within 5% of the level, or 5e-6 of it: below sigma (6) times the floor.
  for value in (level * (1 + relative), level + absolute):
    value = abs(float(np.float32(value)))
    assert not bool(_verdict(jnp.float32(level), jnp.float32(value))), value


@hypothesis.given(level=_LEVELS)
def test_a_constant_window_still_skips_a_real_spike(level):
  # Twice the level plus 1e-5: above 6% of it and above 6e-6.
  spike = float(np.float32(2 * level + 1e-5))
  assert bool(_verdict(jnp.float32(level), jnp.float32(spike)))


@pytest.mark.parametrize(('level', 'ordinary'), [
    (2.0, 2.001), (0.0, 1e-7), (1e-40, 2e-40)],
    ids=['constant_loss', 'zeros', 'denormals'])
def test_the_guard_accepts_the_next_ordinary_step(level, ordinary):
  # The reproduction through the guard: a constant loss and gradient
  # norm for a whole window, then a value a hair above it.
  tx = og.guard(optax.sgd(0.1), spikes={'window': 16})
  params = {'w': jnp.zeros(())}
  update = jax.jit(tx.update)
  state = tx.init(params)
  for value in [level] * 16 + [ordinary]:
    _, state = update({'w': jnp.float32(value)}, state, params,
                      value=jnp.float32(value))
    assert not bool(og.metrics(state)['skipped']), value


@pytest.mark.parametrize(('option', 'value', 'error'), [
    ('min_rel_std', -0.1, ValueError), ('min_rel_std', float('nan'), ValueError),
    ('min_abs_std', float('inf'), ValueError), ('min_abs_std', True, TypeError)])
def test_the_floors_are_validated(option, value, error):
  with pytest.raises(error, match=option):
    rule.spike_config(**{option: value})
