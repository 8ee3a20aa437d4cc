"""Checkpointer: round trips, resharding, retention, corruption fallback."""

import glob
import os
import warnings

import chex
import jax
import jax.numpy as jnp
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import optax_guard as og
from optax_guard.host import checkpoint as checkpoint_lib
from optax_guard.host.checkpoint import CorruptCheckpointError
from optax_guard.host.checkpoint import CorruptCheckpointWarning
from optax_guard.transforms.guard import GuardState

# A damaged checkpoint makes Orbax abandon its other pending reads; og
# keeps them off the console (integrity.quiet_abandoned_reads): nothing
# unraisable may leak.
pytestmark = pytest.mark.filterwarnings(
    'error::pytest.PytestUnraisableExceptionWarning'
)

TX = og.guard(
    optax.inject_hyperparams(optax.adam)(learning_rate=1e-2),
    clip=og.zclip(),
    spikes={'window': 8},
    max_consecutive_skips=3,
)


def loss_fn(params, batch):
  prediction = jnp.tanh(batch['x'] @ params['w'] + params['b'])
  return jnp.mean((prediction - batch['y']) ** 2)


@pytest.fixture(scope='module')
def train_step():
  return og.make_train_step(loss_fn, TX)


def make_data(seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(256, 64)).astype(np.float32)
  y = np.tanh(x @ rng.normal(size=(64, 16))).astype(np.float32)
  return og.batches({'x': x, 'y': y}, batch_size=32, seed=seed)


def make_init(seed=0, mesh=None):
  params = {
      'w': jax.random.normal(jax.random.key(seed), (64, 16)) * 0.1,
      'b': jnp.zeros(16),
  }
  if mesh is not None:  # first axis split over the mesh
    params = {k: jax.device_put(v, NamedSharding(mesh, P('x')))
              for k, v in params.items()}
  # Under jit, as in a sharded training set-up, every leaf lands on the mesh.
  opt_state = jax.jit(TX.init)(params)
  return og.TrainState(0, params, opt_state, jax.random.key(seed + 7))


def host(tree):
  def to_numpy(x):
    if jax.dtypes.issubdtype(getattr(x, 'dtype', None), jax.dtypes.prng_key):
      x = jax.random.key_data(x)
    return np.asarray(x)
  return jax.tree.map(to_numpy, tree)


def assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(host(a)), jax.tree.leaves(host(b))):
    np.testing.assert_array_equal(x, y)


def train(step_fn, state, data, steps):
  for _ in range(steps):
    params, opt_state, _ = step_fn(state.params, state.opt_state, next(data))
    state = state._replace(step=state.step + 1, params=params,
                           opt_state=opt_state)
  return state


def _reference_fingerprint(x) -> int:
  """``sum(bits[i] * (2 * i + 1)) mod 2**32`` over the row-major index, in
  NumPy from the raw bytes (complex: real and imaginary parts interleaved)."""
  x = np.asarray(x)
  if x.dtype == np.bool_:
    bits = x.astype(np.uint64)
  else:
    # Narrow types widen; wider ones split into uint32 words, as _as_bits.
    unsigned = {1: np.uint8, 2: np.uint16}.get(x.dtype.itemsize, np.uint32)
    bits = x.view(unsigned).astype(np.uint64)
  bits = bits.reshape(-1)
  weights = (2 * np.arange(bits.size, dtype=np.uint64) + 1) % 2**32
  return int(np.sum(bits * weights % 2**32) % 2**32)


_FINGERPRINTED = {
    'f32 3-d': np.random.default_rng(0).normal(size=(2, 3, 4)).astype(np.float32),
    'f32 scalar': np.float32(-2.5),
    'bf16': np.linspace(-3, 3, 5).astype(jnp.bfloat16),
    'f16 2-d': np.random.default_rng(1).normal(size=(3, 7)).astype(np.float16),
    'int8': np.arange(-3, 4, dtype=np.int8),
    'bool': np.eye(4, dtype=bool),
    'complex64': (np.arange(6) + 1j * np.arange(6, 12)).astype(
        np.complex64).reshape(3, 2),
    # Large bit patterns and many columns: the sums wrap around 2**32.
    'u32 wrapping': np.random.default_rng(2).integers(
        0, 2**32, size=(5, 1000), dtype=np.uint32),
}


