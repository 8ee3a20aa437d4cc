"""og.batches: grain pipelines of in-memory arrays, restored by Checkpointer."""

import json
import os
import signal
import subprocess
import sys

import grain
import hypothesis
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import strategies as st

import optax_guard as og
from optax_guard.host import data as data_lib
from tests import data_worker

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def indexed(size):
  """Examples that name themselves, in a nested pytree."""
  return {'i': np.arange(size), 'pair': (np.arange(size) * 2.0,
                                         np.ones((size, 3), np.int8))}


@hypothesis.settings(max_examples=30, deadline=None)
@hypothesis.given(
    size=st.integers(1, 40), data=st.data(), seed=st.integers(0, 2**31),
    num_epochs=st.integers(1, 3),
)
def test_each_epoch_is_a_fresh_permutation_of_full_batches(
    size, data, seed, num_epochs
):
  batch_size = data.draw(st.integers(1, size), label='batch_size')
  per_epoch = size // batch_size
  stream = list(og.batches(indexed(size), batch_size, seed=seed,
                           num_epochs=num_epochs))
  assert len(stream) == num_epochs * per_epoch
  for batch in stream:
    i = batch['i']
    assert i.shape == (batch_size,)
    np.testing.assert_array_equal(batch['pair'][0], i * 2.0)
    assert batch['pair'][1].shape == (batch_size, 3)
    assert batch['pair'][1].dtype == np.int8
  for epoch in range(num_epochs):
    rows = np.concatenate(
        [b['i'] for b in stream[epoch * per_epoch:(epoch + 1) * per_epoch]]
    )
    expected = np.random.default_rng((seed, epoch)).permutation(size)
    np.testing.assert_array_equal(rows, expected[:per_epoch * batch_size])


def test_every_position_resumes_to_the_same_stream_bitwise():
  arrays = {'x': np.random.default_rng(0).normal(size=(10, 3))}
  stream = [b['x'] for b in og.batches(arrays, 3, seed=5, num_epochs=3)]
  assert len(stream) == 9
  for position in range(len(stream) + 1):
    resumed = og.batches(arrays, 3, seed=5, num_epochs=3)
    resumed.set_state({'next_index': position})
    rest = [b['x'] for b in resumed]
    assert [r.tobytes() for r in rest] == [
        s.tobytes() for s in stream[position:]
    ]
  # Another seed is another stream: the state alone does not restore it.
  other = og.batches(arrays, 3, seed=6, num_epochs=3)
  assert not np.array_equal(next(other)['x'], stream[0])


def test_the_dataset_composes_with_grain_transformations():
  dataset = data_lib.batch_dataset(indexed(8), 4, seed=1).map_with_index(
      lambda index, batch: {'index': index, 'rows': batch['i']}
  )
  loader = iter(dataset.to_iter_dataset(data_lib.IN_MEMORY_READ_OPTIONS))
  seen = [next(loader) for _ in range(5)]
  assert [b['index'] for b in seen] == [0, 1, 2, 3, 4]
  np.testing.assert_array_equal(seen[4]['rows'], dataset[4]['rows'])
  assert loader.get_state() == {'next_index': 5}


def test_checkpointer_saves_the_grain_state_as_json(tmp_path):
  data = og.batches(indexed(12), 4, seed=2)
  for _ in range(4):  # past the end of the first epoch (3 batches)
    next(data)
  tx = optax.sgd(0.1)
  params = {'w': jnp.zeros(2)}
  state = og.TrainState(4, params, tx.init(params))
  with og.Checkpointer(tmp_path, save_interval_steps=4) as ckpt:
    assert ckpt.save(state, data_iter=data)
  expected = [next(data)['i'] for _ in range(4)]
  # Orbax's JsonSave writes the item as one JSON file, readable by anyone.
  saved = (tmp_path / '4' / 'data_iterator' / 'metadata').read_text()
  assert json.loads(saved) == {'encoding': 'json',
                               'value': {'next_index': 4}}
  fresh = og.batches(indexed(12), 4, seed=2)
  with og.Checkpointer(tmp_path, save_interval_steps=4) as ckpt:
    restored, _ = ckpt.restore_or_init(state._replace(step=0), data_iter=fresh)
  assert restored.step == 4
  assert fresh.get_state() == {'next_index': 4}
  for want in expected:
    np.testing.assert_array_equal(next(fresh)['i'], want)


