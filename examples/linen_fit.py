"""A Linen CNN with BatchNorm in a Flax TrainState, trained by og.fit.

The Flax way of the ImageNet example: a ``TrainState`` subclass with a
``batch_stats`` field, a step that returns the new state. Two changes make it
guarded: ``og.apply_gradients(state, grads=..., value=loss,
batch_stats=...)`` instead of ``state.apply_gradients`` (it hands the loss to
the guard and holds the statistics on a skipped step), and
``og.flax_fit_step`` to hand the state to ``og.fit``, which checkpoints it
(params, Adam moments, the guard's statistics, ``batch_stats``, ``step``, the
data position), resumes it after a stop and rolls it back. scikit-learn's
digits, with a batch of NaN pixels at step 40.

    python examples/linen_fit.py --checkpoint-dir /tmp/linen_fit
    python examples/linen_fit.py --checkpoint-dir /tmp/linen_fit --stop-after 120
"""

import argparse
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from flax.training import train_state
from sklearn import datasets
from sklearn import model_selection

import optax_guard as og
from optax_guard import testing

NAN_STEP = 40


class DigitsCNN(nn.Module):

  @nn.compact
  def __call__(self, x, train: bool = True):
    x = nn.Conv(16, (3, 3))(x[..., None])
    x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))
    x = nn.avg_pool(nn.relu(nn.Conv(32, (3, 3))(x)), (2, 2), (2, 2))
    return nn.Dense(10)(x.reshape(x.shape[0], -1))


class TrainState(train_state.TrainState):
  batch_stats: Any


def train_step(state: TrainState, batch):
  def loss_fn(params):
    logits, updates = state.apply_fn(
        {'params': params, 'batch_stats': state.batch_stats}, batch['x'],
        mutable=['batch_stats'])
    loss = optax.softmax_cross_entropy_with_integer_labels(
        logits, batch['y']).mean()
    return loss, updates['batch_stats']

  (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params)
  state = og.apply_gradients(state, grads=grads, value=loss,
                             batch_stats=batch_stats)
  return state, {'loss': loss, **og.metrics(state.opt_state)}


def main(argv: Optional[Sequence[str]] = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--steps', type=int, default=300)
  parser.add_argument('--checkpoint-dir', required=True)
  parser.add_argument('--stop-after', type=int, help='stop at this step')
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args(argv)

  digits = datasets.load_digits()
  split = model_selection.train_test_split(
      (digits.images / 16.0).astype(np.float32),
      digits.target.astype(np.int32), test_size=0.25,
      random_state=args.seed, stratify=digits.target)
  train, test = ({'x': split[0], 'y': split[2]},
                 {'x': split[1], 'y': split[3]})
  module = DigitsCNN()
  variables = module.init(jax.random.key(args.seed), train['x'][:2],
                          train=False)
  flax_state = TrainState.create(
      apply_fn=module.apply, params=variables['params'],
      tx=og.guard(optax.adamw(3e-3), clip=og.zclip(), spikes={'window': 64}),
      batch_stats=variables['batch_stats'])
  step, state = og.flax_fit_step(train_step, flax_state)
  data = testing.FaultInjector(
      og.batches(train, 64, seed=args.seed),
      {NAN_STEP: testing.Fault('nan_batch', 1.0)}, keys='step')

  class Stop(Exception):
    pass

  def stop_at(state, metrics, events):
    del metrics, events
    if state.step == args.stop_after:
      raise Stop

  with og.Checkpointer(args.checkpoint_dir, save_interval_steps=50) as ckpt:
    try:
      result = og.fit(step, state, data, num_steps=args.steps,
                      checkpointer=ckpt, recovery=og.RecoveryPolicy(),
                      progress=False, callback=stop_at)
    except Stop:
      print(f'stopped after step {args.stop_after}; run again to resume')
      return {'step': args.stop_after}

  trained = og.flax_state(flax_state, result.state)
  logits = module.apply({'params': trained.params,
                         'batch_stats': trained.batch_stats}, test['x'],
                        train=False)
  accuracy = float(jnp.mean(jnp.argmax(logits, -1) == test['y']))
  skipped = [e['step'] for e in result.events.recent
             if e['kind'] == 'skipped_step']
  finite = all(bool(np.isfinite(leaf).all())
               for leaf in jax.tree.leaves(trained.batch_stats))
  print(f'step {int(trained.step)}: test accuracy {accuracy:.4f}; skipped'
        f' steps {skipped}; BatchNorm statistics finite: {finite}')
  return {'step': int(trained.step), 'test_accuracy': accuracy,
          'skipped_steps': skipped, 'statistics_finite': finite,
          'params': jax.tree.map(np.asarray, (trained.params,
                                              trained.batch_stats))}


if __name__ == '__main__':
  main()