@pytest.mark.parametrize('name', list(_FINGERPRINTED))
def test_fingerprint_is_the_position_weighted_sum_of_the_bits(name):
  x = _FINGERPRINTED[name]
  (value,) = checkpoint_lib.fingerprint({'x': jnp.asarray(x)}).values()
  assert value == _reference_fingerprint(x)


def test_fingerprint_of_a_prng_key_is_that_of_its_key_data():
  key = jax.random.key(3)
  (value,) = checkpoint_lib.fingerprint([key]).values()
  assert value == _reference_fingerprint(jax.random.key_data(key))


@pytest.mark.parametrize('spec', [P('x'), P(None, 'x')])
def test_fingerprint_does_not_depend_on_the_sharding(spec):
  x = jax.random.normal(jax.random.key(0), (8, 16))
  mesh = Mesh(np.array(jax.devices()[:8]), ('x',))
  sharded = jax.device_put(x, NamedSharding(mesh, spec))
  assert checkpoint_lib.fingerprint([sharded]) == checkpoint_lib.fingerprint([x])


@settings(max_examples=40, deadline=None)
@given(index=st.integers(0, 3 * 5 * 7 - 1), bit=st.integers(0, 31))
def test_any_flipped_bit_changes_the_fingerprint(index, bit):
  x = np.random.default_rng(4).normal(size=(3, 5, 7)).astype(np.float32)
  flipped = x.copy()
  flipped.reshape(-1).view(np.uint32)[index] ^= np.uint32(1 << bit)
  assert (checkpoint_lib.fingerprint([jnp.asarray(flipped)])
          != checkpoint_lib.fingerprint([jnp.asarray(x)]))


def test_round_trip_is_exact(tmp_path, train_step):
  data = make_data()
  state = train(train_step, make_init(), data, 5)
  expected = host(state)
  data_state = data.get_state()
  with og.Checkpointer(tmp_path, save_interval_steps=5) as ckpt:
    assert ckpt.save(state, data_iter=data, events={'skips': [3, 4]})
    # Donated steps right after an async save must not reach the files.
    train(train_step, state, data, 3)
    ckpt.wait_until_finished()
  fresh_data = make_data()
  with og.Checkpointer(tmp_path, save_interval_steps=5) as ckpt:
    restored, events = ckpt.restore_or_init(make_init(), data_iter=fresh_data)
  assert restored.step == 5
  assert events == {'skips': [3, 4]}
  assert fresh_data.get_state() == data_state
  assert isinstance(restored.opt_state, GuardState)
  assert jax.tree.structure(restored.opt_state) == jax.tree.structure(
      state.opt_state
  )
  assert jax.dtypes.issubdtype(restored.rng.dtype, jax.dtypes.prng_key)
  assert_trees_equal(host(restored), expected)


def test_relative_directory_is_taken_from_the_working_directory(
    tmp_path, monkeypatch, train_step):
  # As `optax-guard demo` passes its default --out, optax-guard-demo/...
  monkeypatch.chdir(tmp_path)
  state = make_init()
  batch = next(make_data())
  params, opt_state, _ = train_step(state.params, state.opt_state, batch)
  state = og.TrainState(1, params, opt_state, state.rng)
  with og.Checkpointer('runs/checkpoints', save_interval_steps=1) as ckpt:
    assert ckpt.save(state)
    ckpt.wait_until_finished()  # Orbax refused relative paths here.
    assert ckpt.directory == tmp_path / 'runs' / 'checkpoints'
  with og.Checkpointer('runs/checkpoints', save_interval_steps=1) as ckpt:
    restored, _ = ckpt.restore_or_init(make_init())
  assert restored.step == 1
  chex.assert_trees_all_equal(restored.params, state.params)