def test_checkpointer_round_trips_a_grain_data_loader(tmp_path):
  """grain.DataLoader's state is bytes: the Checkpointer stores it as base64."""

  def loader():
    return iter(grain.DataLoader(
        data_source=grain.sources.RangeDataSource(0, 12, 1),
        sampler=grain.samplers.IndexSampler(
            12, shuffle=True, seed=3, num_epochs=2
        ),
        operations=[grain.transforms.Batch(4)],
        worker_count=0,
    ))

  data = loader()
  next(data), next(data)
  assert isinstance(data.get_state(), bytes)
  tx = optax.sgd(0.1)
  params = {'w': jnp.zeros(2)}
  state = og.TrainState(2, params, tx.init(params))
  with og.Checkpointer(tmp_path, save_interval_steps=2) as ckpt:
    assert ckpt.save(state, data_iter=data)
  rest = [batch.tolist() for batch in data]
  assert len(rest) == 4
  fresh = loader()
  with og.Checkpointer(tmp_path, save_interval_steps=2) as ckpt:
    ckpt.restore_or_init(state._replace(step=0), data_iter=fresh)
  assert [batch.tolist() for batch in fresh] == rest


def test_bad_arguments_name_the_problem():
  with pytest.raises(ValueError, match=r'batch_size must be an int in \[1, 4\]'
                     r', got 5'):
    og.batches({'x': np.zeros(4)}, 5)
  with pytest.raises(ValueError, match='same first dimension.*got leading'
                     r' sizes \[4, 5\]'):
    og.batches({'x': np.zeros(4), 'y': np.zeros(5)}, 2)
  with pytest.raises(ValueError, match='non-empty pytree'):
    og.batches({}, 1)
  with pytest.raises(ValueError, match=r'got leading sizes \[None\]'):
    og.batches({'x': np.float32(1.0)}, 1)
  with pytest.raises(ValueError, match='seed must be an int >= 0, got -1'):
    og.batches({'x': np.zeros(4)}, 2, seed=-1)
  with pytest.raises(ValueError, match='num_epochs must be an int >= 1, got 0'):
    og.batches({'x': np.zeros(4)}, 2, num_epochs=0)


def load_records(directory):
  return {
      int(name[:-len('.npz')]): dict(np.load(os.path.join(directory, name)))
      for name in os.listdir(directory)
  }


def assert_same_batches(got, want):
  assert sorted(got) == sorted(want)
  for name in want:
    assert got[name].dtype == want[name].dtype
    assert got[name].tobytes() == want[name].tobytes(), name


def run_worker(*args):
  env = dict(os.environ)
  env['PYTHONPATH'] = os.pathsep.join(
      p for p in (ROOT, env.get('PYTHONPATH')) if p
  )
  return subprocess.run(
      [sys.executable, data_worker.__file__, *map(str, args)], env=env,
      capture_output=True, text=True, timeout=300, check=False,
  )


def test_kill_9_mid_run_resumes_on_the_same_batches(tmp_path):
  num_steps, kill_at = 24, 14
  assert data_worker.train(
      str(tmp_path / 'whole'), str(tmp_path / 'whole_batches'), num_steps
  ) == num_steps
  whole = load_records(tmp_path / 'whole_batches')
  assert sorted(whole) == list(range(1, num_steps + 1))

  directory = tmp_path / 'killed'
  killed = run_worker(directory, tmp_path / 'killed_batches', num_steps,
                      kill_at)  # SIGKILLs itself after recording step 14.
  assert killed.returncode == -signal.SIGKILL, killed.stderr
  before_kill = load_records(tmp_path / 'killed_batches')
  assert sorted(before_kill) == list(range(1, kill_at + 1))

  # The restart runs here: only the kill needs a process of its own.
  assert data_worker.train(
      str(directory), str(tmp_path / 'resumed_batches'), num_steps
  ) == num_steps
  after = load_records(tmp_path / 'resumed_batches')
  resume_from = min(after) - 1
  # Saves every 4 steps; the one at 12 may still have been writing.
  assert resume_from in (8, 12)
  assert sorted(after) == list(range(resume_from + 1, num_steps + 1))
  # 4 batches an epoch: the stream after the resume crosses three epochs.
  for step in range(1, num_steps + 1):
    got = after[step] if step > resume_from else before_kill[step]
    assert_same_batches(got, whole[step])
