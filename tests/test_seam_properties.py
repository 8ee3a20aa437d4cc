"""Property-based seam suite (issue 11, item 7).

Hypothesis draws a composition (the guard at the top, inside ``optax.chain``,
``optax.inject_hyperparams``, ``optax.multi_transform`` or ``accumulate``;
around ``optax.masked``, ``optax.lookahead``, an injected Adam, or an inner
optimizer that overflows), a parameter tree (float32/bfloat16/float16/int/bool
leaves, ``None``, 0-d leaves, nesting) and a fault schedule (NaN/Inf in one
leaf, a NaN loss, a spike, a huge-but-finite gradient), then runs a few steps
in the pure form (``tx.update`` + ``optax.apply_updates``) and the fused form
side by side, asserting after every step:

* params and the persistent optimizer state are finite;
* a guard that skipped left its inner state bit for bit; when every guard
  skipped, the params are unchanged bit for bit;
* ``og.metrics`` reports every skip the faults call for, and its counters
  sum those of all guards;
* the pure and fused forms agree (state bit for bit, params within one
  rounding of their dtype).

A Flax NNX model with BatchNorm runs under fault schedules too, and
compositions the design refuses are asserted to raise ``ValueError``.

Profiles (tests/conftest.py): ``ci`` draws few examples; ``long`` many:
``HYPOTHESIS_PROFILE=long python -m pytest -q tests/test_seam_properties.py``.
Compiled functions are cached per (composition, tree) so that repeated draws
cost no compilation.
"""

import functools

import chex
import hypothesis
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import strategies as st

import optax_guard as og
from optax_guard.transforms import fused as _fused
from optax_guard.transforms.accumulate import AccumulateState, accumulate
from optax_guard.transforms.clipping import ClipStats
from optax_guard.transforms.guard import GuardState

STEPS = 4
SPIKE_OPTIONS = {'window': 4, 'min_history': 3, 'sigma': 3.0}

# ---------------------------------------------------------------------------
# Trees.
# ---------------------------------------------------------------------------

FLOAT_KINDS = {'f32': jnp.float32, 'bf16': jnp.bfloat16, 'f16': jnp.float16,
               'f32_0d': jnp.float32}
LEAF_KINDS = (*FLOAT_KINDS, 'int', 'bool', 'none')


def _leaf(kind: str, index: int):
  if kind == 'none':
    return None
  if kind == 'int':
    return jnp.array([index, 2], jnp.int32)
  if kind == 'bool':
    return jnp.array([True, False])
  if kind == 'f32_0d':
    return jnp.array(0.5 + index, jnp.float32)
  size = 3 if kind == 'f32' else 2
  return (jnp.arange(size, dtype=jnp.float32) - index).astype(FLOAT_KINDS[kind])


def _tree(kinds: tuple[str, ...], nested: bool):
  """A dict of leaves named by position; nested: the second half one down."""
  leaves = {f'l{i}_{kind}': _leaf(kind, i) for i, kind in enumerate(kinds)}
  if not nested or len(leaves) < 2:
    return leaves
  names = list(leaves)
  half = len(names) // 2
  return {**{n: leaves[n] for n in names[:half]},
          'inner': {n: leaves[n] for n in names[half:]}}


@st.composite
def tree_specs(draw):
  """Leaf kinds (the first always float32, so that a fault has a home)."""
  rest = draw(st.lists(st.sampled_from(LEAF_KINDS), max_size=3))
  return ('f32', *rest), draw(st.booleans())


def _float_paths(tree) -> list[str]:
  return [jax.tree_util.keystr(path) for path, leaf in
          jax.tree_util.tree_flatten_with_path(tree)[0]
          if leaf is not None and jnp.issubdtype(leaf.dtype, jnp.inexact)]


# ---------------------------------------------------------------------------
# Compositions: name -> builder; each returns (tx, wraps params?).
# ---------------------------------------------------------------------------


def _inner(name: str) -> optax.GradientTransformation:
  first_leaf_only = lambda params: jax.tree.map(
      lambda _: False, params) | {next(iter(params)): True}
  return {
      'sgd': lambda: optax.sgd(0.1),
      'adam': lambda: optax.adam(1e-2),
      # 0/0 in Adam as soon as a gradient element is zero: the inner
      # optimizer itself produces NaN.
      'adam_eps0': lambda: optax.adam(1e-2, eps=0.0),
      'masked_decay': lambda: optax.chain(
          optax.masked(optax.add_decayed_weights(1e-3), first_leaf_only),
          optax.sgd(0.1)),
      'injected_adam': lambda: optax.inject_hyperparams(optax.adam)(
          learning_rate=1e-2),
      'lookahead': lambda: optax.lookahead(optax.sgd(0.1), 2, 0.5),
  }[name]()


