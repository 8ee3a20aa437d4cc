"""Does a guard widen the range of learning rates that train stably?

The evidence ZClip's paper gives (Kumar et al., 2025, arXiv:2504.02507: at a
large learning rate, no clipping and a fixed clip diverge while ZClip
trains), measured on the demo's character-level transformer
(:mod:`optax_guard.demo.model`, on ``pydoc_data``'s text): every method
below trains the same model from the same initial parameters on the same
batches, at a sweep of peak learning rates and several seeds, and each run
reports its final held-out loss, its loss spikes and whether it diverged.

* **methods**: adamw alone; ``optax.clip_by_global_norm(1.0)`` before it;
  ``og.zclip()`` before it; ``og.autoclip()`` before it; ``og.guard`` around
  it with its defaults (NaN/Inf skipping only); and the guard the README
  recommends, with ZClip and the spike rule.
* **schedule**: the peak learning rate is reached by a linear warm-up over
  the first 10% of the steps and decays by cosine to a tenth of it, as in
  the demo; weight decay 1e-4. The peak is an injected hyperparameter, so
  one compiled step serves every learning rate and seed of a method.
* **a loss spike**: a step whose training loss is above 1.5 times the median
  of the 20 steps before it (after the first 20 steps).
* **diverged**: the run ended with a non-finite held-out loss, or with one
  above 90% of the untrained model's (it unlearned what it had learned, or
  never learned).

    python -m benchmarks.stability     # 90 runs, 18 minutes on 2 idle cores

writes ``benchmarks/stability.json`` and ``docs/stability.png``; the next
``python -m benchmarks`` (or ``--render``) puts its table in BENCHMARKS.md.
"""

import argparse
import json
import pathlib
import statistics
import sys
import time
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import optax_guard as og
from optax_guard.demo import data as demo_data
from optax_guard.demo import model as demo_model

LEARNING_RATES = (1e-2, 1e-1, 3e-1, 6e-1, 1.0)
SEEDS = (0, 1, 2)
SPIKE_RATIO = 1.5
SPIKE_WINDOW = 20
DIVERGED_FRACTION = 0.9


