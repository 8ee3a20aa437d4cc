"""Item 1 (and 5): what a guard adds to the optimizer update, per size.

Candidates are measured in small interleaved groups, each with its own
baseline, so that at 100M parameters no more than six copies of params and
optimizer state (~1.2 GB each) are alive at once (peak RSS ~9 GB). Every
ratio is against the baseline of its own group, measured in the same rounds.
"""

from typing import Any, Callable, Sequence

import jax.numpy as jnp

from benchmarks import timing
from benchmarks import workloads as w

BARE = 'bare adamw'
OPTAX_CLIP = 'optax chain(clip_by_global_norm, adamw)'
OPTAX_APPLY_IF_FINITE = 'optax apply_if_finite(chain(clip, adamw))'
GUARD_PURE = 'og.guard (pure transformation)'
GUARD_FUSED = 'og.guard (fused, as in og.make_train_step)'
UNCHECKED_PURE = 'og.guard(check_updates=False) (pure transformation)'
UNCHECKED_FUSED = 'og.guard(check_updates=False) (fused)'
CHAINED_GUARD = 'optax.chain(og.guard) (fused)'
FLOOR = 'floor: adamw in a lax.cond on one read of the gradients'
CHECKED_FLOOR = ('checked floor: the floor with an exact in-place check of'
                 " adamw's output")
BARE_TRAIN = 'bare adamw (train step)'
OPTAX_APPLY_IF_FINITE_TRAIN = 'optax apply_if_finite (train step)'
GUARD_TRAIN = 'og.guard (og.make_train_step)'
UNGUARDED_TRAIN = 'adamw (og.make_train_step, no guard)'
SINGLES_PER_GROUP = 3
FAMILIES = ('headline', 'train-step', 'singles')


def groups(
    families: Sequence[str] = FAMILIES,
) -> list[tuple[str, list[tuple[str, w.StepKind, Callable[[], Any], str]]]]:
  """``(group name, [(candidate, step kind, optimizer factory, baseline)])``
  of the group ``families`` asked for.

  The headline group compares the recommended guard, as a pure
  transformation (``tx.update`` then ``optax.apply_updates``, the path
  ``nnx.Optimizer.update`` takes) and in the fused update-and-apply form
  that :func:`og.make_train_step` uses, with bare ``adamw``, with optax's
  own compositions and with the floor of any guard
  (:func:`workloads.guard_floor`) and the floor of an exact in-place check
  of the optimizer's output (:func:`workloads.checked_floor`); the same
  guard with
  ``check_updates=False`` (its decision alone, the inner optimizer's output
  unchecked) in both forms too. The train-step group runs whole steps of
  a loss whose gradient is the fixed gradient tree, through
  :func:`og.make_train_step`
  and through the same bare step written by hand. The single guards follow,
  three a group, each in the form :func:`og.make_train_step` would run it.
  """
  headline = [
      (BARE, w.UPDATE, w.adamw, None),
      (OPTAX_CLIP, w.UPDATE, w.optax_clip, BARE),
      (OPTAX_APPLY_IF_FINITE, w.UPDATE, w.optax_apply_if_finite, BARE),
      (GUARD_PURE, w.UPDATE, w.recommended_guard, BARE),
      (GUARD_FUSED, w.FUSED, w.recommended_guard, BARE),
      (UNCHECKED_PURE, w.UPDATE, w.unchecked_guard, BARE),
      (UNCHECKED_FUSED, w.FUSED, w.unchecked_guard, BARE),
      (CHAINED_GUARD, w.FUSED, w.chained_guard, BARE),
      (FLOOR, w.FUSED, w.guard_floor, BARE),
      (CHECKED_FLOOR, w.FUSED, w.checked_floor, BARE),
  ]
  train = [
      (BARE_TRAIN, w.TRAIN_BARE, w.adamw, None),
      (OPTAX_APPLY_IF_FINITE_TRAIN, w.TRAIN_BARE, w.optax_apply_if_finite,
       BARE_TRAIN),
      (GUARD_TRAIN, w.TRAIN_OG, w.recommended_guard, BARE_TRAIN),
      (UNGUARDED_TRAIN, w.TRAIN_OG, w.adamw, BARE_TRAIN),
  ]
  result = []
  if 'headline' in families:
    result.append(('headline', headline))
  if 'train-step' in families:
    result.append(('train step', train))
  singles = list(w.single_guards().items()) if 'singles' in families else []
  for start in range(0, len(singles), SINGLES_PER_GROUP):
    chunk = singles[start:start + SINGLES_PER_GROUP]
    result.append((
        f'single guards {start // SINGLES_PER_GROUP + 1}',
        [(BARE, w.UPDATE, w.adamw, None)]
        + [(name, w.FUSED, factory, BARE) for name, factory in chunk],
    ))
  return result