def test_restore_or_init_on_empty_directory_returns_init(tmp_path):
  init = make_init()
  with og.Checkpointer(tmp_path / 'new') as ckpt:
    state, events = ckpt.restore_or_init(init)
  assert state is init and events == {}


def test_sharded_save_on_eight_devices_restores_on_four(tmp_path):
  devices = np.array(jax.devices())
  assert devices.size == 8
  four = Mesh(devices[:4], ('x',))
  saved = make_init(seed=1, mesh=Mesh(devices, ('x',)))
  assert len(saved.params['w'].sharding.device_set) == 8
  saved = saved._replace(
      step=3, params=jax.tree.map(lambda x: x + 1.5, saved.params)
  )
  with og.Checkpointer(tmp_path, save_interval_steps=1) as ckpt:
    ckpt.save(saved)
  target = make_init(seed=2, mesh=four)
  with og.Checkpointer(tmp_path) as ckpt:
    restored, _ = ckpt.restore_or_init(target)
  assert restored.step == 3
  assert_trees_equal(host(restored.params), host(saved.params))
  assert restored.params['w'].sharding == NamedSharding(four, P('x'))
  for got, want in zip(jax.tree.leaves(restored.opt_state),
                       jax.tree.leaves(target.opt_state)):
    assert got.sharding.is_equivalent_to(want.sharding, got.ndim)


def test_eight_device_checkpoint_continues_training_on_four(
    tmp_path, train_step):
  devices = np.array(jax.devices())
  eight, four = Mesh(devices, ('x',)), Mesh(devices[:4], ('x',))
  saved = make_init(seed=1, mesh=eight)
  data = make_data()
  for _ in range(3):
    params, opt_state, _ = train_step(saved.params, saved.opt_state,
                                      next(data))
    saved = saved._replace(step=saved.step + 1, params=params,
                           opt_state=opt_state)
  with og.Checkpointer(tmp_path, save_interval_steps=1) as ckpt:
    ckpt.save(saved, data_iter=data)
  target = make_init(seed=2, mesh=four)
  # jit leaves the scalar counts uncommitted on device 0; a restored array
  # is committed to its target's sharding, so place them on the mesh.
  target = target._replace(opt_state=jax.tree.map(
      lambda x: x if x.committed else jax.device_put(
          x, NamedSharding(four, P())), target.opt_state))
  with og.Checkpointer(tmp_path) as ckpt:
    resumed_data = make_data()
    restored, _ = ckpt.restore_or_init(target, data_iter=resumed_data)
  assert restored.step == 3
  assert_trees_equal(host(restored.opt_state), host(saved.opt_state))
  runs, skipped = {}, {}
  for name, (state, batches) in {'eight': (saved, data),
                                 'four': (restored, resumed_data)}.items():
    params, opt_state = state.params, state.opt_state
    skipped[name] = []
    for _ in range(3):
      params, opt_state, metrics = train_step(params, opt_state,
                                              next(batches))
      skipped[name].append(bool(metrics['skipped']))
    runs[name] = (params, opt_state)
  # The restored spike window decides as the saved one: at window 8 the check
  # is armed after 3 values (min_history 3, as OLMo-core and MaxText), and
  # step 4's gradient norm, 0.649, is above mean + 6 std (0.636) of the three
  # before it (0.607, 0.615, 0.608), so both runs skip it.
  assert skipped['four'] == skipped['eight'] == [True, False, False]
  assert runs['four'][0]['w'].sharding == NamedSharding(four, P('x'))
  # Same math; only the order of the sharded sums differs (8 vs 4 parts).
  chex.assert_trees_all_close(host(runs['four']), host(runs['eight']),
                              rtol=1e-5, atol=1e-6)


def test_interval_force_and_existing_step(tmp_path):
  state = make_init()
  with og.Checkpointer(tmp_path, save_interval_steps=10, async_save=False) as c:
    assert not c.save(state._replace(step=7))
    assert c.save(state._replace(step=7), force=True)
    assert c.save(state._replace(step=10))
    assert not c.save(state._replace(step=10), force=True)  # already saved
    assert c.all_steps() == [7, 10]