INNERS = ('sgd', 'adam', 'adam_eps0', 'masked_decay', 'injected_adam',
          'lookahead')
OUTERS = ('top', 'chain', 'inject', 'multi', 'accumulate')


def _guard(inner_name, spikes, clip):
  return og.guard(
      _inner(inner_name),
      clip=og.clip_by_global_norm(1.0) if clip else None,
      spikes=SPIKE_OPTIONS if spikes else None,
      max_consecutive_skips=3,
  )


def _labels(params):
  flat, treedef = jax.tree.flatten(params)
  return jax.tree.unflatten(treedef, ['a' if i % 2 == 0 else 'b'
                                      for i in range(len(flat))])


def _composition(outer, inner_name, spikes, clip):
  guard = lambda: _guard(inner_name, spikes, clip)
  if outer == 'top':
    return guard()
  if outer == 'chain':
    return optax.chain(optax.identity(), guard(), optax.scale(1.0))
  if outer == 'inject':
    return optax.inject_hyperparams(
        lambda learning_rate: og.guard(optax.adam(learning_rate),
                                       max_consecutive_skips=3)
    )(learning_rate=1e-2)
  if outer == 'multi':
    return optax.multi_transform({'a': guard(), 'b': og.guard(optax.sgd(0.1))},
                                 _labels)
  if outer == 'accumulate':
    return accumulate(guard(), every_k=2)
  raise AssertionError(outer)


@st.composite
def compositions(draw):
  outer = draw(st.sampled_from(OUTERS))
  inner = draw(st.sampled_from(INNERS))
  if outer in ('multi', 'accumulate') and inner == 'lookahead':
    inner = 'sgd'  # lookahead needs LookaheadParams over the whole tree
  return outer, inner, draw(st.booleans()), draw(st.booleans())


# ---------------------------------------------------------------------------
# Faults.
# ---------------------------------------------------------------------------

FAULTS = ('none', 'nan', 'inf', 'nan_loss', 'spike', 'huge')
MUST_SKIP = ('nan', 'inf', 'nan_loss')


@st.composite
def fault_schedules(draw):
  return tuple(
      (draw(st.sampled_from(FAULTS)), draw(st.integers(0, 7)))
      for _ in range(STEPS))


def _gradient(params_tree, step: int, fault: str, target: int):
  """Clean gradients that vary by step, with ``fault`` in one float leaf.

  Built in NumPy: eager JAX ops would compile a kernel per new leaf shape.
  """
  paths = _float_paths(params_tree)
  target_path = paths[target % len(paths)]
  scale = {'spike': 1e3}.get(fault, 1.0)

  def grad(path, leaf):
    if leaf is None:
      return None
    if not jnp.issubdtype(leaf.dtype, jnp.inexact):
      return np.zeros(leaf.shape, leaf.dtype)
    key = jax.tree_util.keystr(path)
    # Alternating signs; every third element zero (Adam with eps=0 divides
    # 0 by 0 there).
    index = np.arange(leaf.size)
    value = (0.5 + 0.25 * step) * scale * np.where(
        index % 3 == 2, 0.0, 1.0 - 2.0 * (index % 2))
    if key == target_path and fault in ('nan', 'inf'):
      value[0] = np.nan if fault == 'nan' else np.inf
    if key == "['l0_f32']" and fault == 'huge':
      value = value * 1e30  # finite in float32; Adam's nu overflows
    return np.asarray(value.reshape(leaf.shape), leaf.dtype)

  grads = jax.tree_util.tree_map_with_path(grad, params_tree)
  loss = np.nan if fault == 'nan_loss' else 1.0 + step * scale
  return grads, np.float32(loss)


# ---------------------------------------------------------------------------
# Reading the state.
# ---------------------------------------------------------------------------

_is_guard_state = lambda x: isinstance(x, GuardState)


def _guards(state) -> dict[str, GuardState]:
  flat, _ = jax.tree_util.tree_flatten_with_path(state, is_leaf=_is_guard_state)
  return {jax.tree_util.keystr(path): node for path, node in flat
          if _is_guard_state(node)}