# Ratios between two non-baseline candidates of one group, same rounds.
COMPARISONS = {
    # The pure transformation against optax's own clip-and-optimizer chain.
    'guard_pure_over_optax_clip': (GUARD_PURE, OPTAX_CLIP),
    'unchecked_pure_over_optax_clip': (UNCHECKED_PURE, OPTAX_CLIP),
    'guard_pure_over_apply_if_finite': (GUARD_PURE, OPTAX_APPLY_IF_FINITE),
    'guard_fused_over_apply_if_finite': (GUARD_FUSED, OPTAX_APPLY_IF_FINITE),
    # What the recommended guard costs beyond the floor of any guard.
    'guard_fused_over_floor': (GUARD_FUSED, FLOOR),
    'unchecked_fused_over_floor': (UNCHECKED_FUSED, FLOOR),
    # What the default guard costs beyond the least any exact check costs.
    'guard_fused_over_checked_floor': (GUARD_FUSED, CHECKED_FLOOR),
    'checked_floor_over_floor': (CHECKED_FLOOR, FLOOR),
    # What checking the inner optimizer's output adds (check_updates).
    'guard_fused_over_unchecked_fused': (GUARD_FUSED, UNCHECKED_FUSED),
    # The guard composed in optax.chain (where og.make_train_step finds it
    # first) against the guard alone.
    'chained_guard_over_guard': (CHAINED_GUARD, GUARD_FUSED),
    'guard_train_over_apply_if_finite': (GUARD_TRAIN,
                                         OPTAX_APPLY_IF_FINITE_TRAIN),
    # The guard's own share of og.make_train_step, the step form aside.
    'guard_train_over_unguarded_train': (GUARD_TRAIN, UNGUARDED_TRAIN),
}


def run_size(count: int, *, families: Sequence[str], layers: int,
             rounds: int, warmup: int, min_sample_s: float,
             say: Callable[[str], None]):
  """``(rows, comparisons)`` of every candidate at ``count`` parameters."""
  grads = w.random_tree(1, 1e-3, count=count, layers=layers)
  loss = jnp.asarray(2.0, jnp.float32)
  rows, comparisons = [], {}
  for group, members in groups(families):
    say(f'{w.format_size(count)} {group}: building {len(members)} candidates')
    candidates = [
        timing.Candidate(
            name,
            w.stepper(kind, factory, grads, loss, count=count, layers=layers),
            baseline,
        )
        for name, kind, factory, baseline in members
    ]
    timings = timing.measure(
        candidates, rounds=rounds, warmup=warmup, min_sample_s=min_sample_s,
        progress=lambda line: say(f'{w.format_size(count)} {group}: {line}'),
    )
    for row in timings.rows():
      rows.append({'params': count, 'group': group, **row})
    comparisons.update(timings.comparisons(COMPARISONS))
    del candidates, timings  # Free this group's states before the next.
  return rows, comparisons


def run(counts: list[int], *, families: Sequence[str], layers: int,
        rounds: int, warmup: int, min_sample_s: float,
        say: Callable[[str], None]) -> dict[str, Any]:
  rows, comparisons = [], {}
  for count in counts:
    size_rows, comparisons[str(count)] = run_size(
        count, families=families, layers=layers, rounds=rounds,
        warmup=warmup, min_sample_s=min_sample_s, say=say,
    )
    rows += size_rows
  return {'rows': rows, 'comparisons': comparisons, 'families': list(families)}


def growth(update: dict[str, Any]) -> dict[str, Any]:
  """Item 5: each candidate's ratio at every size, and its change from the
  smallest size to the largest."""
  counts = sorted({row['params'] for row in update['rows']})
  table = []
  for group, members in groups(update['families']):
    for name, _, _, baseline in members:
      if baseline is None:
        continue
      ratios = []
      for count in counts:
        found = [r for r in update['rows'] if (r['params'], r['group'],
                                               r['name']) == (count, group, name)]
        ratios.append(found[0]['ratio'] if found else None)
      change = None
      if ratios[0] is not None and ratios[-1] is not None and len(counts) > 1:
        change = ratios[-1] - ratios[0]
      table.append({'name': name, 'baseline': baseline, 'ratios': ratios,
                    'change': change})
  bare_ms = []
  for count in counts:
    found = [r['median_ms'] for r in update['rows']
             if (r['params'], r['name']) == (count, BARE)]
    bare_ms.append(found[0] if found else None)
  return {'sizes': counts, 'rows': table, 'bare_ms': bare_ms}
