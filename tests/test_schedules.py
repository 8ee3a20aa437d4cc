"""Schedules count applied steps only (issue 23, item 4).

The guide used to offer ``optax.inject_hyperparams`` around the guard as
equivalent to injecting inside it. With a schedule it is not: around the
guard, ``inject_hyperparams``' own count is outside the state the guard
holds, so a skipped step spends a step of the schedule. The guide now says
so and shows the form that counts applied steps only (inside the guard, or a
schedule passed to the optimizer); these tests pin both.
"""

import jax.numpy as jnp
import optax
import pytest

import optax_guard as og

_PARAMS = {'w': jnp.zeros(())}
_GOOD, _BAD = {'w': jnp.ones(())}, {'w': jnp.full((), jnp.nan)}
_SCHEDULE = optax.linear_schedule(1.0, 0.0, transition_steps=10)


def _updates(tx):
  """The update of each step of good, bad, good (the last one's lr shows)."""
  state = tx.init(_PARAMS)
  out = []
  for grads in (_GOOD, _BAD, _GOOD):
    updates, state = tx.update(grads, state, _PARAMS, value=jnp.ones(()))
    out.append(float(updates['w']))
  return out


@pytest.mark.parametrize('make_tx', [
    lambda: og.guard(optax.inject_hyperparams(optax.sgd)(
        learning_rate=_SCHEDULE)),
    lambda: og.guard(optax.sgd(_SCHEDULE)),
], ids=['inject_inside', 'schedule_in_optimizer'])
def test_a_schedule_inside_the_guard_counts_applied_steps(make_tx):
  # The third step is the second applied one: learning rate schedule(1).
  assert _updates(make_tx()) == [-1.0, 0.0, -float(_SCHEDULE(1))]


def test_inject_around_the_guard_spends_a_step_on_a_skip():
  # Documented in docs/guides/composing.md: use it for constant values.
  tx = optax.inject_hyperparams(
      lambda learning_rate: og.guard(optax.sgd(learning_rate)))(
          learning_rate=_SCHEDULE)
  assert _updates(tx) == [-1.0, 0.0, -float(_SCHEDULE(2))]
