"""The damage walk (issue 21, "What to build" 2): every file of the newest
step, deleted, truncated or with one byte flipped, is either found before
the restored state is used (the step is moved aside and the previous one
resumed) or provably harmless (the same step loads, bitwise equal).

One short run is saved once (module fixture); each case copies it, damages
one file and restores only: a resume from any valid step continues bitwise
(tests/test_crash_resume.py), and two cases run on to the end to show it.
"""

import collections
import os
import shutil
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_guard as og
from optax_guard.host.checkpoint import CorruptCheckpointWarning

# Nothing unraisable may leak from abandoned Orbax reads.
pytestmark = pytest.mark.filterwarnings(
    'error::pytest.PytestUnraisableExceptionWarning'
)

TX = og.guard(optax.adam(1e-2))
NEWEST, PREVIOUS, END = 20, 10, 30


def loss_fn(params, batch):
  return jnp.mean((jnp.tanh(batch['x'] @ params['w']) - batch['y']) ** 2)


STEP = og.make_train_step(loss_fn, TX)


def make_data():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(128, 8)).astype(np.float32)
  return og.batches({'x': x, 'y': np.tanh(x[:, :2])}, batch_size=16, seed=0)


def make_init():
  params = {'w': jax.random.normal(jax.random.key(0), (8, 2)) * 0.1}
  return og.TrainState(0, params, TX.init(params), jax.random.key(1))


def host(state):
  def to_numpy(x):
    if jax.dtypes.issubdtype(getattr(x, 'dtype', None), jax.dtypes.prng_key):
      x = jax.random.key_data(x)
    return np.asarray(x)
  return jax.tree.map(to_numpy, (state.params, state.opt_state, state.rng))


def run(directory, num_steps):
  with og.Checkpointer(directory, save_interval_steps=PREVIOUS) as ckpt:
    return og.fit(STEP, make_init(), make_data(), num_steps=num_steps,
                  checkpointer=ckpt, progress=False, handle_preemption=False)


@pytest.fixture(scope='module')
def saved(tmp_path_factory):
  """The saved run (steps 0, 10, 20), what each step restores to, and the
  final params of an undamaged run to step 30."""
  root = tmp_path_factory.mktemp('walk')
  run(root / 'run', NEWEST)
  expected = {}
  with og.Checkpointer(root / 'run', read_only=True) as ckpt:
    for step in (PREVIOUS, NEWEST):
      data = make_data()
      state, events = ckpt.restore(step, make_init(), data_iter=data)
      expected[step] = (host(state), events, data.get_state(),
                        ckpt.metrics(step))
  shutil.copytree(root / 'run', root / 'undamaged')
  final = host(run(root / 'undamaged', END).state)
  return root / 'run', expected, final


def _delete(path):
  os.remove(path)


def _truncate(path):
  with open(path, 'r+b') as f:
    f.truncate(os.path.getsize(path) // 2)


def _flip(path):
  with open(path, 'r+b') as f:
    f.seek(os.path.getsize(path) // 2)
    byte = f.read(1)
    f.seek(-1, os.SEEK_CUR)
    f.write(bytes([byte[0] ^ 0x01]) if byte else b'\x01')


DAMAGE = {'delete': _delete, 'truncate': _truncate, 'flip': _flip}


def _files(step_dir):
  return sorted(os.path.relpath(os.path.join(root, name), step_dir)
                for root, _, names in os.walk(step_dir) for name in names)


def _outcome(directory, expected):
  """'fell back', 'loaded equal', or what went wrong."""
  data = make_data()
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    with og.Checkpointer(directory) as ckpt:
      state, events = ckpt.restore_or_init(make_init(), data_iter=data)
      metrics = ckpt.metrics(state.step)
  named = [w for w in caught if issubclass(w.category, CorruptCheckpointWarning)
           and f'step {NEWEST} ' in str(w.message)]
  if state.step not in expected:
    return f'restored step {state.step}'
  arrays, saved_events, data_state, saved_metrics = expected[state.step]
  equal = (events == saved_events and data.get_state() == data_state
           and metrics == saved_metrics
           and all(np.array_equal(a, b) for a, b in zip(
               jax.tree.leaves(host(state)), jax.tree.leaves(arrays))))
  if not equal:
    return f'step {state.step} loaded with other values'
  if state.step == NEWEST:
    return 'loaded equal'
  moved = (directory / 'corrupted' / str(NEWEST)).is_dir()
  return 'fell back' if named and moved else 'fell back unannounced'


def test_every_damaged_file_is_found_or_harmless(saved, tmp_path):
  source, expected, final = saved
  files = _files(source / str(NEWEST))
  outcomes, counts = {}, collections.Counter()
  for relative in files:
    for kind, damage in DAMAGE.items():
      directory = tmp_path / f'{len(outcomes)}'
      shutil.copytree(source, directory)
      damage(directory / str(NEWEST) / relative)
      outcome = _outcome(directory, expected)
      outcomes[relative, kind] = outcome
      counts[outcome] += 1
      shutil.rmtree(directory)
  print(f'damage walk: {len(files)} files x {len(DAMAGE)} kinds:'
        f' {dict(counts)}')
  for (relative, kind), outcome in sorted(outcomes.items()):
    print(f'  {relative} {kind}: {outcome}')
  failed = {case: o for case, o in outcomes.items()
            if o not in ('fell back', 'loaded equal')}
  assert not failed
  # Every file read on restore (the arrays and their metadata, metrics,
  # events, the iterator state, the integrity record) is covered: its
  # deletion is found. Not read: Orbax's commit markers, the step's
  # _CHECKPOINT_METADATA (handler names and times), the per-process OCDBT
  # files (merged into state/d/ at commit) and state/_sharding (the target
  # gives the shardings); damage to them loaded an equal state above.
  unread = ('commit_success.txt', '_CHECKPOINT_METADATA', 'ocdbt.process_',
            '_sharding')
  for relative in files:
    if not any(part in relative for part in unread):
      assert outcomes[relative, 'delete'] == 'fell back', relative
  # Both outcomes continue to the undamaged run's final params, bitwise.
  for relative, kind in [('metrics/metrics', 'flip'),
                         ('commit_success.txt', 'delete')]:
    directory = tmp_path / f'{kind}-end'
    shutil.copytree(source, directory)
    DAMAGE[kind](directory / str(NEWEST) / relative)
    with warnings.catch_warnings():
      warnings.simplefilter('ignore', CorruptCheckpointWarning)
      result = run(directory, END)
    for a, b in zip(jax.tree.leaves(host(result.state)),
                    jax.tree.leaves(final)):
      np.testing.assert_array_equal(a, b)
