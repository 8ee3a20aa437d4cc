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
one process.

With ``--checkpoint-dir`` the same model trains under :func:`optax_guard.fit`
with an :class:`optax_guard.Checkpointer` shared by all processes (process 0
holds the directory's lock; every array is saved and restored by all
processes together) and an :class:`optax_guard.Recovery`: run it again and it
resumes. ``--preempt-at N`` sends SIGTERM to process 1 alone after step N:
every process stops after one same later step, saves it and exits 0.
``--crash-at N`` SIGKILLs every process after step N (a save in flight); the
next run resumes to bitwise the same params as an uninterrupted one. On a GPU or TPU cluster, drop ``--local-devices`` (each process
sees its own accelerators) and start one process per host with the same
coordinator address, or pass ``--coordinator auto`` where
``jax.distributed.initialize()`` finds the cluster by itself (TPU pods,
SLURM, Open MPI, Kubernetes).
"""

import argparse
import os
import signal

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
  parser.add_argument('--checkpoint-dir', default=None,
                      help='train with og.fit and og.Checkpointer here')
  parser.add_argument('--nan-steps', type=int, nargs='*', default=(),
                      help='with --checkpoint-dir: steps whose batch gets a'
                      ' NaN in --nan-row')
  parser.add_argument('--preempt-at', type=int, default=None,
                      help='with --checkpoint-dir: SIGTERM to process 1 (or'
                      ' the only one) after this step')
  parser.add_argument('--crash-at', type=int, default=None,
                      help='with --checkpoint-dir: SIGKILL every process'
                      ' after this step')
  parser.add_argument('--out', default=None,
                      help='.npz file for the final params and the metrics')
  return parser.parse_args()


WIDTH = 16


def _loss_fn(params, batch):
  hidden = jnp.tanh(batch['x'] @ params['w1'] + params['b1'])
  return jnp.mean((hidden @ params['w2'] - batch['y']) ** 2)


def _setup(tx):
  """The global mesh, replicated initial params and ``tx``'s state."""
  mesh = Mesh(np.array(jax.devices()), ('data',))
  replicated = NamedSharding(mesh, P())
  rng = np.random.default_rng(0)
  host_params = {
      'w1': rng.normal(size=(WIDTH, WIDTH)).astype(np.float32) / 4,
      'b1': np.zeros(WIDTH, np.float32),
      'w2': rng.normal(size=(WIDTH, 1)).astype(np.float32) / 4,
  }
  params = jax.tree.map(
      lambda x: jax.make_array_from_callback(
          x.shape, replicated, lambda index: x[index]), host_params)
  opt_state = jax.jit(tx.init, out_shardings=replicated)(params)
  return mesh, params, opt_state


class GlobalBatches:
  """Batch ``i`` of one global stream, built from this process's rows only.

  Every process iterates its own copy; each batch is a global array sharded
  over the mesh's ``data`` axis. The state is the next batch's index, so
  :class:`optax_guard.Checkpointer` saves it and a resume draws the same
  batches.

  Args:
    mesh: the global mesh.
    nan_steps: indices of the batches that get a NaN in ``nan_row``.
    nan_row: the global row of the NaN; only its process sees it.
  """

  def __init__(self, mesh: Mesh, nan_steps=(), nan_row: int = -1):
    self.global_batch = 8 * mesh.size
    rows = self.global_batch // jax.process_count()
    self.rows = slice(jax.process_index() * rows,
                      (jax.process_index() + 1) * rows)
    self.nan_row = nan_row % self.global_batch
    self.nan_here = self.rows.start <= self.nan_row < self.rows.stop
    self.nan_steps = frozenset(nan_steps)
    self.sharding = NamedSharding(mesh, P('data'))
    self.next_index = 0

  def __iter__(self):
    return self

  def __next__(self):
    index, self.next_index = self.next_index, self.next_index + 1
    data_rng = np.random.default_rng(index)
    x = data_rng.normal(size=(self.global_batch, WIDTH)).astype(np.float32)
    y = np.sin(x.sum(axis=1, keepdims=True)).astype(np.float32)
    if index in self.nan_steps and self.nan_here:
      x[self.nan_row, 0] = np.nan  # in this process's slice only
    local = {'x': x[self.rows], 'y': y[self.rows]}
    return jax.tree.map(
        lambda a: jax.make_array_from_process_local_data(self.sharding, a),
        local)

  def get_state(self) -> dict:
    return {'next_index': self.next_index}

  def set_state(self, state: dict) -> None:
    self.next_index = int(state['next_index'])


