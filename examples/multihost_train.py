"""A guarded, data-parallel train step over several processes (one global mesh).

Each process runs this script with its own ``--process-id``; together they
form one JAX cluster (``jax.distributed.initialize``) whose devices make one
global :class:`jax.sharding.Mesh`. Every process feeds only its own slice of
the global batch; the loss is a mean over the whole batch, so the gradients
(and every guard decision made on them) are the same on all processes. A
NaN injected into one process's data therefore skips the step everywhere.

On CPU (what the tests run, two processes on 127.0.0.1)::

    python examples/multihost_train.py --coordinator 127.0.0.1:12345 \\
        --num-processes 2 --process-id 0 --local-devices 4 --out /tmp/p0.npz &
    python examples/multihost_train.py --coordinator 127.0.0.1:12345 \\
        --num-processes 2 --process-id 1 --local-devices 4 --out /tmp/p1.npz

``--num-processes 1 --local-devices 8`` runs the same global computation in
one process. On a GPU or TPU cluster, drop ``--local-devices`` (each process
sees its own accelerators) and start one process per host with the same
coordinator address, or pass ``--coordinator auto`` where
``jax.distributed.initialize()`` finds the cluster by itself (TPU pods,
SLURM, Open MPI, Kubernetes).
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import optax_guard as og


def _parse():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--coordinator', default=None,
                      help='host:port of process 0, "auto" to let JAX find'
                      ' the cluster, omitted for one process')
  parser.add_argument('--num-processes', type=int, default=1)
  parser.add_argument('--process-id', type=int, default=0)
  parser.add_argument('--local-devices', type=int, default=None,
                      help='CPU devices per process (CPU only)')
  parser.add_argument('--steps', type=int, default=6)
  parser.add_argument('--nan-step', type=int, default=3,
                      help='step whose batch gets a NaN (-1: none)')
  parser.add_argument('--nan-row', type=int, default=-1,
                      help='row of the global batch that gets the NaN; only'
                      ' the process holding that row sees it (default: the'
                      ' last row, on the last process)')
  parser.add_argument('--out', default=None,
                      help='.npz file for the final params and the metrics')
  return parser.parse_args()


def train(steps: int = 6, nan_step: int = 3, nan_row: int = -1) -> dict:
  """Trains on all devices of all processes; returns params and metrics.

  Every process calls this with the same arguments. The global batch has 8
  rows per device; this process builds only its own rows.

  Returns:
    A dict of numpy arrays: ``param_*`` (final params), ``metric_*`` (one
    value per step), ``process_count``, and ``nan_in_local_data`` (whether
    the NaN row was in this process's slice).
  """
  mesh = Mesh(np.array(jax.devices()), ('data',))
  replicated = NamedSharding(mesh, P())
  data_sharding = NamedSharding(mesh, P('data'))
  global_batch, width = 8 * len(jax.devices()), 16

  def loss_fn(params, batch):
    hidden = jnp.tanh(batch['x'] @ params['w1'] + params['b1'])
    return jnp.mean((hidden @ params['w2'] - batch['y']) ** 2)

  rng = np.random.default_rng(0)
  host_params = {
      'w1': rng.normal(size=(width, width)).astype(np.float32) / 4,
      'b1': np.zeros(width, np.float32),
      'w2': rng.normal(size=(width, 1)).astype(np.float32) / 4,
  }
  params = jax.tree.map(
      lambda x: jax.make_array_from_callback(
          x.shape, replicated, lambda index: x[index]), host_params)
  tx = og.guard(optax.adam(1e-2), clip=og.zclip(warmup_steps=2),
                max_consecutive_skips=3)
  opt_state = jax.jit(tx.init, out_shardings=replicated)(params)
  step = og.make_train_step(loss_fn, tx)

  rows = global_batch // jax.process_count()
  first_row = jax.process_index() * rows
  nan_row %= global_batch
  nan_here = first_row <= nan_row < first_row + rows
  history = []
  for step_index in range(steps):
    data_rng = np.random.default_rng(step_index)
    x = data_rng.normal(size=(global_batch, width)).astype(np.float32)
    y = np.sin(x.sum(axis=1, keepdims=True)).astype(np.float32)
    if step_index == nan_step and nan_here:
      x[nan_row, 0] = np.nan  # in this process's slice only
    local = {'x': x[first_row:first_row + rows],
             'y': y[first_row:first_row + rows]}
    batch = jax.tree.map(
        lambda a: jax.make_array_from_process_local_data(data_sharding, a),
        local)
    params, opt_state, metrics = step(params, opt_state, batch)
    history.append(metrics)

  result = {f'param_{k}': np.asarray(v) for k, v in params.items()}
  for name in ('loss', 'skipped', 'grad_norm', 'total_skips'):
    result[f'metric_{name}'] = np.stack([np.asarray(m[name]) for m in history])
  result['process_count'] = np.asarray(jax.process_count())
  result['nan_in_local_data'] = np.asarray(nan_here)
  return result


def main():
  args = _parse()
  if args.local_devices is not None:
    # Before the first use of JAX: this many CPU devices in this process.
    jax.config.update('jax_platforms', 'cpu')
    jax.config.update('jax_num_cpu_devices', args.local_devices)
  distributed = args.coordinator is not None
  # CPU collectives across processes go through gloo (the default of
  # jax_cpu_collectives_implementation); GPUs use NCCL, TPUs their ICI.
  if args.coordinator == 'auto':
    jax.distributed.initialize()
  elif distributed:
    jax.distributed.initialize(
        coordinator_address=args.coordinator,
        num_processes=args.num_processes,
        process_id=args.process_id,
        initialization_timeout=60,
    )
  try:
    result = train(args.steps, args.nan_step, args.nan_row)
    if args.out is not None:
      np.savez(args.out, **result)
    print(f'process {jax.process_index()} of {jax.process_count()}: skipped'
          ' per step', result['metric_skipped'].tolist(), flush=True)
  finally:
    if distributed:
      jax.distributed.shutdown()


if __name__ == '__main__':
  main()
