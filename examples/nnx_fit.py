"""An NNX CNN with BatchNorm and Dropout, trained by og.fit, killed, resumed.

scikit-learn's handwritten digits (1,797 real 8x8 scans, bundled: no
download) train a small convolutional network whose BatchNorm statistics and
Dropout RNG stream are model state besides its parameters. ``og.nnx_fit_step``
turns the model and its ``nnx.Optimizer`` into the arrays ``og.fit`` drives,
checkpoints with ``og.Checkpointer`` and rolls back with
``og.RecoveryPolicy``: every part of the state (params, Adam moments, the
guard's statistics, BatchNorm statistics, the RNG stream, the data position)
is saved, restored after a stop and rolled back together. A batch of NaN
pixels at step 40 is skipped, its statistics held.

    python examples/nnx_fit.py --checkpoint-dir /tmp/nnx_fit   # 300 steps
    python examples/nnx_fit.py --checkpoint-dir /tmp/nnx_fit --stop-after 120
    python examples/nnx_fit.py --checkpoint-dir /tmp/nnx_fit   # resumes at 120

A stopped-and-resumed run ends with the same ``params_sha256`` as an
uninterrupted one (on the same machine and versions).
"""

import argparse
import hashlib
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from sklearn import datasets
from sklearn import model_selection

import optax_guard as og
from optax_guard import testing

NAN_STEP = 40


class DigitsCNN(nnx.Module):
  """8x8x1 -> conv 16 -> BatchNorm -> relu -> conv 32 -> pool -> dropout ->
  10 logits."""

  def __init__(self, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(1, 16, kernel_size=(3, 3), rngs=rngs)
    self.norm = nnx.BatchNorm(16, rngs=rngs)
    self.conv2 = nnx.Conv(16, 32, kernel_size=(3, 3), rngs=rngs)
    self.dropout = nnx.Dropout(0.2, rngs=rngs)
    self.out = nnx.Linear(32 * 4 * 4, 10, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = nnx.relu(self.norm(self.conv1(x[..., None])))
    x = nnx.avg_pool(nnx.relu(self.conv2(x)), (2, 2), strides=(2, 2))
    return self.out(self.dropout(x.reshape(x.shape[0], -1)))


def load_digits(seed: int):
  """Train/test split of the digits, 8x8 pixels scaled to [0, 1]."""
  digits = datasets.load_digits()
  x = (digits.images / 16.0).astype(np.float32)
  y = digits.target.astype(np.int32)
  x_train, x_test, y_train, y_test = model_selection.train_test_split(
      x, y, test_size=0.25, random_state=seed, stratify=y)
  return {'x': x_train, 'y': y_train}, {'x': x_test, 'y': y_test}


def loss_fn(model: DigitsCNN, batch) -> jax.Array:
  logits = model(batch['x'])
  return optax.softmax_cross_entropy_with_integer_labels(
      logits, batch['y']).mean()


def params_sha256(state: og.TrainState) -> str:
  digest = hashlib.sha256()
  for leaf in jax.tree.leaves((state.params, state.model_state)):
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      leaf = jax.random.key_data(leaf)
    digest.update(np.asarray(leaf).tobytes())
  return digest.hexdigest()


def main(argv: Optional[Sequence[str]] = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--steps', type=int, default=300)
  parser.add_argument('--checkpoint-dir', required=True)
  parser.add_argument('--stop-after', type=int, help='stop at this step')
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args(argv)

  train, test = load_digits(args.seed)
  model = DigitsCNN(nnx.Rngs(args.seed))
  tx = og.guard(optax.inject_hyperparams(optax.adamw)(learning_rate=3e-3),
                clip=og.zclip(), spikes={'window': 64})
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  step, state = og.nnx_fit_step(loss_fn, model, optimizer)
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
                      checkpointer=ckpt,
                      recovery=og.RecoveryPolicy(lr_backoff=0.5),
                      progress=False, callback=stop_at)
    except Stop:
      print(f'stopped after step {args.stop_after}; run again to resume')
      return {'step': args.stop_after}

  og.nnx_update(model, optimizer, result.state)
  model.eval()  # BatchNorm's running statistics, no dropout.
  accuracy = float(jnp.mean(jnp.argmax(model(test['x']), -1) == test['y']))
  skipped = [e['step'] for e in result.events.recent
             if e['kind'] == 'skipped_step']
  statistics_finite = bool(np.isfinite(model.norm.mean[...]).all()
                           and np.isfinite(model.norm.var[...]).all())
  print(f'step {result.state.step}: test accuracy {accuracy:.4f}; skipped'
        f' steps {skipped}; BatchNorm statistics finite: {statistics_finite}')
  return {
      'step': result.state.step, 'test_accuracy': accuracy,
      'skipped_steps': skipped, 'statistics_finite': statistics_finite,
      'params_sha256': params_sha256(result.state),
  }


if __name__ == '__main__':
  main()
