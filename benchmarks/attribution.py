"""Does the re-run tell a flaky machine from a bad batch? A fault campaign.

The demo's character-level transformer (:mod:`optax_guard.demo.model`, on
``pydoc_data``'s text, the demo's width, context and batch) trains
under ``og.fit`` with ``RecoveryPolicy(rerun=True)`` while faults of known
kind hit seeded steps:

* **machine faults** (:class:`optax_guard.testing.FlakyDevice`, a host
  callback in the backward pass): ``transient nan``, a NaN gradient in one
  call; ``transient spike``, a gradient times 1e4 in one call; and
  ``nondeterministic``, a NaN gradient then an Inf one in the re-run;
* **data faults** (:class:`optax_guard.testing.FaultInjector`): ``nan
  batch``, a batch whose loss weights are NaN; ``extreme batch``, its loss
  weights times 1e3 to 1e6 (``poisoned_batch``). A data fault is a corrupt
  record *among* the clean ones: the faulty run's stream is the reference's
  with the corrupt batches inserted (a copy of the next clean batch,
  corrupted), and it runs that many more steps; so "fault-free" is the same
  clean data without the corrupt records, and the held-out gap measures
  what recovery costs, not the clean data a corrupted batch replaced.

A machine fault belongs to the *call*: a wrapper around the train step arms
the flaky device when a new batch comes (the re-run passes the same batch
object, so it is the next call of the same batch). The same run without any
fault (and without the corrupt records) is the reference. Reported: the confusion table (true kind x the
event ``og.fit`` recorded at that step), the clean batches lost to a
transient fault (a transient step that did not end with the re-run
applied), the train-step calls of the fault-free run against its steps, the
updates each run applied, and the final held-out loss against the
reference's.

    python -m benchmarks.attribution      # 2.2 minutes on 2 idle cores

writes ``benchmarks/attribution.json``; ``python -m benchmarks --render
benchmarks/results.json`` puts its table in BENCHMARKS.md.
"""

import argparse
import collections
import json
import pathlib
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import optax_guard as og
from optax_guard import testing
from optax_guard.demo import data as demo_data
from optax_guard.demo import model as demo_model

REPO = pathlib.Path(__file__).resolve().parent.parent
RESULTS = REPO / 'benchmarks' / 'attribution.json'

# True kind -> how many of it, by default (210 faults in all).
KINDS = {
    'transient nan': 60,
    'transient spike': 50,
    'nondeterministic': 30,
    'nan batch': 40,
    'extreme batch': 30,
}
# The verdict each true kind should get (the event og.fit records).
EXPECTED = {
    'transient nan': 'transient_fault',
    'transient spike': 'transient_fault',
    'nondeterministic': 'nondeterministic_fault',
    'nan batch': 'bad_batch',
    'extreme batch': 'bad_batch',
}
VERDICTS = ('transient_fault', 'bad_batch', 'nondeterministic_fault')
_DATA_FAULTS = {'nan batch': 'nan_batch', 'extreme batch': 'poisoned_batch'}


class _WithCorruptCopies:
  """The clean batches, with a copy of the next one inserted at ``steps``.

  Step ``s`` (from 1) draws the ``s``-th batch of this stream; at an
  inserted step it is a copy of the clean batch the next step draws, which
  :class:`~optax_guard.testing.FaultInjector` then corrupts.
  """

  def __init__(self, data, steps):
    self._data = data
    self._inserted = frozenset(steps)
    self._step = 0
    self._next_clean = None
    self._before_next_clean = None  # the wrapped state before it was read

  def __iter__(self):
    return self

  def __next__(self):
    self._step += 1
    if self._next_clean is None:
      self._before_next_clean = self._data.get_state()
      self._next_clean = next(self._data)
    batch = self._next_clean
    if self._step not in self._inserted:
      self._next_clean = None
    return batch

  def get_state(self):
    pending = self._next_clean is not None
    return {'data': (self._before_next_clean if pending
                     else self._data.get_state()), 'step': self._step}

  def set_state(self, state):
    self._data.set_state(state['data'])
    self._step = int(state['step'])
    self._next_clean = None  # read again from the restored position


def plan(steps: int, counts: dict[str, int], *, first_step: int,
         seed: int) -> dict[int, str]:
  """``{step: true kind}``: faults on distinct steps from ``first_step``,
  never two in a row (a fault's step and the next are apart, so that every
  fault is judged against clean history)."""
  total = sum(counts.values())
  slots = list(range(first_step, steps + 1, 2))
  if total > len(slots):
    raise ValueError(f'{total} faults do not fit in steps {first_step}..'
                     f'{steps} one step apart.')
  rng = np.random.default_rng(seed)
  chosen = sorted(rng.choice(slots, size=total, replace=False).tolist())
  kinds = [kind for kind, count in counts.items() for _ in range(count)]
  rng.shuffle(kinds)
  return dict(zip(chosen, kinds))


