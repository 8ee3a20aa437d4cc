"""What the benchmarks run: parameter trees of a given size, the optimizers
compared, and the jitted, donated steps that apply them."""

import functools
import math
import re
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

import optax_guard as og
from optax_guard import train_step
from optax_guard.transforms import fused as _apply
from optax_guard.transforms import numerics as og_numerics

LAYERS = 8
_SIZE = re.compile(r'^(?P<number>\d+(\.\d+)?([eE]\d+)?)(?P<unit>[kKmMgG]?)$')
_UNITS = {'': 1, 'k': 10**3, 'm': 10**6, 'g': 10**9}


def parse_size(text: str) -> int:
  """A parameter count from ``'1M'``, ``'12.6M'``, ``'100M'``, ``'20k'``, ``'5000'``.

  Examples:
    >>> parse_size('12.6M'), parse_size('20k'), parse_size('1e6')
    (12600000, 20000, 1000000)
  """
  match = _SIZE.match(text.strip())
  if match is None:
    raise ValueError(
        f'bad size {text!r}: expected a number with an optional k, M or G'
        ' suffix, e.g. 12.6M.'
    )
  count = round(float(match['number']) * _UNITS[match['unit'].lower()])
  if count < 1000:
    raise ValueError(f'size {text!r} is below 1000 parameters.')
  return count


def format_size(count: int) -> str:
  """``12600000 -> '12.6M'``, the inverse of :func:`parse_size` for display."""
  for unit, scale in (('G', 10**9), ('M', 10**6), ('k', 10**3)):
    if count >= scale:
      return f'{count / scale:.4g}{unit}'
  return str(count)


def format_bytes(count: int) -> str:
  """``1536 -> '1.5 KiB'``: binary units, three significant digits."""
  for unit, scale in (('GiB', 2**30), ('MiB', 2**20), ('KiB', 2**10)):
    if abs(count) >= scale:
      return f'{count / scale:.3g} {unit}'
  return f'{count} B'