def _is_telemetry_node(x) -> bool:
  return _is_guard_state(x) or isinstance(x, ClipStats)


def _persistent_leaves(state) -> list:
  """Every leaf that outlives the step: guard and clip telemetry left out.

  Telemetry may hold ``inf`` by design (``clip_threshold`` when nothing was
  clipped, the norm of a rejected gradient).
  """
  leaves = []
  for node in jax.tree.leaves(state, is_leaf=_is_telemetry_node):
    if isinstance(node, ClipStats):
      continue
    if _is_guard_state(node):
      leaves += _persistent_leaves((node.inner_state, node.clip_state,
                                    node.window))
    else:
      leaves.append(node)
  return leaves


def _assert_finite(tree, what):
  for leaf in jax.tree.leaves(tree):
    leaf = jnp.asarray(leaf)
    if jnp.issubdtype(leaf.dtype, jnp.inexact):
      assert bool(jnp.all(jnp.isfinite(leaf))), (what, leaf)


def _assert_params_close(got, want):
  """Within one rounding of each leaf's dtype (the fused pass may differ)."""
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert a.dtype == b.dtype
    if not jnp.issubdtype(a.dtype, jnp.inexact):
      np.testing.assert_array_equal(a, b)
      continue
    eps = float(jnp.finfo(a.dtype).eps)
    np.testing.assert_allclose(np.asarray(a, np.float32),
                               np.asarray(b, np.float32), rtol=2 * eps,
                               atol=2 * eps)


# ---------------------------------------------------------------------------
# Compiled functions, cached per (composition, tree).
# ---------------------------------------------------------------------------


@functools.cache
def _compiled(composition, tree_spec):
  outer, inner, _, _ = composition
  tx = _composition(*composition)
  params = _tree(*tree_spec)
  if inner == 'lookahead' and outer not in ('multi', 'accumulate', 'inject'):
    params = optax.LookaheadParams.init_synced(params)

  def pure(grads, state, params, value):
    updates, state = tx.update(grads, state, params, value=value)
    return optax.apply_updates(params, updates), state

  fused = _fused.update_and_apply(tx)

  # Both forms in one program: one compilation per example instead of two.
  @jax.jit
  def both(grads, state, params, value):
    return (pure(grads, state, params, value),
            fused(grads, state, params, value=value))

  return params, jax.jit(tx.init)(params), both


def _fast_params(params):
  return params.fast if isinstance(params, optax.LookaheadParams) else params


@hypothesis.given(composition=compositions(), tree_spec=tree_specs(),
                  faults=fault_schedules())
def test_seam_invariants_hold_after_every_step(composition, tree_spec, faults):
  outer, _, spikes, _ = composition
  params, state, both = _compiled(composition, tree_spec)
  accepted_clean = 0  # accepted steps, for when a spike can be called
  # No huge gradient, and no spike accepted before the rule was armed,
  # entered the spike window (either widens its bound past the next spike).
  window_clean = True
  for step, (fault, target) in enumerate(faults):
    grads, loss = _gradient(_fast_params(params), step, fault, target)
    (new_params, new_state), (fused_params, fused_state) = both(
        grads, state, params, loss)

    chex.assert_trees_all_equal(fused_state, new_state)
    _assert_params_close(fused_params, new_params)
    _assert_finite(new_params, 'params')
    _assert_finite(_persistent_leaves(new_state), 'optimizer state')

    old_guards, new_guards = _guards(state), _guards(new_state)
    for path, guard_state in new_guards.items():
      if bool(guard_state.skipped):
        chex.assert_trees_all_equal(
            (guard_state.inner_state, guard_state.clip_state),
            (old_guards[path].inner_state, old_guards[path].clip_state))
    if all(bool(g.skipped) for g in new_guards.values()):
      chex.assert_trees_all_equal(new_params, params)

    m = og.metrics(new_state)
    per_guard = {path: int(g.total_skips) for path, g in new_guards.items()}
    assert int(m['total_skips']) == sum(per_guard.values()), (
        step, int(m['total_skips']), per_guard)
    must_skip = fault in MUST_SKIP or (
        fault == 'spike' and spikes and outer in ('top', 'chain')
        and window_clean and accepted_clean >= SPIKE_OPTIONS['min_history'])
    if isinstance(new_state, AccumulateState):
      if fault in MUST_SKIP:
        assert bool(m['dropped']), (step, fault)
    elif must_skip:
      assert bool(m['skipped']), (step, fault)
    if not bool(m['skipped']):
      accepted_clean += 1
      window_clean &= fault not in ('huge', 'spike')
    params, state = new_params, new_state


