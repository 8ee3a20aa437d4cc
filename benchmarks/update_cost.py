"""Item 1 (and 5): what a guard adds to the optimizer update, per size.

Candidates are measured in small interleaved groups, each with its own
baseline, so that at 100M parameters no more than four copies of params and
optimizer state are alive at once. Every ratio is against the baseline of
its own group, measured in the same rounds.
"""

from typing import Any, Callable

import jax.numpy as jnp

from benchmarks import timing
from benchmarks import workloads as w

BARE = 'bare adamw'
OPTAX_CLIP = 'optax chain(clip_by_global_norm, adamw)'
OPTAX_APPLY_IF_FINITE = 'optax apply_if_finite(chain(clip, adamw))'
GUARD_PURE = 'og.guard (pure transformation)'
BARE_TRAIN = 'bare adamw (train step)'
OPTAX_APPLY_IF_FINITE_TRAIN = 'optax apply_if_finite (train step)'
GUARD_TRAIN = 'og.guard (og.make_train_step)'
SINGLES_PER_GROUP = 3


def groups() -> list[tuple[str, list[tuple[str, w.StepKind, Callable[[], Any], str]]]]:
  """``(group name, [(candidate, step kind, optimizer factory, baseline)])``.

  The headline group compares the recommended guard, as a pure
  transformation, with bare ``adamw`` and with optax's own compositions; the
  train-step group compares it through :func:`og.make_train_step` with the
  same bare step written by hand; the single guards follow, three a group.
  """
  headline = [
      (BARE, w.UPDATE, w.adamw, None),
      (OPTAX_CLIP, w.UPDATE, w.optax_clip, BARE),
      (OPTAX_APPLY_IF_FINITE, w.UPDATE, w.optax_apply_if_finite, BARE),
      (GUARD_PURE, w.UPDATE, w.recommended_guard, BARE),
  ]
  train = [
      (BARE_TRAIN, w.TRAIN_BARE, w.adamw, None),
      (OPTAX_APPLY_IF_FINITE_TRAIN, w.TRAIN_BARE, w.optax_apply_if_finite,
       BARE_TRAIN),
      (GUARD_TRAIN, w.TRAIN_OG, w.recommended_guard, BARE_TRAIN),
  ]
  result = [('headline', headline), ('train step', train)]
  singles = list(w.single_guards().items())
  for start in range(0, len(singles), SINGLES_PER_GROUP):
    chunk = singles[start:start + SINGLES_PER_GROUP]
    result.append((
        f'single guards {start // SINGLES_PER_GROUP + 1}',
        [(BARE, w.UPDATE, w.adamw, None)]
        + [(name, w.UPDATE, factory, BARE) for name, factory in chunk],
    ))
  return result


def run_size(count: int, *, layers: int, rounds: int, warmup: int,
             min_sample_s: float, say: Callable[[str], None]):
  """Rows of every candidate at ``count`` parameters."""
  grads = w.random_tree(1, 1e-3, count=count, layers=layers)
  loss = jnp.asarray(2.0, jnp.float32)
  rows = []
  for group, members in groups():
    say(f'{w.format_size(count)} {group}: building {len(members)} candidates')
    candidates = [
        timing.Candidate(
            name,
            w.stepper(kind, factory(), grads, loss, count=count, layers=layers),
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
    del candidates, timings  # Free this group's states before the next.
  return rows


def run(counts: list[int], *, layers: int, rounds: int, warmup: int,
        min_sample_s: float, say: Callable[[str], None]) -> dict[str, Any]:
  rows = []
  for count in counts:
    rows += run_size(count, layers=layers, rounds=rounds, warmup=warmup,
                     min_sample_s=min_sample_s, say=say)
  return {'rows': rows}
