"""The examples in their fast modes, with the outcomes they promise."""

import importlib.util
import pathlib

import jax
import numpy as np
import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / 'examples'


def load(name: str):
  spec = importlib.util.spec_from_file_location(
      f'examples_{name}', EXAMPLES / f'{name}.py'
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_digits_nnx_classifier_learns_and_skips_the_nan_batch():
  result = load('digits_nnx').main(['--fast'])
  assert result['test_accuracy'] >= 0.90
  assert result['skipped_steps'] == [result['broken_step']]
  assert result['state_untouched_by_nan_batch']


def test_plain_jax_loop_resumes_to_the_same_bits(tmp_path):
  example = load('plain_jax')
  whole = example.main(
      ['--steps', '150', '--checkpoint-dir', str(tmp_path / 'whole')]
  )
  assert whole['test_accuracy'] >= 0.90
  assert whole['skipped_steps'] == whole['fault_steps'] == [50, 100]
  resumed_dir = str(tmp_path / 'resumed')
  stopped = example.main(
      ['--steps', '150', '--checkpoint-dir', resumed_dir, '--stop-after', '80']
  )
  assert stopped['step'] == 80
  resumed = example.main(['--steps', '150', '--checkpoint-dir', resumed_dir])
  assert resumed['step'] == 150
  assert resumed['params_sha256'] == whole['params_sha256']


def test_sharded_example_skips_on_every_shard_and_keeps_shardings():
  result = load('sharded').main(['--steps', '60'])
  assert result['kernel_shards'] == 8
  assert result['skipped_steps'] == [result['nan_step']]
  assert result['shardings_preserved']
  assert result['restored_equal']
  assert result['test_accuracy'] >= 0.90


def test_sharded_example_names_the_device_count_it_needs(monkeypatch):
  example = load('sharded')
  monkeypatch.setattr(example, 'DEVICES', 4096)
  with pytest.raises(SystemExit, match='needs 4096 devices'):
    example.main([])


@pytest.mark.parametrize('name', ['nnx_fit', 'linen_fit'])
def test_flax_fit_examples_hold_the_nan_batch_and_resume_to_the_same_bits(
    name, tmp_path):
  example = load(name)
  args = ['--steps', '120']
  whole = example.main([*args, '--checkpoint-dir', str(tmp_path / 'whole')])
  assert whole['step'] == 120 and whole['skipped_steps'] == [40]
  assert whole['statistics_finite'] and whole['test_accuracy'] >= 0.85
  resumed_dir = str(tmp_path / 'resumed')
  assert example.main([*args, '--checkpoint-dir', resumed_dir,
                       '--stop-after', '70'])['step'] == 70
  resumed = example.main([*args, '--checkpoint-dir', resumed_dir])
  assert resumed['step'] == 120 and resumed['skipped_steps'] == [40]
  if name == 'nnx_fit':
    assert resumed['params_sha256'] == whole['params_sha256']
  else:
    jax.tree.map(np.testing.assert_array_equal, resumed['params'],
                 whole['params'])
