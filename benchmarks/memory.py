"""Item 3: compiled memory of guarded vs bare steps, and donation.

XLA's ``memory_analysis()`` of each step, compiled for abstract inputs (no
parameters are allocated, so 100M costs no more than 1M). A guard may add
its own state and a few scalars, but no copy of the params or the
optimizer state: the target is ``peak(guarded) <= peak(bare) + guard state
+ 1 MiB``. Donation is verified twice: in the compiled step (the aliased
bytes cover every params and optimizer-state array but scalars) and at run
time at the smallest size (every array passed in but scalars is deleted
after the call). Scalars are exempt because ``jax.jit`` does not pass an
input the step never reads, such as a guard's last ``grad_norm``, which
the step overwrites: it is neither donated nor copied.
"""

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from benchmarks import update_cost
from benchmarks import workloads as w

SLACK_BYTES = 1 << 20


def _steps(families: Sequence[str]):
  """``(candidate, step kind, optimizer factory, bare candidate)`` of the
  headline and train-step groups of the update section, when selected."""
  steps = []
  for group, members in update_cost.groups(families):
    if group in ('headline', 'train step'):
      steps += members
  return steps


def _abstract_inputs(kind: w.StepKind, tx, count: int, layers: int):
  params = w.abstract_params(count, layers)
  opt_state = jax.eval_shape(tx.init, params)
  if kind.name == 'update':
    return params, opt_state, params, jax.ShapeDtypeStruct((), jnp.float32)
  return params, opt_state, params


def _scalar_bytes(tree) -> int:
  return w.tree_bytes([x for x in jax.tree.leaves(tree) if x.shape == ()])


def _analysis(kind: w.StepKind, factory, count: int,
              layers: int) -> dict[str, Any]:
  tx, _, step = w.compiled(kind, factory)
  inputs = _abstract_inputs(kind, tx, count, layers)
  state = inputs[:2]
  stats = step.lower(*inputs).compile().memory_analysis()
  argument = stats.argument_size_in_bytes
  output = stats.output_size_in_bytes
  alias = stats.alias_size_in_bytes
  temp = stats.temp_size_in_bytes
  return {
      'params_bytes': w.tree_bytes(inputs[0]),
      'opt_state_bytes': w.tree_bytes(inputs[1]),
      'undonated_bytes': w.tree_bytes(state) - alias,
      'donated': w.tree_bytes(state) - alias <= _scalar_bytes(state),
      'argument_bytes': argument,
      'output_bytes': output,
      'alias_bytes': alias,
      'temp_bytes': temp,
      # What the step holds at once: inputs, the outputs that do not reuse
      # a donated input, and the scratch.
      'peak_bytes': argument + output - alias + temp,
      'xla_peak_bytes': getattr(stats, 'peak_memory_in_bytes', None),
  }


def _donation_deletes_inputs(kind: w.StepKind, factory, count: int,
                             layers: int) -> bool:
  """Whether one real call consumes every non-scalar array of the params
  and state passed in."""
  _, init, step = w.compiled(kind, factory)
  params = w.random_tree(0, 1.0, count=count, layers=layers)
  grads = w.random_tree(1, 1e-3, count=count, layers=layers)
  opt_state = init(params)
  loss = jnp.asarray(2.0, jnp.float32)  # As in the update section.
  inputs = (grads, loss) if kind.name == 'update' else (grads,)
  jax.block_until_ready(step(params, opt_state, *inputs))
  return all(
      x.is_deleted() for x in jax.tree.leaves((params, opt_state))
      if x.shape != ()
  )


def run(counts: list[int], *, families: Sequence[str], layers: int,
        say: Callable[[str], None]) -> dict[str, Any]:
  rows = []
  for count in counts:
    by_name = {}
    for name, kind, factory, bare in _steps(families):
      say(f'{w.format_size(count)}: compiling {name}')
      row = {'params': count, 'name': name, 'baseline': bare,
             **_analysis(kind, factory, count, layers)}
      if count == min(counts):
        row['donated_at_run_time'] = _donation_deletes_inputs(
            kind, factory, count, layers
        )
      if bare is not None:
        base = by_name[bare]
        row['guard_state_bytes'] = (
            row['opt_state_bytes'] - base['opt_state_bytes']
        )
        row['extra_peak_bytes'] = row['peak_bytes'] - base['peak_bytes']
        row['extra_temp_bytes'] = row['temp_bytes'] - base['temp_bytes']
        row['within_target'] = (
            row['extra_peak_bytes'] <= row['guard_state_bytes'] + SLACK_BYTES
        )
      by_name[name] = row
      rows.append(row)
  return {'rows': rows, 'slack_bytes': SLACK_BYTES}