# ---------------------------------------------------------------------------
# A model with mutable state: BatchNorm statistics roll back with the step.
# ---------------------------------------------------------------------------


def _bn_model():
  rngs = nnx.Rngs(0)
  return nnx.Sequential(nnx.Linear(3, 4, rngs=rngs), nnx.BatchNorm(4, rngs=rngs),
                        nnx.relu, nnx.Linear(4, 1, rngs=rngs))


# One transformation for every example: nnx.Optimizer keeps it as static
# data, so a new og.guard(...) per example compiled the step again each time
# (the long profile's 500 executables exhausted the process's memory maps).
@functools.cache
def _bn_guard():
  return og.guard(optax.adam(1e-2))


@functools.cache
def _nnx_step():
  loss_fn = lambda model, batch: jnp.mean(
      (model(batch['x']) - batch['y']) ** 2) * batch['loss_factor']
  return og.make_nnx_train_step(loss_fn, donate=False)


MODEL_FAULTS = ('none', 'nan_x', 'inf_x', 'nan_loss', 'big_x')


def _model_batch(step, fault):
  x = np.linspace(-1.0, 1.0, 24, dtype=np.float32).reshape(8, 3) * (1 + step)
  if fault == 'nan_x':
    x[1, 2] = np.nan
  if fault == 'inf_x':
    x[0, 0] = np.inf
  if fault == 'big_x':
    x = x * 1e4
  y = np.nan_to_num(x.sum(axis=1, keepdims=True), posinf=0.0)
  factor = np.nan if fault == 'nan_loss' else 1.0
  return {'x': jnp.asarray(x), 'y': jnp.asarray(y),
          'loss_factor': jnp.asarray(factor, jnp.float32)}


@hypothesis.given(faults=st.lists(st.sampled_from(MODEL_FAULTS),
                                  min_size=STEPS, max_size=STEPS))
def test_model_state_rolls_back_with_a_skipped_step(faults):
  model = _bn_model()
  optimizer = nnx.Optimizer(model, _bn_guard(), wrt=nnx.Param)
  step = _nnx_step()
  for index, fault in enumerate(faults):
    before = jax.tree.map(jnp.copy, nnx.to_pure_dict(nnx.state(model)))
    m = step(model, optimizer, _model_batch(index, fault))
    after = nnx.to_pure_dict(nnx.state(model))
    _assert_finite(after, 'model')
    if fault in ('nan_x', 'inf_x', 'nan_loss'):
      assert bool(m['skipped']), (index, fault)
    if bool(m['skipped']):
      chex.assert_trees_all_equal(after, before)


# ---------------------------------------------------------------------------
# Compositions the design refuses: a guard inside a wrapper that keeps state
# of its own across a skipped step (MultiSteps keeps the NaN in its
# accumulator; lookahead moves the slow params at a sync step). The refusal
# names the composition to use instead.
# -- Proposed API: make_train_step raises ValueError on its first call
#    (trace time, before anything runs), og.metrics on any such state.
# ---------------------------------------------------------------------------

REFUSED = {
    'multisteps(guard)': (
        lambda: optax.MultiSteps(og.guard(optax.sgd(0.1)), 2),
        'og.accumulate'),
    'lookahead(guard)': (
        lambda: optax.lookahead(og.guard(optax.sgd(0.1)), 2, 0.5),
        r'og.guard\(optax.lookahead'),
    'chain(multisteps(guard))': (
        lambda: optax.chain(optax.identity(), optax.MultiSteps(
            og.guard(optax.adam(1e-3)), 4).gradient_transformation()),
        'og.accumulate'),
}


@hypothesis.given(name=st.sampled_from(sorted(REFUSED)))
def test_refused_compositions_name_the_right_one(name):
  build, fix = REFUSED[name]
  tx = build()
  params = {'w': jnp.ones(2)}
  if name.startswith('lookahead'):
    params = optax.LookaheadParams.init_synced(params)
  state = tx.init(params)
  with pytest.raises(ValueError, match=fix):
    og.metrics(state)
  step = og.make_train_step(
      lambda p, b: sum(jnp.sum(x * b) for x in jax.tree.leaves(p)), tx)
  with pytest.raises(ValueError, match=fix):
    step(params, state, jnp.ones(2))