def train(steps: int = 6, nan_step: int = 3, nan_row: int = -1) -> dict:
  """Trains on all devices of all processes; returns params and metrics.

  Every process calls this with the same arguments. The global batch has 8
  rows per device; this process builds only its own rows.

  Returns:
    A dict of numpy arrays: ``param_*`` (final params), ``metric_*`` (one
    value per step), ``process_count``, and ``nan_in_local_data`` (whether
    the NaN row was in this process's slice).
  """
  tx = og.guard(optax.adam(1e-2), clip=og.zclip(warmup_steps=2),
                max_consecutive_skips=3)
  mesh, params, opt_state = _setup(tx)
  step = og.make_train_step(_loss_fn, tx)
  data = GlobalBatches(mesh, [nan_step], nan_row)
  history = []
  for _ in range(steps):
    params, opt_state, metrics = step(params, opt_state, next(data))
    history.append(metrics)

  result = {f'param_{k}': np.asarray(v) for k, v in params.items()}
  for name in ('loss', 'skipped', 'grad_norm', 'total_skips'):
    result[f'metric_{name}'] = np.stack([np.asarray(m[name]) for m in history])
  result['process_count'] = np.asarray(jax.process_count())
  result['nan_in_local_data'] = np.asarray(data.nan_here)
  return result


def _fault(preempt_at, crash_at):
  """A ``fit`` callback that injects the requested faults after a step."""

  def callback(state, metrics, events):
    del metrics, events
    if state.step == preempt_at and jax.process_index() == (
        min(1, jax.process_count() - 1)):
      os.kill(os.getpid(), signal.SIGTERM)  # this process alone
    if state.step == crash_at:
      os.kill(os.getpid(), signal.SIGKILL)  # the save of a step may be writing

  return callback


def fit_train(checkpoint_dir: str, steps: int = 12, nan_steps=(),
              nan_row: int = -1, preempt_at=None, crash_at=None) -> dict:
  """Trains with ``og.fit`` and a shared ``og.Checkpointer``; resumes.

  Two NaN batches in a row make the guard declare divergence
  (``max_consecutive_skips=2``) and the run roll back to the last confirmed
  checkpoint, on every process alike.

  Returns:
    A dict: ``param_*`` (final params), ``step`` (the step reached),
    ``preempted``, ``rollbacks`` (``[[step, to_step], ...]``),
    ``skipped_steps``, ``checkpoint_steps`` (on disk at the end).
  """
  tx = og.guard(optax.adam(1e-2), max_consecutive_skips=2)
  mesh, params, opt_state = _setup(tx)
  data = GlobalBatches(mesh, nan_steps, nan_row)
  # Five kept: the rollback target (step 2) is still there after the
  # preemption save; with fewer, an interrupted run could roll back elsewhere.
  with og.Checkpointer(checkpoint_dir, save_interval_steps=2,
                       max_to_keep=5) as checkpointer:
    result = og.fit(
        og.make_train_step(_loss_fn, tx), og.TrainState(0, params, opt_state),
        data, num_steps=steps, checkpointer=checkpointer,
        recovery=og.RecoveryPolicy(confirm_steps=2), progress=False,
        exit_on_preemption=False, callback=_fault(preempt_at, crash_at),
    )
    saved = checkpointer.all_steps()
  out = {f'param_{k}': np.asarray(v) for k, v in result.state.params.items()}
  out['step'] = np.asarray(result.state.step)
  out['preempted'] = np.asarray(result.preempted)
  out['rollbacks'] = np.asarray(
      [[r['step'], r['to_step']] for r in result.recovery.rollbacks],
      np.int64).reshape(-1, 2)
  out['skipped_steps'] = np.asarray(
      [e['step'] for e in result.events.recent if e['kind'] == 'skipped_step'],
      np.int64)
  out['checkpoint_steps'] = np.asarray(saved, np.int64)
  return out


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
    if args.checkpoint_dir is not None:
      result = fit_train(args.checkpoint_dir, args.steps, args.nan_steps,
                         args.nan_row, args.preempt_at, args.crash_at)
      print(f'process {jax.process_index()} of {jax.process_count()}: step'
            f' {result["step"]}, preempted {bool(result["preempted"])},'
            f' rollbacks {result["rollbacks"].tolist()}', flush=True)
    else:
      result = train(args.steps, args.nan_step, args.nan_row)
      print(f'process {jax.process_index()} of {jax.process_count()}: skipped'
            ' per step', result['metric_skipped'].tolist(), flush=True)
    if args.out is not None:
      np.savez(args.out, **result)
  finally:
    if distributed:
      jax.distributed.shutdown()


if __name__ == '__main__':
  main()
