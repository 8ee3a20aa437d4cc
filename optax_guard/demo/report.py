"""``report.png``: the demo's two runs, drawn from its logs alone.

Three panels share the step axis: held-out loss, training loss, and the
gradient norm against the clip threshold. Faults are shaded; skipped steps,
rollbacks and the preemption resume are marked. Steps a rollback discarded
are drawn faded, as they no longer lead to the final model.
"""

import json
import math
import os
import pathlib
from typing import Any

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
from matplotlib import transforms  # pylint: disable=g-import-not-at-top
from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

from optax_guard.demo import faults as faults_lib

REPORT_FILE = 'report.png'
COLORS = {'plain': '#d62728', 'guarded': '#1f77b4'}
LABELS = {
    'plain': 'plain optax (adamw + clip_by_global_norm)',
    'guarded': 'optax_guard (guard + ZClip + spike skip + checkpoints)',
}
FAULT_COLORS = {
    'spike': '#ff7f0e', 'poison': '#9467bd', 'preempt': '#7f7f7f',
    'nan': '#8c564b', 'ramp': '#e377c2', 'shift': '#17becf',
}
ZCLIP_Z = 2.5
FAULT_ROW_POINTS = 11  # The height of a row of fault names (8-point text).


# Strict JSON has no NaN or Infinity: og.fit's logs and summary.json write
# them as strings, read back as math's constants (one object each, so that
# two reads of one file compare equal: a container compares items by
# identity first).
_NON_FINITE = {'nan': math.nan, 'inf': math.inf, '-inf': -math.inf}


def _from_json(value: Any) -> Any:
  if isinstance(value, dict):
    return {key: _from_json(item) for key, item in value.items()}
  return _NON_FINITE.get(value, value) if isinstance(value, str) else value


def _to_json(value: Any) -> Any:
  if isinstance(value, dict):
    return {key: _to_json(item) for key, item in value.items()}
  finite = not isinstance(value, float) or math.isfinite(value)
  return value if finite else str(value)  # 'nan', 'inf' or '-inf'.


def read_jsonl(path: pathlib.Path) -> list[dict[str, Any]]:
  """The records of a JSON-lines log of :func:`optax_guard.fit`."""
  lines = path.read_text().splitlines() if path.exists() else []
  return [_from_json(json.loads(line)) for line in lines]


def read_summary(path: pathlib.Path) -> dict[str, Any]:
  """``summary.json``: ``{run: {name: value}}``, ``{}`` if not written yet."""
  return _from_json(json.loads(path.read_text())) if path.exists() else {}


def write_json(path: pathlib.Path, value: dict[str, Any]) -> None:
  """Writes ``value`` as strict JSON at once: a kill leaves the old file or
  the new one."""
  temporary = path.with_suffix('.tmp')
  temporary.write_text(
      json.dumps(_to_json(value), indent=1, allow_nan=False) + '\n')
  os.replace(temporary, path)


def load_run_dir(run_dir: os.PathLike) -> dict[str, Any]:
  """The logs of a demo directory; a clear error for anything else."""
  run_dir = pathlib.Path(run_dir)
  if not (run_dir / 'config.json').exists():
    raise ValueError(
        f'{run_dir} is not an optax-guard demo directory (no config.json);'
        ' create one with `optax-guard demo --out DIR`.')
  runs = {run: read_jsonl(run_dir / run / 'metrics.jsonl') for run in COLORS}
  if not any(runs.values()):
    raise ValueError(f'{run_dir} holds no logged steps yet.')
  events = {run: read_jsonl(run_dir / run / 'events.jsonl') for run in COLORS}
  return {'config': json.loads((run_dir / 'config.json').read_text()),
          'runs': runs, 'events': events,
          'summary': read_summary(run_dir / 'summary.json')}


