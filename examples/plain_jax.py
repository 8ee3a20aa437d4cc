"""A plain-JAX training loop with ``og.make_train_step`` and checkpoints.

No Flax: the parameters are a dict of arrays, the model a function. The
data is scikit-learn's bundled breast-cancer set (569 real biopsies, 30
features; no download). The loop shows the pieces a custom loop uses:

* ``og.guard`` (AutoClip, spike skipping) inside one jitted, donated step
  from ``og.make_train_step``, with its metrics read every step;
* ``og.Checkpointer``: resume from the newest valid checkpoint, the data
  iterator (grain's, from ``og.batches``) saved with the model, a save every
  25 steps marked healthy or not;
* two faults injected with ``optax_guard.testing``: a 10,000x gradient spike and a
  NaN gradient, both skipped with the optimizer state held bit for bit.

Stop it at any point (``--stop-after N`` does so on purpose) and run it
again with the same ``--checkpoint-dir``: it finishes with bitwise the same
parameters as an uninterrupted run.

    python examples/plain_jax.py --checkpoint-dir /tmp/plain_jax
"""

import argparse
import hashlib
import tempfile
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn import datasets
from sklearn import model_selection

import optax_guard as og
from optax_guard import testing


def load_data(seed: int):
  """Standardized train/test split of the breast-cancer data."""
  x, y = datasets.load_breast_cancer(return_X_y=True)
  x_train, x_test, y_train, y_test = model_selection.train_test_split(
      x, y, test_size=0.25, random_state=seed, stratify=y
  )
  mean, std = x_train.mean(0), x_train.std(0)
  scale = lambda a: ((a - mean) / std).astype(np.float32)
  return ({'x': scale(x_train), 'y': y_train.astype(np.float32)},
          {'x': scale(x_test), 'y': y_test.astype(np.float32)})


def init_params(key: jax.Array, sizes=(30, 32, 1)) -> dict:
  params = {}
  for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
    key, sub = jax.random.split(key)
    params[f'layer{i}'] = {
        'w': jax.random.normal(sub, (n_in, n_out)) / np.sqrt(n_in),
        'b': jnp.zeros(n_out),
    }
  return params


def predict(params: dict, x: jax.Array) -> jax.Array:
  """The logit of 'benign'."""
  x = jnp.tanh(x @ params['layer0']['w'] + params['layer0']['b'])
  return (x @ params['layer1']['w'] + params['layer1']['b'])[:, 0]


def loss_fn(params: dict, batch: dict) -> jax.Array:
  return optax.sigmoid_binary_cross_entropy(
      predict(params, batch['x']), batch['y']
  ).mean()


def params_sha256(params: dict) -> str:
  digest = hashlib.sha256()
  for leaf in jax.tree.leaves(params):
    digest.update(np.asarray(leaf).tobytes())
  return digest.hexdigest()


def main(argv: Optional[Sequence[str]] = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--steps', type=int, default=300)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--checkpoint-dir', help='default: a temporary one')
  parser.add_argument('--stop-after', type=int,
                      help='stop after this step, as a crash would')
  args = parser.parse_args(argv)

  train, test = load_data(args.seed)
  tx = og.guard(
      optax.adam(1e-2),
      clip=og.autoclip(quantile=0.9),
      spikes={'window': 64, 'sigma': 6.0},
      max_consecutive_skips=10,
  )
  # The faults ride along with the batches (keyed by the step that draws
  # them, as this loop counts steps) and act on the gradients inside the one
  # compiled step.
  faults = {
      args.steps // 3: testing.Fault('grad_spike', 1e4),
      2 * args.steps // 3: testing.Fault('nan_grad'),
  }
  train_step = og.make_train_step(testing.with_faults(loss_fn), tx)
  batches = testing.FaultInjector(
      og.batches(train, batch_size=32, seed=args.seed), faults, keys='step'
  )
  params = init_params(jax.random.key(args.seed))

  directory = args.checkpoint_dir or tempfile.mkdtemp(prefix='plain_jax_')
  with og.Checkpointer(directory, save_interval_steps=25) as checkpointer:
    state, _ = checkpointer.restore_or_init(
        og.TrainState(0, params, tx.init(params)), data_iter=batches
    )
    if state.step:
      print(f'resumed from step {state.step} in {directory}')
    skipped = []
    while state.step < args.steps:
      params, opt_state, metrics = train_step(
          state.params, state.opt_state, next(batches)
      )
      state = og.TrainState(state.step + 1, params, opt_state)
      if metrics['skipped']:
        skipped.append(state.step)
        print(f'step {state.step}: skipped, loss {float(metrics["loss"]):.4g},'
              f' grad norm {float(metrics["grad_norm"]):.4g}')
      checkpointer.save(state, data_iter=batches,
                        healthy=not metrics['consecutive_skips'])
      if state.step == args.stop_after:
        print(f'stopping after step {state.step}; run again to resume')
        break
    checkpointer.wait_until_finished()

  logits = predict(state.params, test['x'])
  accuracy = float(jnp.mean((logits > 0) == (test['y'] > 0.5)))
  print(f'step {state.step}: test accuracy {accuracy:.4f}')
  return {
      'step': state.step,
      'test_accuracy': accuracy,
      'skipped_steps': skipped,
      'fault_steps': sorted(faults),
      'params_sha256': params_sha256(state.params),
  }


if __name__ == '__main__':
  main()