def test_kept_steps_outlive_max_to_keep_until_replaced(tmp_path):
  state = make_init()
  with og.Checkpointer(tmp_path, save_interval_steps=1, max_to_keep=1,
                       keep_last_good=False, async_save=False) as c:
    c.keep_steps([1, 2])
    for step in range(1, 5):
      c.save(state._replace(step=step))
    assert c.all_steps() == [1, 2, 4]
    # Each call replaces the set: step 1 goes at the next clean-up.
    c.keep_steps([2])
    c.save(state._replace(step=5))
    assert c.all_steps() == [2, 5]


def test_last_good_checkpoint_outlives_max_to_keep(tmp_path):
  state = make_init()
  with og.Checkpointer(tmp_path, save_interval_steps=1, max_to_keep=2) as c:
    for step in range(1, 7):
      c.save(state._replace(step=step), healthy=step in (1, 2))
    c.wait_until_finished()
    assert c.all_steps() == [2, 5, 6]
    assert c.last_good_step() == 2
  # A new process sees the same (health is read back from Orbax metrics).
  with og.Checkpointer(tmp_path, save_interval_steps=1, max_to_keep=2) as c:
    assert c.last_good_step() == 2
    c.save(state._replace(step=7), healthy=False)
    c.wait_until_finished()
    assert c.all_steps() == [2, 6, 7]
    restored, _ = c.restore_last_good(state)
    assert restored.step == 2


def _largest_file(step_dir):
  files = glob.glob(f'{step_dir}/state/**/d/*', recursive=True)
  return max(files, key=os.path.getsize)


