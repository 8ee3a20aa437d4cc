"""A guarded train step sharded over 8 devices (FSDP-style), checkpointed.

The parameters of an MLP for scikit-learn's digits are sharded over a
``('data',)`` mesh of 8 devices along their first axis (FSDP), the batches
along the batch axis (data parallel). ``og.make_train_step`` compiles one
step whose guard reads the global gradient norm across all shards: a NaN on
one device's slice of the batch makes every shard skip together, and the
shardings of the parameters and the optimizer state come out as they went
in. ``og.Checkpointer`` saves the sharded state and restores it onto the
same mesh.

On a machine without 8 accelerators, run it on 8 simulated CPU devices:

    XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
        JAX_PLATFORMS=cpu python examples/sharded.py
"""

import argparse
import tempfile
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from sklearn import datasets
from sklearn import model_selection

import optax_guard as og

DEVICES = 8


def init_params(key: jax.Array, sizes=(64, 256, 256, 10)) -> dict:
  params = {}
  for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
    key, sub = jax.random.split(key)
    params[f'layer{i}'] = {
        'w': jax.random.normal(sub, (n_in, n_out)) / np.sqrt(n_in),
        'b': jnp.zeros(n_out),
    }
  return params


def apply(params: dict, x: jax.Array) -> jax.Array:
  for i in range(len(params) - 1):
    x = jax.nn.relu(x @ params[f'layer{i}']['w'] + params[f'layer{i}']['b'])
  last = params[f'layer{len(params) - 1}']
  return x @ last['w'] + last['b']


def loss_fn(params: dict, batch: dict) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(
      apply(params, batch['x']), batch['y']
  ).mean()


def fsdp_sharding(mesh: Mesh, leaf) -> NamedSharding:
  """Shard the first axis over 'data' where it divides; replicate the rest."""
  shape = np.shape(leaf)
  if shape and shape[0] % mesh.size == 0:
    return NamedSharding(mesh, P('data', *[None] * (len(shape) - 1)))
  return NamedSharding(mesh, P())


def main(argv: Optional[Sequence[str]] = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--steps', type=int, default=150)
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args(argv)
  if jax.device_count() < DEVICES:
    raise SystemExit(
        f'this example needs {DEVICES} devices, JAX sees'
        f' {jax.device_count()}; on CPU set'
        ' XLA_FLAGS=--xla_force_host_platform_device_count=8 before starting'
        ' Python.'
    )
  mesh = Mesh(np.array(jax.devices()[:DEVICES]), ('data',))

  digits = datasets.load_digits()
  x_train, x_test, y_train, y_test = model_selection.train_test_split(
      (digits.data / 16).astype(np.float32), digits.target.astype(np.int32),
      test_size=0.25, random_state=args.seed, stratify=digits.target,
  )
  batches = og.batches({'x': x_train, 'y': y_train}, 64, seed=args.seed)
  batch_sharding = NamedSharding(mesh, P('data'))

  tx = og.guard(
      optax.adamw(1e-3), clip=og.zclip(), spikes={'window': 32},
  )
  # One compiled initialization instead of one per operation and shape.
  params = jax.jit(init_params)(jax.random.key(args.seed))
  state = (params, tx.init(params))
  shardings = jax.tree.map(lambda leaf: fsdp_sharding(mesh, leaf), state)
  params, opt_state = jax.device_put(state, shardings)
  train_step = og.make_train_step(loss_fn, tx)

  nan_step = args.steps // 2
  skipped = []
  for step in range(1, args.steps + 1):
    batch = next(batches)
    if step == nan_step:
      # One bad example: it lives on one device's slice of the batch.
      batch = {**batch, 'x': batch['x'].copy()}
      batch['x'][-1, 0] = np.nan
    batch = jax.device_put(batch, batch_sharding)
    params, opt_state, metrics = train_step(params, opt_state, batch)
    if metrics['skipped']:
      skipped.append(step)
  same_shardings = jax.tree.all(jax.tree.map(
      lambda leaf, sharding: leaf.sharding.is_equivalent_to(
          sharding, leaf.ndim),
      (params, opt_state), shardings,
  ))
  kernel = params['layer1']['w']
  print(f'layer1 kernel {kernel.shape} is split into'
        f' {len(kernel.addressable_shards)} shards of'
        f' {kernel.addressable_shards[0].data.shape}')
  print(f'skipped steps {skipped} (NaN batch at step {nan_step});'
        f' shardings preserved: {same_shardings}')

  # Save the sharded state and restore it onto the same mesh.
  with og.Checkpointer(tempfile.mkdtemp(prefix='sharded_')) as checkpointer:
    saved = og.TrainState(args.steps, params, opt_state)
    checkpointer.save(saved, force=True)
    checkpointer.wait_until_finished()
    # Only the structure, shapes and shardings of the target are read.
    target = og.TrainState(0, *jax.tree.map(
        lambda leaf, sharding: jax.ShapeDtypeStruct(
            leaf.shape, leaf.dtype, sharding=sharding),
        state, shardings,
    ))
    restored, _ = checkpointer.restore(args.steps, target)
  restored_equal = jax.tree.all(jax.tree.map(
      # On the host: jnp.array_equal would compile for every shape.
      lambda a, b: np.array_equal(np.asarray(a), np.asarray(b), equal_nan=True)
      and a.sharding.is_equivalent_to(b.sharding, a.ndim),
      (restored.params, restored.opt_state), (params, opt_state),
  ))
  accuracy = float(jnp.mean(
      jnp.argmax(apply(params, jax.device_put(x_test)), -1) == y_test
  ))
  print(f'test accuracy {accuracy:.4f}; restored checkpoint equal and'
        f' sharded alike: {restored_equal}')
  return {
      'test_accuracy': accuracy,
      'skipped_steps': skipped,
      'nan_step': nan_step,
      'shardings_preserved': same_shardings,
      'restored_equal': restored_equal,
      'kernel_shards': len(kernel.addressable_shards),
  }


if __name__ == '__main__':
  main()