def _inner(steps: int) -> optax.GradientTransformation:
  """adamw at an injected peak learning rate, times the warm-up/cosine
  shape (which peaks at 1)."""
  shape = optax.warmup_cosine_decay_schedule(
      0.0, 1.0, max(2, steps // 10), steps, end_value=0.1)
  return optax.chain(
      optax.inject_hyperparams(optax.adamw)(learning_rate=1.0,
                                            weight_decay=1e-4),
      optax.scale_by_schedule(shape))


METHODS: dict[str, Callable[[int], optax.GradientTransformation]] = {
    'adamw (no clipping)': _inner,
    'optax clip_by_global_norm(1.0)': lambda steps: optax.chain(
        optax.clip_by_global_norm(1.0), _inner(steps)),
    'og.zclip()': lambda steps: optax.chain(og.zclip(), _inner(steps)),
    'og.autoclip()': lambda steps: optax.chain(og.autoclip(), _inner(steps)),
    'og.guard (defaults)': lambda steps: og.guard(_inner(steps)),
    'og.guard(clip=og.zclip(), spikes={}) (recommended)':
        lambda steps: og.guard(_inner(steps), clip=og.zclip(), spikes={}),
}
# Run with --more-methods: the recommended guard with ZClip's fixed ceiling
# at the fixed clip's 1.0 (ZClip alone lets through larger norms than that
# early on, where the fixed clip kept a peak of 0.6 stable).
MORE_METHODS: dict[str, Callable[[int], optax.GradientTransformation]] = {
    'og.guard(clip=og.zclip(max_norm=1.0), spikes={})':
        lambda steps: og.guard(_inner(steps), clip=og.zclip(max_norm=1.0),
                               spikes={}),
}
ALL_METHODS = {**METHODS, **MORE_METHODS}


def _spikes(losses: Sequence[float]) -> int:
  count = 0
  for t in range(SPIKE_WINDOW, len(losses)):
    recent = statistics.median(losses[t - SPIKE_WINDOW:t])
    if not np.isfinite(losses[t]) or losses[t] > SPIKE_RATIO * recent:
      count += 1
  return count


class _Problem:
  """The model, its data and one compiled train step per method."""

  def __init__(self, *, steps: int, batch_size: int, seq_len: int,
               width: int, depth: int, heldout_batches: int):
    self.steps, self.batch_size, self.seq_len = steps, batch_size, seq_len
    self.corpus = demo_data.load_corpus()
    self.config = demo_model.ModelConfig(
        vocab_size=self.corpus.vocab_size, seq_len=seq_len, width=width,
        depth=depth)
    heldout = demo_data.windows(self.corpus.heldout, seq_len)
    count = min(len(heldout['tokens']), heldout_batches * batch_size)
    self.heldout = {k: jnp.asarray(v[:count]) for k, v in heldout.items()}
    graphdef, _ = nnx.split(self._model(0))
    self.loss_fn = demo_model.make_loss_fn(graphdef)
    self.evaluate = jax.jit(self.loss_fn)
    self.compiled: dict[str, tuple[Any, Any]] = {}

  def _model(self, seed: int) -> demo_model.TinyTransformer:
    return nnx.jit(lambda: demo_model.TinyTransformer(
        self.config, rngs=nnx.Rngs(seed)))()

  def _method(self, name: str):
    if name not in self.compiled:
      tx = ALL_METHODS[name](self.steps)
      self.compiled[name] = (tx, og.make_train_step(self.loss_fn, tx))
    return self.compiled[name]

  def run(self, name: str, learning_rate: float, seed: int) -> dict[str, Any]:
    tx, step = self._method(name)
    params = nnx.split(self._model(seed))[1]
    initial = float(self.evaluate(params, self.heldout))
    opt_state = og.scale_hyperparam(tx.init(params), learning_rate)
    batches = demo_data.train_batches(
        self.corpus, batch_size=self.batch_size, seq_len=self.seq_len,
        seed=seed)
    losses, skips = [], 0
    for _ in range(self.steps):
      params, opt_state, metrics = step(params, opt_state, next(batches))
      losses.append(float(metrics['loss']))
      skips += bool(metrics.get('skipped', False))
    final = float(self.evaluate(params, self.heldout))
    return {
        'method': name, 'learning_rate': learning_rate, 'seed': seed,
        'initial_heldout_loss': initial, 'final_heldout_loss': final,
        'spikes': _spikes(losses), 'skips': skips,
        'diverged': not np.isfinite(final)
                    or final > DIVERGED_FRACTION * initial,
    }


def _largest_stable(cells: list[dict[str, Any]], method: str) -> Any:
  """The largest learning rate at which no seed of ``method`` diverged, in
  an unbroken run from the smallest."""
  stable = None
  for lr in sorted({c['learning_rate'] for c in cells}):
    runs = [c for c in cells if c['method'] == method
            and c['learning_rate'] == lr]
    if any(c['diverged_runs'] for c in runs):
      break
    stable = lr
  return stable


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
  """Per (method, learning rate): mean final held-out loss over the seeds
  that did not diverge, spikes summed, diverged runs counted; per method, the
  largest learning rate that never diverged."""
  cells = []
  ran = {r['method'] for r in runs}
  for name in [m for m in ALL_METHODS if m in ran]:
    for lr in sorted({r['learning_rate'] for r in runs}):
      group = [r for r in runs if r['method'] == name
               and r['learning_rate'] == lr]
      if not group:
        continue
      kept = [r['final_heldout_loss'] for r in group if not r['diverged']]
      cells.append({
          'method': name, 'learning_rate': lr, 'seeds': len(group),
          'mean_final_heldout_loss': float(np.mean(kept)) if kept else None,
          'spikes': sum(r['spikes'] for r in group),
          'skips': sum(r['skips'] for r in group),
          'diverged_runs': sum(r['diverged'] for r in group),
      })
  largest = {name: _largest_stable(cells, name)
             for name in ALL_METHODS if name in ran}
  return {'cells': cells, 'largest_stable_learning_rate': largest}


def run(*, learning_rates: Sequence[float] = LEARNING_RATES,
        seeds: Sequence[int] = SEEDS, steps: int = 250, batch_size: int = 32,
        seq_len: int = 64, width: int = 96, depth: int = 2,
        heldout_batches: int = 8, methods: Sequence[str] = tuple(METHODS),
        done: Sequence[dict[str, Any]] = (),
        say: Callable[[str], None] = print) -> dict[str, Any]:
  """Every method at every learning rate and seed; the runs and summary.

  ``done``: runs of an earlier call with the same settings, kept as they are
  (so that an interrupted study, or one given a new method, runs only what
  it lacks).
  """
  problem = _Problem(steps=steps, batch_size=batch_size, seq_len=seq_len,
                     width=width, depth=depth,
                     heldout_batches=heldout_batches)
  kept = {(r['method'], r['learning_rate'], r['seed']): r for r in done}
  runs = []
  for name in methods:
    for lr in learning_rates:
      for seed in seeds:
        if (name, lr, seed) in kept:
          runs.append(kept[(name, lr, seed)])
          continue
        result = problem.run(name, lr, seed)
        say(f'{name} lr={lr:g} seed={seed}: held-out'
            f' {result["final_heldout_loss"]:.4f}, spikes {result["spikes"]},'
            f' skips {result["skips"]}'
            + (', diverged' if result['diverged'] else ''))
        runs.append(result)
  return {'settings': {'steps': steps, 'batch_size': batch_size,
                       'seq_len': seq_len, 'width': width, 'depth': depth,
                       'learning_rates': list(learning_rates),
                       'seeds': list(seeds)},
          'runs': runs, **summarise(runs)}


REPO = pathlib.Path(__file__).resolve().parent.parent
RESULTS = REPO / 'benchmarks' / 'stability.json'
PLOT = REPO / 'docs' / 'stability.png'


def plot(results: dict[str, Any], path: pathlib.Path) -> None:
  """Final held-out loss against the peak learning rate, one line a method;
  a cross where a seed diverged."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=120)
  initial = max(r['initial_heldout_loss'] for r in results['runs'])
  for index, name in enumerate(ALL_METHODS):
    cells = [c for c in results['cells'] if c['method'] == name]
    if not cells:
      continue
    color = f'C{index}'
    kept = [c for c in cells if c['mean_final_heldout_loss'] is not None]
    ax.plot([c['learning_rate'] for c in kept],
            [c['mean_final_heldout_loss'] for c in kept], 'o-', color=color,
            label=f"{name} (stable up to "
            f"{results['largest_stable_learning_rate'][name]})")
    bad = [c for c in cells if c['diverged_runs']]
    ax.plot([c['learning_rate'] for c in bad],
            [initial * (1.02 + 0.02 * index)] * len(bad), 'x', color=color,
            markersize=9)
  ax.axhline(DIVERGED_FRACTION * initial, color='grey', lw=0.8, ls='--')
  ax.set_xscale('log')
  ax.set_xlabel('peak learning rate')
  ax.set_ylabel('final held-out loss (mean of stable seeds)')
  ax.set_title('Stability: x = a seed diverged (above the dashed line)')
  ax.legend(fontsize=7, loc='upper left')
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path)
  plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(
      prog='python -m benchmarks.stability',
      description='Trains the demo LM with each clipping method at a sweep'
      ' of learning rates and seeds; writes the runs, the summary and a'
      ' plot.')
  parser.add_argument('--steps', type=int, default=250)
  parser.add_argument('--learning-rates', default=','.join(
      f'{lr:g}' for lr in LEARNING_RATES))
  parser.add_argument('--seeds', default=','.join(map(str, SEEDS)))
  parser.add_argument('--out', type=pathlib.Path, default=RESULTS)
  parser.add_argument('--plot', type=pathlib.Path, default=PLOT)
  parser.add_argument(
      '--more-methods', action='store_true',
      help='also ' + ', '.join(MORE_METHODS) + ' (with --keep: add it to a'
      ' finished study)')
  parser.add_argument(
      '--keep', action='store_true',
      help='keep the runs already in --out (same settings) and run only the'
      ' missing ones')
  args = parser.parse_args(argv)
  from benchmarks import machine  # pylint: disable=g-import-not-at-top

  done, seconds = [], 0.0
  if args.keep and args.out.exists():
    previous = json.loads(args.out.read_text())
    done, seconds = previous['runs'], previous['seconds']
  start = time.perf_counter()
  say = lambda line: print(f'[{time.perf_counter() - start:7.1f}s] {line}',
                           flush=True)
  results = run(
      learning_rates=[float(x) for x in args.learning_rates.split(',')],
      seeds=[int(x) for x in args.seeds.split(',')], steps=args.steps,
      methods=tuple(ALL_METHODS if args.more_methods else METHODS),
      done=done, say=say)
  results['machine'] = machine.describe()
  results['command'] = 'python -m benchmarks.stability ' + ' '.join(
      argv if argv is not None else sys.argv[1:])
  results['seconds'] = seconds + time.perf_counter() - start
  args.out.write_text(json.dumps(results, indent=1) + '\n')
  plot(results, args.plot)
  say(f'wrote {args.out} and {args.plot}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
