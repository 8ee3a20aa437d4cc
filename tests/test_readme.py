"""The README's example runs as written, and its numbers are the benchmarks'."""

import contextlib
import io
import json
import pathlib
import re

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / 'README.md'
RESULTS = ROOT / 'benchmarks' / 'results.json'


def test_readme_example_runs_and_prints_what_the_readme_shows():
  text = README.read_text()
  code = re.findall(r'```python\n(.*?)```', text, re.S)[0]
  namespace = {}
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    exec(compile(code, str(README), 'exec'), namespace)  # noqa: S102
  shown = re.search(r'It prints `(.*?)`', text).group(1)
  assert printed.getvalue() == shown + '\n'
  metrics = namespace['metrics']
  # w = 0 predicts 0 for targets 1: loss 1, and each of the three weights
  # has gradient 2/8 * 8 * (0 - 1) = -2, so the norm is 2 * sqrt(3).
  assert float(metrics['loss']) == 1.0
  assert not bool(metrics['skipped'])
  assert float(metrics['grad_norm']) == np.float32(2 * np.sqrt(3))


def _cost_section() -> str:
  text = README.read_text()
  return text.split('## What it costs\n', 1)[1].split('\n## ', 1)[0]


def _row(section: str, label: str) -> list[str]:
  """The cells after the first of the table row whose label holds ``label``."""
  rows = [line for line in section.splitlines()
          if line.startswith('|') and label in line.split('|')[1]]
  assert len(rows) == 1, (label, rows)
  return [cell.strip() for cell in rows[0].strip('|').split('|')[1:]]


def test_readme_quotes_the_committed_benchmark_results():
  """Every number of "What it costs" is the one in benchmarks/results.json,
  formatted as BENCHMARKS.md formats it: rerun the benchmarks and this test
  says which README numbers to update."""
  from benchmarks import report  # pylint: disable=g-import-not-at-top
  from benchmarks import train_step
  from benchmarks import update_cost as uc
  from benchmarks import workloads as w

  results = json.loads(RESULTS.read_text())['sections']
  section = _cost_section()
  update = results['update']
  sizes = sorted({row['params'] for row in update['rows']})

  def ratios(name):
    return [f'{row["ratio"]:.3f}×' for count in sizes
            for row in update['rows']
            if (row['params'], row['group'], row['name'])
            == (count, 'headline', name)]

  for label, name in (('fused as in', uc.GUARD_FUSED),
                      ('decision on the gradients alone', uc.UNCHECKED_FUSED),
                      ('floor', uc.FLOOR),
                      ('pure transformation', uc.GUARD_PURE),
                      ('optax `chain', uc.OPTAX_CLIP),
                      ('optax `apply_if_finite', uc.OPTAX_APPLY_IF_FINITE)):
    assert _row(section, label) == ratios(name), label
  over_floor = ' / '.join(
      f'{update["comparisons"][str(count)]["unchecked_fused_over_floor"]["ratio"]:.3f}×'
      for count in sizes[1:])
  assert f'Its decision alone costs {over_floor} the floor' in section
  over_apply_if_finite = sorted(
      update['comparisons'][str(count)]['guard_fused_over_apply_if_finite']
      ['ratio'] for count in sizes)
  assert (f'{over_apply_if_finite[0]:.2f}-{over_apply_if_finite[-1]:.2f}×'
          f" optax's `apply_if_finite`") in ' '.join(section.split())

  step = results['train_step']
  guarded = next(r for r in step['rows'] if r['name'] == train_step.GUARDED)
  memory = next(r for r in results['memory']['rows']
                if (r['params'], r['name']) == (sizes[-1], uc.GUARD_FUSED))
  faults = results['faults']
  expected = {
      'plain optax step': f'{guarded["ratio"]:.3f}×',
      'bare `adamw` step':
          f'{step["comparisons"]["guarded_over_bare"]["ratio"]:.3f}×',
      '`nnx.Optimizer.update`':
          f'{step["comparisons"]["nnx_pure_over_nnx_fused"]["ratio"]:.3f}×',
      'extra memory': w.format_bytes(memory['extra_peak_bytes']),
      'one async save costs':
          f'{report.save_cost(results["checkpointing"]).share_default:+.2%}',
      'fault campaign': f'{faults["injected_total"]},'
                        f' {0 if faults["params_always_finite"] else "some"}',
  }
  for label, value in expected.items():
    assert _row(section, label) == [value], label
