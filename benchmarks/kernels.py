"""Kernel counts of the compiled update: what the guard adds, by leaf count.

On an accelerator every kernel is a launch, and a guard whose work grows
with the number of leaves costs more there than its arithmetic says. This
section compiles the fused update of each headline candidate (as in
``og.make_train_step``) for trees of 17 and 65 leaves and counts, in XLA's
optimised HLO, the instructions that run as kernels: fusions, reductions and
other computations outside a fusion, and the ``conditional`` and ``while``
instructions that branch between them. A static count: *per call* is the
most kernels one call can run (the entry's, plus the largest branch of each
``conditional``: the accepted step's, or the guard's rare rescaled-norm
pass), *total* every kernel of every branch.
Parameters, constants, tuples and bitcasts are not kernels. The counts are
the backend's that JAX runs on (XLA:CPU in CI; a GPU backend fuses
differently), so the point is the difference between candidates and its
growth with leaves, not the absolute number.

    python -m benchmarks --only kernels
"""

import collections
import re
from typing import Any, Callable, Sequence

import jax

from benchmarks import update_cost
from benchmarks import workloads as w

# 8 * layers + 1 leaves: the 12.6M tree of the update section (17 leaves at
# two layers) and the 1M tree (65 leaves at eight).
LAYER_COUNTS = (2, 8)
NOT_KERNELS = frozenset(
    {'parameter', 'constant', 'tuple', 'get-tuple-element', 'bitcast',
     'after-all', 'partition-id', 'replica-id'})
_COMPUTATION = re.compile(r'^(?:ENTRY )?%(?P<name>[^\s(]+) .*\{\s*$')
_INSTRUCTION = re.compile(r'^\s*(?:ROOT )?%\S+ = .*? (?P<op>[a-z][a-z0-9-]*)\(')
_EXECUTED = re.compile(
    r'(?:body|condition|true_computation|false_computation)=%(?P<one>[^\s,}]+)'
    r'|branch_computations=\{(?P<many>[^}]*)\}')


def computations(hlo: str) -> tuple[str, dict[str, list[str]]]:
  """``(entry name, {computation name: instruction lines})`` of HLO text."""
  found: dict[str, list[str]] = {}
  entry, current = '', None
  for line in hlo.splitlines():
    match = _COMPUTATION.match(line)
    if match:
      current = match.group('name')
      found[current] = []
      if line.startswith('ENTRY'):
        entry = current
    elif line.strip() == '}':
      current = None
    elif current is not None:
      found[current].append(line)
  return entry, found


def _called(line: str) -> list[str]:
  """The computations a ``conditional`` or ``while`` line runs."""
  names = []
  for called in _EXECUTED.finditer(line):
    if called.group('one'):
      names.append(called.group('one'))
    else:
      names += [part.strip().lstrip('%')
                for part in called.group('many').split(',')]
  return names


def kernel_counts(hlo: str) -> dict[str, int]:
  """Kernels of the computations the entry runs (not fusion bodies or
  reduction lambdas).

  Returns:
    ``'per_call'``: the most kernels one call runs (the entry's, plus for
    each ``conditional`` its largest branch, a loop's body once);
    ``'total'``: every kernel of every branch; ``'branches'``: the
    ``conditional`` and ``while`` instructions.
  """
  entry, bodies = computations(hlo)
  branches = 0

  def count(name: str) -> tuple[int, int]:
    """``(most kernels one run of name runs, all kernels under it)``."""
    nonlocal branches
    most = every = 0
    for line in bodies.get(name, ()):
      op = _INSTRUCTION.match(line)
      if op is None or op.group('op') in NOT_KERNELS:
        continue
      most, every = most + 1, every + 1
      called = [count(c) for c in _called(line)]
      if not called:
        continue
      branches += 1
      every += sum(total for _, total in called)
      if op.group('op') == 'conditional':
        most += max(one for one, _ in called)
      else:  # A loop's body and condition, once.
        most += sum(one for one, _ in called)
    return most, every

  per_call, total = count(entry)
  return {'per_call': per_call, 'total': total, 'branches': branches}


def _hlo(factory: Callable[[], Any], count: int, layers: int) -> str:
  tx, _, step = w.compiled(w.FUSED, factory)
  params = w.abstract_params(count, layers)
  opt_state = jax.eval_shape(tx.init, params)
  loss = jax.ShapeDtypeStruct((), jax.numpy.float32)
  return step.lower(params, opt_state, params, loss).compile().as_text()


def _candidates() -> list[tuple[str, Callable[[], Any]]]:
  return [
      (update_cost.BARE, w.adamw),
      (update_cost.OPTAX_APPLY_IF_FINITE, w.optax_apply_if_finite),
      (update_cost.GUARD_FUSED, w.recommended_guard),
      (update_cost.UNCHECKED_FUSED, w.unchecked_guard),
  ]


def run(count: int, *, layer_counts: Sequence[int] = LAYER_COUNTS,
        say: Callable[[str], None] = print) -> dict[str, Any]:
  """Kernel counts of each candidate at each leaf count, and what each adds
  to bare adamw's."""
  rows = []
  for layers in layer_counts:
    leaves = 8 * layers + 1
    bare = None
    for name, factory in _candidates():
      say(f'{leaves} leaves: compiling {name}')
      counts = kernel_counts(_hlo(factory, count, layers))
      bare = bare or counts
      rows.append({'leaves': leaves, 'name': name, **counts,
                   'added_per_call': counts['per_call'] - bare['per_call']})
  return {'params': count, 'backend': jax.default_backend(), 'rows': rows}