def param_shapes(count: int, layers: int = LAYERS) -> dict[str, Any]:
  """Shapes of a transformer-like tree of exactly ``count`` fp32 parameters.

  ``layers`` blocks of attention and MLP matrices with their biases and
  norm scales (eight leaves each) plus an embedding table that takes the
  remainder, so the per-leaf work of the guards is exercised on ``8 * layers
  + 1`` leaves (65 by default) of realistic shapes rather than on one flat
  vector.
  """
  # The blocks hold ~80% of the parameters, 12 * width**2 each.
  width = max(1, math.isqrt(int(count * 0.8) // (12 * layers)))
  block = {
      'qkv': (width, 3 * width),
      'attention_out': (width, width),
      'mlp_in': (width, 4 * width),
      'mlp_in_bias': (4 * width,),
      'mlp_out': (4 * width, width),
      'mlp_out_bias': (width,),
      'norm_scale': (width,),
      'norm_bias': (width,),
  }
  block_size = sum(math.prod(shape) for shape in block.values())
  remainder = count - layers * block_size
  shapes = {f'block_{i}': dict(block) for i in range(layers)}
  shapes['embedding'] = (remainder // width, width)
  tail = remainder % width
  if tail:
    shapes['embedding_tail'] = (tail,)
  return shapes


def _is_shape(x) -> bool:
  return isinstance(x, tuple)


def abstract_params(count: int, layers: int = LAYERS):
  """``jax.ShapeDtypeStruct`` leaves of :func:`param_shapes`."""
  return jax.tree.map(
      lambda s: jax.ShapeDtypeStruct(s, jnp.float32),
      param_shapes(count, layers),
      is_leaf=_is_shape,
  )


@functools.partial(jax.jit, static_argnames=('count', 'layers'))
def random_tree(seed, scale, *, count: int, layers: int = LAYERS):
  """Normal values of the shapes of :func:`param_shapes`, fresh buffers.

  One jitted computation: drawing leaf by leaf would compile one kernel per
  distinct shape.
  """
  shapes = param_shapes(count, layers)
  leaves, treedef = jax.tree.flatten(shapes, is_leaf=_is_shape)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  values = [
      scale * jax.random.normal(key, shape, jnp.float32)
      for key, shape in zip(keys, leaves)
  ]
  return jax.tree.unflatten(treedef, values)


def tree_bytes(tree) -> int:
  """Bytes of every array (or ShapeDtypeStruct) leaf of ``tree``."""
  return sum(
      math.prod(x.shape) * jnp.dtype(x.dtype).itemsize
      for x in jax.tree.leaves(tree)
  )


def adamw() -> optax.GradientTransformation:
  return optax.adamw(1e-3, weight_decay=1e-4)


def recommended_guard() -> optax.GradientTransformation:
  """The guard the README recommends: ZClip plus spike and NaN skipping,
  the inner optimizer's output checked (the default)."""
  return og.guard(adamw(), clip=og.zclip(), spikes={})


def unchecked_guard() -> optax.GradientTransformation:
  """The recommended guard with ``check_updates=False``: its decision on the
  gradients alone, the inner optimizer's update not checked."""
  return og.guard(adamw(), clip=og.zclip(), spikes={}, check_updates=False)


def chained_guard() -> optax.GradientTransformation:
  """The recommended guard as the one link of an ``optax.chain``."""
  return optax.chain(recommended_guard())


def guard_floor() -> optax.GradientTransformationExtraArgs:
  """The least any guard can cost: ``adamw`` under a ``lax.cond`` on one
  finiteness check of the gradients (one read of them). No norms are kept,
  nothing is clipped, no statistics, no metrics. Applied fused (through
  :func:`og.make_train_step`'s path), as the guards are.
  """
  return _floor(check_outputs=False)


def checked_floor() -> optax.GradientTransformationExtraArgs:
  """The least an *exact, in-place* check of the optimizer's output can
  cost: :func:`guard_floor` whose accepted branch first computes ``adamw``'s
  update and new moments into finiteness reductions only (one per leaf
  shape, the masks of a shape ANDed; nothing written), then, under a
  nested ``lax.cond`` on that verdict, computes them again and writes them
  in place. Without a copy of the state, whatever holds a bad step exactly
  must know the verdict before the first write, so it reads gradients,
  moments and params twice: this is that structure and nothing else (no
  norms, clip, statistics, or a state that may hold an inf).
  """
  return _floor(check_outputs=True)


def _floor(check_outputs: bool) -> optax.GradientTransformationExtraArgs:
  inner = adamw()

  def finite(grads):
    return jnp.isfinite(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))

  def update(grads, state, params=None, *, fuse_apply=False, **extra_args):
    del extra_args

    def write(params, state):
      updates, state = inner.update(grads, state, params)
      return (optax.apply_updates(params, updates) if fuse_apply else updates,
              state)

    def rejected(params, state):
      return params if fuse_apply else jax.tree.map(jnp.zeros_like, grads), state

    def outputs_finite(params, state):
      masks: dict[Any, list[jax.Array]] = {}
      for leaf in jax.tree.leaves(inner.update(grads, state, params)):
        if jnp.issubdtype(leaf.dtype, jnp.floating):
          masks.setdefault(leaf.shape, []).append(jnp.isfinite(leaf))
      return jnp.all(jnp.stack([
          og_numerics.all_true(functools.reduce(jnp.logical_and, group))
          for group in masks.values()]))

    def checked(params, state):
      return jax.lax.cond(outputs_finite(params, state), write, rejected,
                          params, state)

    accepted = checked if check_outputs else write
    return jax.lax.cond(finite(grads), accepted, rejected, params, state)

  return _apply.FusedGradientTransformation(inner.init, update)


def optax_clip() -> optax.GradientTransformation:
  return optax.chain(optax.clip_by_global_norm(1.0), adamw())


def optax_apply_if_finite() -> optax.GradientTransformation:
  return optax.apply_if_finite(optax_clip(), max_consecutive_errors=10)


def single_guards() -> dict[str, Callable[[], optax.GradientTransformation]]:
  """Each optax_guard transformation alone, around or before ``adamw``, and
  the recommended guard's variants."""
  return {
      'og.clip_by_global_norm + adamw': lambda: optax.chain(
          og.clip_by_global_norm(1.0), adamw()
      ),
      'og.zclip + adamw': lambda: optax.chain(og.zclip(), adamw()),
      'og.autoclip + adamw': lambda: optax.chain(og.autoclip(), adamw()),
      'og.agc + adamw': lambda: optax.chain(og.agc(0.01), adamw()),
      'og.skip_nonfinite(adamw)': lambda: og.skip_nonfinite(adamw()),
      'og.skip_spikes(adamw)': lambda: og.skip_spikes(adamw()),
      'og.dynamic_loss_scale(og.guard)': lambda: og.dynamic_loss_scale(
          recommended_guard()
      ),
      "og.guard(granularity='leaf')": lambda: og.guard(
          adamw(), clip=og.zclip(), spikes={}, granularity='leaf'
      ),
  }


# Every jitted step keeps unused arguments: the guard's last-step telemetry
# is overwritten without being read, and a pruned argument is not donated
# (its buffer would outlive the call), as in og.make_train_step.


def make_update_step(tx: optax.GradientTransformation):
  """``step(params, opt_state, grads, loss) -> (params, opt_state)``: the
  optimizer alone, jitted, params and state donated."""
  tx = optax.with_extra_args_support(tx)

  def step(params, opt_state, grads, loss):
    updates, opt_state = tx.update(grads, opt_state, params, value=loss)
    return optax.apply_updates(params, updates), opt_state

  return jax.jit(step, donate_argnums=(0, 1), keep_unused=True)


def make_fused_update_step(tx: optax.GradientTransformation):
  """:func:`make_update_step` in the form :func:`og.make_train_step` uses:
  a guard's fused update-and-apply (one ``lax.cond`` around the inner update
  and the parameter update), or the plain composition for other optimizers.
  """

  def step(params, opt_state, grads, loss):
    # As og.make_train_step plans it: a guard last in a chain is fused too.
    apply = train_step.plan_apply(tx, opt_state)
    return apply(grads, opt_state, params, value=loss)

  return jax.jit(step, donate_argnums=(0, 1), keep_unused=True)


def linear_loss(params, grads) -> jax.Array:
  """``sum(params * grads)``: a loss whose gradient is ``grads`` itself, so a
  full train step costs the update plus one read of params and grads."""
  products = jax.tree.map(lambda p, g: jnp.vdot(p, g), params, grads)
  return sum(jax.tree.leaves(products))


def make_bare_train_step(loss_fn, tx: optax.GradientTransformation):
  """The plain optax train step: gradient, update, apply; jitted, donated."""

  def step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return jax.jit(step, donate_argnums=(0, 1), keep_unused=True)


class Stepper:
  """Threads one candidate's own params and optimizer state through its
  donated step; each call runs one step and returns its outputs."""

  def __init__(self, step: Callable[..., Any], params, opt_state, *inputs):
    self.step = step
    self.params = params
    self.opt_state = opt_state
    self.inputs = inputs

  def __call__(self):
    outputs = self.step(self.params, self.opt_state, *self.inputs)
    self.params, self.opt_state = outputs[0], outputs[1]
    return outputs


class StepKind(NamedTuple):
  """A step form: ``'update'`` (optimizer only) or ``'train'`` (with the
  linear loss's gradient), and how to build it for an optimizer."""

  name: str
  build: Callable[[optax.GradientTransformation], Callable[..., Any]]


UPDATE = StepKind('update', make_update_step)
FUSED = StepKind('update', make_fused_update_step)
TRAIN_BARE = StepKind(
    'train', lambda tx: make_bare_train_step(linear_loss, tx)
)
TRAIN_OG = StepKind(
    'train', lambda tx: og.make_train_step(linear_loss, tx)
)


@functools.cache
def compiled(kind: StepKind, factory: Callable[[], Any]):
  """``(tx, jitted tx.init, jitted step)`` for the optimizer ``factory()``.

  Memoised, so that every section asking for the same step gets the same
  ``jax.jit`` objects and their compilation cache: the memory analysis of a
  step the update section already ran costs nothing.
  """
  tx = factory()
  return tx, jax.jit(tx.init), kind.build(tx)


def stepper(
    kind: StepKind, factory: Callable[[], Any], grads,
    loss: Optional[jax.Array], *, count: int, layers: int,
) -> Stepper:
  """A :class:`Stepper` with fresh params (same values for every
  candidate) and the initial state of ``factory()``."""
  _, init, step = compiled(kind, factory)
  params = random_tree(0, 1.0, count=count, layers=layers)
  opt_state = init(params)
  if kind.name == 'update':
    return Stepper(step, params, opt_state, grads, loss)
  return Stepper(step, params, opt_state, grads)
