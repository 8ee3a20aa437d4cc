"""``summary.json`` and ``report.png``: the demo's results, from its files.

The picture is :func:`optax_guard.plot_runs` of the two runs' ``og.fit``
logs with the faults shaded. ``summary.json`` is strict JSON, as the logs:
a non-finite number is written ``"nan"``, ``"inf"`` or ``"-inf"``.
"""

import json
import math
import os
import pathlib
from typing import Any

import optax_guard as og
from optax_guard.demo import faults as faults_lib

REPORT_FILE = 'report.png'
COLORS = {'plain': 'tab:red', 'guarded': 'tab:blue'}
LABELS = {
    'plain': 'plain optax (adamw + clip_by_global_norm)',
    'guarded': 'optax_guard (guard + ZClip + spike skip + checkpoints)',
}
# One object each, so that two reads of one file compare equal (a container
# compares its items by identity first, and NaN != NaN).
_NON_FINITE = {'nan': math.nan, 'inf': math.inf, '-inf': -math.inf}


def read_summary(path: pathlib.Path) -> dict[str, Any]:
  """``summary.json``: ``{run: {name: value}}``, ``{}`` if not written yet."""
  rows = json.loads(path.read_text()) if path.exists() else {}
  return {run: {key: _NON_FINITE.get(value, value) if isinstance(value, str)
                else value for key, value in row.items()}
          for run, row in rows.items()}


def write_json(path: pathlib.Path, value: dict[str, Any]) -> None:
  """Writes ``value`` (at most two levels of dicts) as strict JSON at once:
  a kill leaves the old file or the new one."""
  strict = lambda x: x if not isinstance(x, float) or math.isfinite(x) else (
      str(x))  # 'nan', 'inf' or '-inf'.
  value = {key: {k: strict(v) for k, v in item.items()}
           if isinstance(item, dict) else strict(item)
           for key, item in value.items()}
  temporary = path.with_suffix('.tmp')
  temporary.write_text(json.dumps(value, indent=1, allow_nan=False) + '\n')
  os.replace(temporary, path)


def draw(run_dir: os.PathLike):
  """The report's ``matplotlib`` figure, from the files of ``run_dir``."""
  run_dir = pathlib.Path(run_dir)
  if not (run_dir / 'config.json').exists():
    raise ValueError(
        f'{run_dir} is not an optax-guard demo directory (no config.json)'
        ' nor a log_dir of og.fit (no metrics.jsonl).')
  config = json.loads((run_dir / 'config.json').read_text())
  runs = {run: run_dir / run for run in COLORS
          if (run_dir / run / 'metrics.jsonl').exists()}
  if not runs:
    raise ValueError(f'{run_dir} holds no logged steps yet.')
  summary = read_summary(run_dir / 'summary.json')
  labels = {run: LABELS[run] + (f': final held-out loss'
                                f' {summary[run]["final_loss"]:.3f}'
                                if run in summary else '') for run in runs}
  return og.plot_runs(
      runs, windows=faults_lib.schedule(config['faults'], config['steps']),
      labels=labels, colors=COLORS, num_steps=config['steps'],
      title='optax-guard demo: the same model and batches, with faults'
      ' injected')


def render(run_dir: os.PathLike,
           output: os.PathLike | None = None) -> pathlib.Path:
  """Draws ``report.png`` (or ``output``) from the files of ``run_dir``."""
  output = pathlib.Path(output or pathlib.Path(run_dir) / REPORT_FILE)
  draw(run_dir).savefig(output, dpi=110)
  return output