def _truncate(step_dir):
  path = _largest_file(step_dir)
  with open(path, 'r+b') as f:
    f.truncate(os.path.getsize(path) // 2)


def _flip_bit(step_dir):
  path = _largest_file(step_dir)
  with open(path, 'r+b') as f:
    f.seek(os.path.getsize(path) // 2)
    byte = f.read(1)[0]
    f.seek(-1, os.SEEK_CUR)
    f.write(bytes([byte ^ 0x01]))


def _garble(relative):
  def corrupt(step_dir):
    with open(os.path.join(step_dir, relative), 'w') as f:
      f.write('{"not json')
  return corrupt


def _delete_manifest(step_dir):
  os.remove(os.path.join(step_dir, 'state', 'manifest.ocdbt'))


def _unfinish(step_dir):
  os.rename(step_dir, f'{step_dir}.orbax-checkpoint-tmp-1234567')


CORRUPTIONS = {
    'truncated data file': (_truncate, r'cannot be read'),
    'deleted file': (_delete_manifest, r'cannot be read|metadata'),
    'garbage array metadata': (_garble('state/_METADATA'), r'metadata'),
    'garbage events json': (_garble('events/metadata'), r'cannot be read'),
    'garbage metrics json': (_garble('metrics/metrics'), r'metrics'),
    'flipped bit': (_flip_bit, r'fingerprint mismatch in .*w'),
    'unfinished save': (_unfinish, r'unfinished save'),
}


def _two_checkpoints(directory, train_step):
  """Saves steps 10 and 20 of a short run; returns the state at step 10."""
  data = make_data()
  with og.Checkpointer(directory, save_interval_steps=10) as ckpt:
    state = train(train_step, make_init(), data, 10)
    ckpt.save(state, data_iter=data)
    at_ten = host(state)
    state = train(train_step, state, data, 10)
    ckpt.save(state, data_iter=data)
  return at_ten


@pytest.mark.parametrize('kind', sorted(CORRUPTIONS))
def test_corrupt_newest_checkpoint_falls_back(tmp_path, train_step, kind):
  corrupt, reason = CORRUPTIONS[kind]
  at_ten = _two_checkpoints(tmp_path, train_step)
  corrupt(str(tmp_path / '20'))
  data = make_data()
  with pytest.warns(CorruptCheckpointWarning, match=rf'step 20.*{reason}'):
    with og.Checkpointer(tmp_path, save_interval_steps=10) as ckpt:
      restored, _ = ckpt.restore_or_init(make_init(), data_iter=data)
      assert restored.step == 10
      assert_trees_equal(host(restored), at_ten)
      assert data.get_state() == {'next_index': 10}
      # Nothing is deleted: the older checkpoint stays, the bad one is set
      # aside, and training goes on past it.
      assert 10 in ckpt.all_steps()
      assert os.listdir(tmp_path / checkpoint_lib.QUARANTINE_DIR / '20')
      state = train(train_step, restored, data, 10)
      assert ckpt.save(state, data_iter=data)
      ckpt.wait_until_finished()
      assert ckpt.all_steps() == [10, 20]


def test_non_finite_parameters_are_never_loaded(tmp_path):
  init = make_init()
  with og.Checkpointer(tmp_path, save_interval_steps=10) as ckpt:
    ckpt.save(init._replace(step=10))
    bad = jax.tree.map(lambda x: x.at[0].set(jnp.nan), init.params)
    ckpt.save(init._replace(step=20, params=bad))
  with pytest.warns(CorruptCheckpointWarning,
                    match=r"step 20.*non-finite parameter values in params\['b'\]"):
    with og.Checkpointer(tmp_path) as ckpt:
      restored, _ = ckpt.restore_or_init(init)
  assert restored.step == 10


def test_every_checkpoint_corrupt_starts_fresh_without_deleting(tmp_path,
                                                               train_step):
  _two_checkpoints(tmp_path, train_step)
  for step in ('10', '20'):
    _garble('state/_METADATA')(str(tmp_path / step))
  init = make_init()
  with pytest.warns(CorruptCheckpointWarning) as record:
    with og.Checkpointer(tmp_path) as ckpt:
      state, events = ckpt.restore_or_init(init)
  assert state is init and events == {}
  assert [str(w.message).split(':')[0] for w in record] == [
      f'Checkpoint step 20 in {tmp_path}', f'Checkpoint step 10 in {tmp_path}'
  ]
  assert sorted(os.listdir(tmp_path / 'corrupted')) == ['10', '20']


def test_changed_model_is_an_error_not_corruption(tmp_path):
  with og.Checkpointer(tmp_path, save_interval_steps=1) as ckpt:
    ckpt.save(make_init()._replace(step=1))
  params = {'w': jnp.zeros((64, 17)), 'b': jnp.zeros(17)}
  other = og.TrainState(0, params, TX.init(params))
  with warnings.catch_warnings():
    warnings.simplefilter('error', CorruptCheckpointWarning)
    with og.Checkpointer(tmp_path) as ckpt:
      with pytest.raises(
          ValueError,
          match=r'(?s)nothing was moved. 7 difference.*\n  params/w: saved'
          r' float32\[64, 16\], target float32\[64, 17\]\n  rng: saved'
          r' uint32\[2\], not in the target'):
        ckpt.restore_or_init(other)
      assert ckpt.all_steps() == [1]


def test_explicit_restore_of_corrupt_step_raises(tmp_path, train_step):
  _two_checkpoints(tmp_path, train_step)
  _flip_bit(str(tmp_path / '20'))
  with og.Checkpointer(tmp_path) as ckpt:
    with pytest.raises(CorruptCheckpointError, match='step 20'):
      ckpt.restore(20, make_init())


def test_bad_arguments(tmp_path):
  with pytest.raises(ValueError, match='save_interval_steps'):
    og.Checkpointer(tmp_path, save_interval_steps=0)
  with pytest.raises(ValueError, match='max_to_keep'):
    og.Checkpointer(tmp_path, max_to_keep=0)
  with og.Checkpointer(tmp_path, save_interval_steps=1) as ckpt:
    with pytest.raises(TypeError, match='get_state'):
      ckpt.save(make_init(), data_iter=iter([1, 2]))