def _segments(records: list[dict[str, Any]], events: list[dict[str, Any]]):
  """Splits a run into ``(records, kept)`` pieces of consecutive steps.

  ``kept`` is False for the steps whose updates a rollback undid (from the
  restored checkpoint to the step that diverged).
  """
  undone = set()
  for event in events:
    if event['kind'] == 'rollback':
      undone.update(range(event['to_step'] + 1, event['step'] + 1))
  pieces: list[tuple[list[dict[str, Any]], bool]] = []
  previous_step = None
  for record in records:
    kept = record['step'] not in undone
    if (not pieces or pieces[-1][1] != kept
        or record['step'] != previous_step + 1):
      # Overlap by one step so that the line stays joined where it is.
      joined = pieces and record['step'] == previous_step + 1
      pieces.append(([pieces[-1][0][-1]] if joined else [], kept))
    pieces[-1][0].append(record)
    previous_step = record['step']
  return pieces


def _clip_bound(run: str, record: dict[str, Any], clip_norm: float) -> float:
  """The norm above which the run clips (ZClip's bound once warmed up)."""
  if run == 'guarded' and record.get('zclip_mean', 0) > 0:
    return min(clip_norm, record['zclip_mean'] + ZCLIP_Z * record['zclip_std'])
  return clip_norm


def _finite(value: Any) -> bool:
  return value is not None and math.isfinite(value)


def _plot_run(axes, run, records, events, clip_norm):
  color = COLORS[run]
  loss_ax, train_ax, norm_ax = axes
  for piece, kept in _segments(records, events):
    style = {'color': color, 'alpha': 1.0 if kept else 0.25, 'linewidth': 1.0}
    steps = [r['step'] for r in piece]
    train_ax.plot(steps, [r['loss'] if _finite(r['loss']) else math.nan
                          for r in piece], **style)
    norm_ax.plot(steps, [r['grad_norm'] for r in piece], **style)
    norm_ax.plot(steps, [_clip_bound(run, r, clip_norm) for r in piece],
                 color=color, alpha=style['alpha'], linewidth=1.2,
                 linestyle='--')
    if not kept:
      undone_evals = [r for r in piece if 'eval_loss' in r]
      loss_ax.plot([r['step'] for r in undone_evals],
                   [r['eval_loss'] for r in undone_evals], linestyle='none',
                   marker='o', markersize=3, **style)
  # One line through the evaluations of the model that carried on.
  evals = [r for piece, kept in _segments(records, events) if kept
           for r in piece if 'eval_loss' in r]
  loss_ax.plot([r['step'] for r in evals], [r['eval_loss'] for r in evals],
               marker='o', markersize=3, color=color, linewidth=1.0)
  top = transforms.blended_transform_factory
  # Where the run turned NaN for good.
  dead = next((r for r in records if not _finite(r['loss'])
               and run == 'plain'), None)
  if dead is not None:
    for ax in axes:
      ax.axvline(dead['step'], color=color, linestyle=':', linewidth=1.2)
    loss_ax.text(dead['step'], 0.5, '  plain run is NaN from here',
                 color=color, fontsize=8,
                 transform=top(loss_ax.transData, loss_ax.transAxes))
  skipped = [r for r in records if r.get('skipped')]
  if skipped:
    train_ax.plot(
        [r['step'] for r in skipped], [0.96] * len(skipped), linestyle='none',
        marker='v', color=color, markersize=5,
        transform=top(train_ax.transData, train_ax.transAxes),
        label=f'{run}: skipped step')
  for event in events:
    if event['kind'] == 'rollback':
      train_ax.annotate(
          '', xy=(event['to_step'], 0.85), xytext=(event['step'], 0.85),
          xycoords=top(train_ax.transData, train_ax.transAxes),
          arrowprops={'arrowstyle': '->', 'color': color, 'linewidth': 1.5})
      train_ax.text(
          event['to_step'], 0.72,
          f'rollback to step {event["to_step"]},\nskipping steps'
          f' {event["to_step"] + 1}-{event["resume_step"]}',
          color=color, fontsize=8,
          transform=top(train_ax.transData, train_ax.transAxes))
    elif event['kind'] == 'resumed':
      for ax in axes:
        ax.axvline(event['step'], color=color, linestyle='-.', linewidth=1)
      train_ax.text(event['step'], 0.65, ' resumed from disk', color=color,
                    fontsize=8,
                    transform=top(train_ax.transData, train_ax.transAxes))


