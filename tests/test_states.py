"""One finder for states anywhere in an optimizer state; flax stays lazy."""

import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx

import optax_guard as og
from optax_guard.transforms import states
from optax_guard.transforms.clipping import ZClipState
from optax_guard.transforms.guard import GuardState
from optax_guard.transforms.loss_scale import LossScaleState

PARAMS = {'a': jnp.ones(2), 'b': jnp.zeros(3)}


def _guard(lr=0.1):
  return og.guard(optax.sgd(lr), clip=og.zclip())


COMPOSITIONS = {
    'guard': (_guard, ['']),
    'chain': (lambda: optax.chain(optax.scale(1.0), _guard()), ['[1]']),
    'multi_transform': (
        lambda: optax.multi_transform({'g': _guard(), 'h': _guard()},
                                      {'a': 'g', 'b': 'h'}),
        [".inner_states['g'].inner_state", ".inner_states['h'].inner_state"]),
    'MultiSteps': (lambda: optax.MultiSteps(_guard(), 2),
                   ['.inner_opt_state']),
    'inject_hyperparams': (
        lambda: optax.inject_hyperparams(_guard)(lr=0.1), ['.inner_state']),
    'masked': (lambda: optax.masked(_guard(), {'a': True, 'b': False}),
               ['.inner_state']),
    'dynamic_loss_scale': (lambda: og.dynamic_loss_scale(_guard()),
                           ['.inner_state']),
}


@pytest.mark.parametrize('name', COMPOSITIONS)
def test_finds_every_guard_by_path(name):
  make, paths = COMPOSITIONS[name]
  state = make().init(PARAMS)
  found = states.find_states(state, GuardState)
  assert [states.path_name(path) for path, _ in found] == paths
  for path, node in found:
    leaves = jax.tree_util.tree_flatten_with_path(
        state, is_leaf=lambda x: isinstance(x, GuardState))[0]
    chex.assert_trees_all_equal(
        dict((tuple(p), x) for p, x in leaves)[tuple(path)], node)


def test_nested_states_outermost_first():
  state = og.dynamic_loss_scale(_guard()).init(PARAMS)
  found = states.find_states(state, (LossScaleState, GuardState, ZClipState))
  assert [type(node) for _, node in found] == [
      LossScaleState, GuardState, ZClipState]
  assert [states.path_name(p) for p, _ in found] == [
      '', '.inner_state', '.inner_state.clip_state']


def test_finds_states_in_an_nnx_optimizer():
  model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.chain(_guard()), wrt=nnx.Param)
  (path, node), = states.find_states(optimizer, GuardState)
  assert states.path_name(path) == '[0]'
  assert isinstance(node.counters.total_skips, jax.Array)
  assert states.find_states(optimizer.opt_state, GuardState)[0][0] == path


@pytest.mark.parametrize('name,last', [
    ('guard', True), ('chain', True), ('dynamic_loss_scale', True),
    ('MultiSteps', False), ('masked', False), ('inject_hyperparams', False),
])
def test_last_position(name, last):
  state = COMPOSITIONS[name][0]().init(PARAMS)
  (path, _), = states.find_states(state, GuardState)
  assert states.is_last_in(state, path, (LossScaleState,)) == last


def test_importing_the_package_does_not_import_flax():
  code = ('import sys, optax_guard; '
          'assert not [m for m in sys.modules if m.startswith("flax")]')
  subprocess.run([sys.executable, '-c', code], check=True)