class _ArmingStep:
  """The train step; arms the flaky device for the planned machine faults.

  ``og.fit`` calls the step once per drawn batch, and a re-run again with
  the same batch object: a new object is the next step.
  """

  def __init__(self, step, flaky: testing.FlakyDevice, faults: dict[int, str]):
    self._step = step
    self._flaky = flaky
    self._faults = faults
    self._last = None
    self.step = 0
    self.calls = 0

  def __call__(self, *args):
    batch = args[-1]
    if batch is not self._last:
      self._last = batch
      self.step += 1
      kind = self._faults.get(self.step)
      call = self._flaky.calls + 1
      if kind == 'transient nan':
        self._flaky.arm(testing.Fault('nan_grad'), call)
      elif kind == 'transient spike':
        self._flaky.arm(testing.Fault('grad_spike', 1e4), call)
      elif kind == 'nondeterministic':
        self._flaky.arm(testing.Fault('nan_grad'), call)
        self._flaky.arm(testing.Fault('inf_grad'), call + 1)
    self.calls += 1
    return self._step(*args)


class Campaign:
  """The model, data and optimizer; :meth:`run` trains once."""

  def __init__(self, *, steps: int, batch_size: int, seq_len: int,
               width: int, seed: int):
    self.steps = steps
    self.seed = seed
    self.corpus = corpus = demo_data.load_corpus()
    self.windows = demo_data.windows(corpus.train, seq_len)
    self.batch_size = batch_size
    config = demo_model.ModelConfig(vocab_size=corpus.vocab_size,
                                    seq_len=seq_len, width=width, depth=2,
                                    heads=4)
    self.new_model = nnx.jit(lambda: demo_model.TinyTransformer(
        config, rngs=nnx.Rngs(seed)))
    self.graphdef = nnx.graphdef(nnx.eval_shape(self.new_model))
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, 3e-3, max(2, steps // 10), steps, end_value=3e-4)
    self.tx = og.guard(
        optax.adamw(schedule, weight_decay=0.01),
        clip=og.zclip(max_norm=1.0, warmup_steps=25),
        spikes={'window': 32}, max_consecutive_skips=6)
    heldout = demo_data.windows(corpus.heldout, seq_len)['tokens'][:256]
    graphdef = self.graphdef
    self.heldout_loss = jax.jit(lambda params: jnp.mean(
        demo_model.token_losses(nnx.merge(graphdef, params),
                                jnp.asarray(heldout))))

  def run(self, faults: dict[int, str], directory: pathlib.Path,
          scales: np.random.Generator) -> dict[str, Any]:
    """Trains with ``faults`` (``{step: true kind}``); what happened."""
    flaky = testing.FlakyDevice({})
    loss = testing.with_faults(demo_model.make_loss_fn(self.graphdef))
    step = _ArmingStep(og.make_train_step(flaky.wrap(loss), self.tx), flaky,
                       faults)
    data_plan = {s: testing.Fault(_DATA_FAULTS[kind],
                                  float(10 ** scales.uniform(3, 6)))
                 for s, kind in faults.items() if kind in _DATA_FAULTS}
    data = testing.FaultInjector(
        _WithCorruptCopies(
            og.batches(self.windows, self.batch_size, seed=self.seed),
            data_plan), data_plan, keys='step')
    steps = self.steps + len(data_plan)
    params = nnx.state(self.new_model(), nnx.Param)
    events = []
    with og.Checkpointer(directory, save_interval_steps=steps) as ckpt:
      result = og.fit(
          step, og.TrainState(0, params, self.tx.init(params)), data,
          num_steps=steps, checkpointer=ckpt,
          recovery=og.RecoveryPolicy(rerun=True), progress=False,
          callback=lambda s, m, e: events.extend(e))
    return {
        'events': [e.to_json() for e in events if e.kind != 'saved'],
        'calls': step.calls,
        'steps': result.state.step,
        'updates': result.state.step - int(result.state.opt_state.total_skips),
        'rollbacks': len(result.recovery.rollbacks),
        'heldout_loss': float(self.heldout_loss(result.state.params)),
    }


def confusion(faults: dict[int, str],
              events: Sequence[dict[str, Any]]) -> dict[str, Any]:
  """The table true kind x verdict, and what went wrong where."""
  verdicts = {e['step']: e['kind'] for e in events if e['kind'] in VERDICTS}
  table = {kind: collections.Counter() for kind in KINDS}
  for step, kind in faults.items():
    table[kind][verdicts.get(step, 'not skipped')] += 1
  lost = [step for step, kind in faults.items()
          if kind.startswith('transient')
          and verdicts.get(step) != 'transient_fault']
  # A clean step the guard skipped of itself (a natural spike): not a
  # fault of the plan, so no verdict is wrong there; reported with it.
  natural = {str(step): verdicts[step] for step in sorted(verdicts)
             if step not in faults}
  wrong = sorted(step for step, kind in faults.items()
                 if verdicts.get(step) != EXPECTED[kind])
  return {'table': {k: dict(v) for k, v in table.items()},
          'clean_batches_lost_to_transient_faults': len(lost),
          'verdicts_on_clean_steps': natural,
          'misclassified_steps': wrong}


def campaign(*, steps: int, batch_size: int, seq_len: int, width: int,
             seed: int, counts: dict[str, int], first_step: int,
             say: Callable[[str], None] = print) -> dict[str, Any]:
  problem = Campaign(steps=steps, batch_size=batch_size, seq_len=seq_len,
                     width=width, seed=seed)
  faults = plan(steps, counts, first_step=first_step, seed=seed)
  with tempfile.TemporaryDirectory() as tmp:
    start = time.perf_counter()
    reference = problem.run({}, pathlib.Path(tmp) / 'reference',
                            np.random.default_rng(seed))
    say(f'fault-free run: {reference["calls"]} step calls for'
        f' {reference["steps"]} steps, held-out loss'
        f' {reference["heldout_loss"]:.4f}')
    faulty = problem.run(faults, pathlib.Path(tmp) / 'faulty',
                         np.random.default_rng(seed))
    say(f'faulty run: {faulty["calls"]} step calls for {faulty["steps"]}'
        f' steps ({faulty["updates"]} updates), held-out loss'
        f' {faulty["heldout_loss"]:.4f}')
    seconds = time.perf_counter() - start
  found = confusion(faults, faulty['events'])
  gap = faulty['heldout_loss'] / reference['heldout_loss'] - 1
  return {
      'settings': {'steps': steps, 'batch_size': batch_size,
                   'seq_len': seq_len, 'width': width, 'depth': 2,
                   'seed': seed, 'first_fault_step': first_step,
                   'faults': dict(counts)},
      'faults': {str(s): k for s, k in faults.items()},
      **found,
      'all_correct': not found['misclassified_steps'],
      'fault_free_step_calls': reference['calls'],
      'fault_free_steps': reference['steps'],
      'fault_free_updates': reference['updates'],
      'faulty_step_calls': faulty['calls'],
      'faulty_steps': faulty['steps'],
      'faulty_updates': faulty['updates'],
      'rollbacks': faulty['rollbacks'],
      'heldout_loss': {'fault_free': reference['heldout_loss'],
                       'faulty': faulty['heldout_loss'],
                       'relative_gap': gap},
      'within_half_a_percent': abs(gap) <= 0.005,
      'run_seconds': seconds,
  }


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog='python -m benchmarks.attribution',
      description='Trains the demo LM under og.fit(rerun=True) with 210'
      ' faults of known kind and a fault-free reference; writes the'
      ' confusion table and the held-out losses.')
  parser.add_argument('--steps', type=int, default=1200)
  parser.add_argument('--batch-size', type=int, default=32)
  parser.add_argument('--seq-len', type=int, default=64)
  parser.add_argument('--width', type=int, default=96)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--first-step', type=int, default=60,
                      help='no fault before this step (the spike window'
                      ' and the clip warm up)')
  parser.add_argument('--scale', type=float, default=1.0,
                      help='multiply every fault count by this')
  parser.add_argument('--out', type=pathlib.Path, default=RESULTS)
  args = parser.parse_args(argv)
  from benchmarks import machine  # pylint: disable=g-import-not-at-top

  start = time.perf_counter()
  say = lambda line: print(f'[{time.perf_counter() - start:7.1f}s] {line}',
                           flush=True)
  counts = {kind: max(1, round(n * args.scale)) for kind, n in KINDS.items()}
  results = campaign(steps=args.steps, batch_size=args.batch_size,
                     seq_len=args.seq_len, width=args.width, seed=args.seed,
                     counts=counts, first_step=args.first_step, say=say)
  results['machine'] = machine.describe()
  results['command'] = 'python -m benchmarks.attribution ' + ' '.join(
      argv if argv is not None else sys.argv[1:])
  results['seconds'] = time.perf_counter() - start
  args.out.write_text(json.dumps(results, indent=1) + '\n')
  say(render(results))
  say(f'wrote {args.out}')
  return 0


def render(results: dict[str, Any]) -> str:
  """The confusion table and the summary, as markdown."""
  from benchmarks import report  # pylint: disable=g-import-not-at-top

  return report.attribution_table(results)


if __name__ == '__main__':
  sys.exit(main())