def _name_faults(figure, ax, windows) -> int:
  """Names each fault above ``ax`` at its first step; a name that would
  touch another goes up a row. Returns the rows used."""
  renderer = figure.canvas.get_renderer()
  above = transforms.blended_transform_factory(ax.transData, ax.transAxes)
  placed = []  # (row, left, right) in pixels, with a small gap.
  for name, (start, _) in windows.items():
    row = 0
    while True:
      text = ax.text(
          start, 1, name, color=FAULT_COLORS[name], fontsize=8,
          transform=transforms.offset_copy(
              above, figure, y=FAULT_ROW_POINTS * row + 2, units='points'))
      box = text.get_window_extent(renderer)
      if not any(row == r and box.x0 < right + 4 and left < box.x1 + 4
                 for r, left, right in placed):
        break
      text.remove()
      row += 1
    placed.append((row, box.x0, box.x1))
  return 1 + max((row for row, _, _ in placed), default=0)


def render(run_dir: os.PathLike, output: os.PathLike = None) -> pathlib.Path:
  """Draws ``report.png`` (or ``output``) from the logs of ``run_dir``."""
  output = pathlib.Path(output or pathlib.Path(run_dir) / REPORT_FILE)
  figure = draw(run_dir)
  figure.savefig(output, dpi=110)
  plt.close(figure)
  return output


def draw(run_dir: os.PathLike) -> Figure:
  """The report's figure, from the logs of ``run_dir``."""
  logs = load_run_dir(run_dir)
  figure, axes = plt.subplots(
      3, 1, figsize=(11, 10.5), sharex=True, layout='constrained',
      gridspec_kw={'height_ratios': [1.2, 1, 1]})
  loss_ax, train_ax, norm_ax = axes
  config = logs['config']
  windows = faults_lib.schedule(config['faults'], config['steps'])
  for name, (start, end) in windows.items():
    for ax in axes:
      if end > start:
        ax.axvspan(start - 0.5, end + 0.5, linewidth=0,
                   color=FAULT_COLORS[name], alpha=0.15)
      else:
        ax.axvline(start, color=FAULT_COLORS[name], alpha=0.6, linewidth=2)
  for run, records in logs['runs'].items():
    if records:
      _plot_run(axes, run, records, logs['events'][run], config['clip_norm'])
  for run in COLORS:
    label = LABELS[run]
    if run in logs['summary']:
      label += f': final held-out loss {logs["summary"][run]["final_loss"]:.3f}'
    loss_ax.plot([], [], color=COLORS[run], label=label)
  loss_ax.set_ylabel('held-out loss')
  train_ax.set_ylabel('training loss (log)')
  train_ax.set_yscale('log')
  norm_ax.set_ylabel('grad norm (log)')
  norm_ax.set_yscale('log')
  norm_ax.plot([], [], color='k', linestyle='--', label='clip threshold')
  norm_ax.set_xlabel('step')
  norm_ax.set_xlim(0, logs['config']['steps'] + 5)
  for ax in axes:
    ax.grid(alpha=0.3)
  # One legend for all panels, under them, where it covers no mark.
  handles = [h for ax in axes for h in ax.get_legend_handles_labels()[0]]
  figure.legend(handles=handles, loc='outside lower center', ncol=2,
                fontsize=8, frameon=False)
  figure.draw_without_rendering()  # The final layout, for the fault names.
  rows = _name_faults(figure, loss_ax, windows)
  loss_ax.set_title(
      'optax-guard demo: the same model and batches, with faults injected',
      pad=4 + FAULT_ROW_POINTS * rows)
  return figure
