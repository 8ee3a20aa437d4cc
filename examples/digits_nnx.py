"""A Flax NNX classifier on scikit-learn's handwritten digits, guarded.

The digits (1,797 real 8x8 scans, bundled with scikit-learn: no download)
train a small MLP through ``nnx.Optimizer`` with ``og.guard`` as the optax
transformation: ZClip clipping and spike skipping on every step, the loss
passed as ``value=``, the guard's metrics read with ``og.metrics``. Batches
come from a grain pipeline (``og.batches``), and one corrupted batch (NaN
pixels, as a broken sensor would give) shows the guard skipping it with the
optimizer state untouched.

    python examples/digits_nnx.py           # 30 epochs, ~97% test accuracy
    python examples/digits_nnx.py --fast    # 8 epochs, what the tests run
"""

import argparse
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from sklearn import datasets
from sklearn import model_selection

import optax_guard as og


class Classifier(nnx.Module):
  """64 pixels -> 128 -> 128 -> 10 digit logits."""

  def __init__(self, rngs: nnx.Rngs):
    self.hidden = nnx.Linear(64, 128, rngs=rngs)
    self.middle = nnx.Linear(128, 128, rngs=rngs)
    self.out = nnx.Linear(128, 10, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = nnx.relu(self.hidden(x))
    return self.out(nnx.relu(self.middle(x)))


def load_digits(seed: int):
  """Train/test split of the digits, pixels scaled to [0, 1]."""
  digits = datasets.load_digits()
  x = (digits.data / 16.0).astype(np.float32)
  y = digits.target.astype(np.int32)
  x_train, x_test, y_train, y_test = model_selection.train_test_split(
      x, y, test_size=0.25, random_state=seed, stratify=y
  )
  return {'x': x_train, 'y': y_train}, {'x': x_test, 'y': y_test}


def loss_fn(model: Classifier, batch) -> jax.Array:
  logits = model(batch['x'])
  return optax.softmax_cross_entropy_with_integer_labels(
      logits, batch['y']
  ).mean()


@nnx.jit
def train_step(model: Classifier, optimizer: nnx.Optimizer, batch):
  loss, grads = nnx.value_and_grad(loss_fn)(model, batch)
  # The loss reaches the guard as optax's extra argument `value`.
  optimizer.update(model, grads, value=loss)
  return og.metrics(optimizer)


@nnx.jit
def accuracy(model: Classifier, x: jax.Array, y: jax.Array) -> jax.Array:
  return jnp.mean(jnp.argmax(model(x), axis=-1) == y)


def _held_state(model: Classifier, optimizer: nnx.Optimizer) -> list:
  """Host copies of what a skipped step must not touch: the weights and
  the state of the clip and the inner optimizer (the guard's own per-step
  readings, like the last gradient norm, do change)."""
  guard_state = nnx.as_pure(optimizer.opt_state)
  held = (nnx.state(model, nnx.Param), guard_state.inner_state,
          guard_state.clip_state)
  return [np.array(leaf) for leaf in jax.tree.leaves(held)]


def main(argv: Optional[Sequence[str]] = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--fast', action='store_true', help='8 epochs only')
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args(argv)

  train, test = load_digits(args.seed)
  batch_size = 64
  epochs = 8 if args.fast else 30
  steps = epochs * (len(train['y']) // batch_size)
  model = Classifier(nnx.Rngs(args.seed))
  tx = og.guard(
      optax.adamw(optax.cosine_decay_schedule(3e-3, steps)),
      clip=og.zclip(),
      spikes={'window': 64},
  )
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  batches = og.batches(train, batch_size, seed=args.seed)
  broken_step = steps // 2

  skipped = []
  for step in range(1, steps + 1):
    batch = next(batches)
    if step == broken_step:
      batch = {**batch, 'x': batch['x'].copy()}
      batch['x'][0, :8] = np.nan  # A dead sensor row.
      before = _held_state(model, optimizer)
    metrics = train_step(model, optimizer, batch)
    if bool(metrics['skipped']):
      skipped.append(step)
    if step == broken_step:
      untouched = all(
          np.array_equal(a, b) for a, b in
          zip(before, _held_state(model, optimizer))
      )
      verdict = 'skipped' if metrics['skipped'] else 'APPLIED'
      held = 'unchanged bit for bit' if untouched else 'CHANGED'
      print(f'step {step}: NaN batch {verdict}; weights, Adam moments and'
            f' ZClip statistics {held}')
    if step % (steps // 4) == 0:
      print(f'step {step:4d}  loss {float(metrics["loss"]):.4f}  grad norm'
            f' {float(metrics["grad_norm"]):.3f}  skips'
            f' {int(metrics["total_skips"])}')

  test_accuracy = float(accuracy(model, test['x'], test['y']))
  print(f'test accuracy {test_accuracy:.4f} after {steps} steps; skipped'
        f' steps: {skipped}')
  return {
      'test_accuracy': test_accuracy,
      'skipped_steps': skipped,
      'broken_step': broken_step,
      'state_untouched_by_nan_batch': untouched,
  }


if __name__ == '__main__':
  main()
