"""Pictures of training runs, drawn from the logs :func:`optax_guard.fit` writes.

:func:`read_run_log` reads a ``log_dir`` (``metrics.jsonl`` and
``events.jsonl``); :func:`plot_runs` draws one run or several on one step
axis: the evaluation loss (when ``eval_fn`` logged one), the training loss
and the gradient norm, with skipped steps, rollbacks and resumes marked and
the steps a rollback undid drawn faded, as they no longer lead to the final
model. matplotlib (the ``examples`` extra) is imported only to draw.
"""

import math
import os
import pathlib
from collections.abc import Mapping
from typing import Any, NamedTuple

from optax_guard.host import runlog

# The logs are strict JSON: a non-finite number is written as a string.
_NON_FINITE = {'nan': math.nan, 'inf': math.inf, '-inf': -math.inf}
_ROW_POINTS = 11  # The height of a row of window names (8-point text).


class RunLog(NamedTuple):
  """What :func:`optax_guard.fit` logged in one ``log_dir``.

  Attributes:
    metrics: one dict per step (``step``, ``time``, the step's scalar
      metrics and, at evaluated steps, ``eval_fn``'s), non-finite numbers as
      floats.
    events: one dict per event (``kind``, ``step`` and its fields).
  """

  metrics: list[dict[str, Any]]
  events: list[dict[str, Any]]


def _decoded(value: Any) -> Any:
  if isinstance(value, str):
    return _NON_FINITE.get(value, value)
  return value


def _read_jsonl(path: pathlib.Path) -> list[dict[str, Any]]:
  return [{key: _decoded(value) for key, value in record.items()}
          for record in runlog.read_jsonl(path)]


def read_run_log(log_dir: str | os.PathLike) -> RunLog:
  """The metrics and events of ``og.fit(..., log_dir=log_dir)``.

  Examples:
    >>> import json, tempfile, pathlib
    >>> import optax_guard as og
    >>> log_dir = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (log_dir / 'metrics.jsonl').write_text(
    ...     json.dumps({'step': 1, 'loss': 'nan'}) + '\\n')
    >>> og.read_run_log(log_dir).metrics
    [{'step': 1, 'loss': nan}]

  Args:
    log_dir: the ``log_dir`` given to :func:`optax_guard.fit`.

  Returns:
    A :class:`RunLog`; a run that logged no event has ``events == []``.

  Raises:
    ValueError: ``log_dir`` holds no ``metrics.jsonl``.
  """
  path = pathlib.Path(log_dir)
  if not (path / 'metrics.jsonl').exists():
    raise ValueError(
        f'{log_dir} holds no metrics.jsonl: pass the log_dir given to'
        ' og.fit(..., log_dir=...).')
  return RunLog(_read_jsonl(path / 'metrics.jsonl'),
                _read_jsonl(path / 'events.jsonl'))


def _finite(value: Any) -> bool:
  return isinstance(value, (int, float)) and math.isfinite(value)


def _segments(log: RunLog) -> list[tuple[list[dict[str, Any]], bool]]:
  """The run as ``(records, kept)`` pieces of consecutive steps; ``kept`` is
  False where a rollback undid the updates (the restored checkpoint's step
  to the step that diverged)."""
  undone: set[int] = set()
  for event in log.events:
    if event['kind'] == 'rollback':
      undone.update(range(event['to_step'] + 1, event['step'] + 1))
  pieces: list[tuple[list[dict[str, Any]], bool]] = []
  previous = -1
  for record in log.metrics:
    step, kept = record['step'], record['step'] not in undone
    if not pieces or pieces[-1][1] != kept or step != previous + 1:
      # Overlap by one step so that the line stays joined where it is.
      joined = bool(pieces) and step == previous + 1
      pieces.append(([pieces[-1][0][-1]] if joined else [], kept))
    pieces[-1][0].append(record)
    previous = step
  return pieces


def _values(records, name):
  return [r[name] if _finite(r.get(name)) else math.nan for r in records]


def _plot_log(axes, name, log, color, eval_metric):
  """One run's lines and marks; ``axes[0]`` is the evaluation panel when
  there is one."""
  from matplotlib import transforms  # pylint: disable=g-import-not-at-top

  *eval_ax, loss_ax, norm_ax = axes
  on_top = lambda ax: transforms.blended_transform_factory(
      ax.transData, ax.transAxes)
  pieces = _segments(log)
  for piece, kept in pieces:
    style = {'color': color, 'alpha': 1.0 if kept else 0.25, 'linewidth': 1.0}
    steps = [r['step'] for r in piece]
    loss_ax.plot(steps, _values(piece, 'loss'), **style)
    norm_ax.plot(steps, _values(piece, 'grad_norm'), **style)
    # The norm clipped to; a gap where the step was not clipped.
    norm_ax.plot(steps, _values(piece, 'clip_threshold'), **{
        **style, 'linestyle': '--', 'linewidth': 1.2})
    evaluated = [r for r in piece if eval_metric in r]
    if eval_ax and not kept and evaluated:
      eval_ax[0].plot([r['step'] for r in evaluated],
                      _values(evaluated, eval_metric), linestyle='none',
                      marker='o', markersize=3, **style)
  if eval_ax:  # One line through the evaluations of the model that carried on.
    evaluated = [r for piece, kept in pieces if kept for r in piece
                 if eval_metric in r]
    eval_ax[0].plot([r['step'] for r in evaluated],
                    _values(evaluated, eval_metric), marker='o', markersize=3,
                    color=color, linewidth=1.0)
  if log.metrics and not _finite(log.metrics[-1].get('loss')):
    # Where the loss turned non-finite for good.
    dead = log.metrics[-1]['step']
    for record in reversed(log.metrics):
      if _finite(record.get('loss')):
        break
      dead = record['step']
    for ax in axes:
      ax.axvline(dead, color=color, linestyle=':', linewidth=1.2)
    axes[0].text(dead, 0.5, f'  {name} is NaN from here', color=color,
                 fontsize=8, transform=on_top(axes[0]))
  skipped = [r['step'] for r in log.metrics if r.get('skipped')]
  if skipped:
    loss_ax.plot(skipped, [0.96] * len(skipped), linestyle='none', marker='v',
                 color=color, markersize=5, transform=on_top(loss_ax),
                 label=f'{name}: skipped step')
  for event in log.events:
    if event['kind'] == 'rollback':
      loss_ax.annotate(
          '', xy=(event['to_step'], 0.85), xytext=(event['step'], 0.85),
          xycoords=on_top(loss_ax),
          arrowprops={'arrowstyle': '->', 'color': color, 'linewidth': 1.5})
      loss_ax.text(
          event['to_step'], 0.72,
          f'rollback to step {event["to_step"]},\nskipping steps'
          f' {event["to_step"] + 1}-{event["resume_step"]}',
          color=color, fontsize=8, transform=on_top(loss_ax))
    elif event['kind'] == 'resumed':
      for ax in axes:
        ax.axvline(event['step'], color=color, linestyle='-.', linewidth=1)
      loss_ax.text(event['step'], 0.65, ' resumed from disk', color=color,
                   fontsize=8, transform=on_top(loss_ax))


def _name_windows(figure, ax, windows, colors) -> int:
  """Names each window above ``ax`` at its first step; a name that would
  touch another goes up a row. Returns the rows used."""
  from matplotlib import transforms  # pylint: disable=g-import-not-at-top

  renderer = figure.canvas.get_renderer()
  above = transforms.blended_transform_factory(ax.transData, ax.transAxes)
  placed: list[tuple[int, float, float]] = []  # (row, left, right) pixels.
  for name, (start, _) in windows.items():
    row = 0
    while True:
      text = ax.text(start, 1, name, color=colors[name], fontsize=8,
                     transform=transforms.offset_copy(
                         above, figure, y=_ROW_POINTS * row + 2,
                         units='points'))
      box = text.get_window_extent(renderer)
      if not any(row == r and box.x0 < right + 4 and left < box.x1 + 4
                 for r, left, right in placed):
        break
      text.remove()
      row += 1
    placed.append((row, box.x0, box.x1))
  return 1 + max((row for row, _, _ in placed), default=0)


def _shade_windows(axes, windows, window_colors) -> None:
  """Shades each window's steps on every panel (one step: a line)."""
  for name, (start, end) in windows.items():
    for ax in axes:
      if end > start:
        ax.axvspan(start - 0.5, end + 0.5, linewidth=0,
                   color=window_colors[name], alpha=0.15)
      else:
        ax.axvline(start, color=window_colors[name], alpha=0.6, linewidth=2)


def plot_runs(
    runs: str | os.PathLike | Mapping[str, str | os.PathLike | RunLog],
    *,
    windows: Mapping[str, tuple[int, int]] | None = None,
    labels: Mapping[str, str] | None = None,
    colors: Mapping[str, str] | None = None,
    eval_metric: str = 'eval_loss',
    title: str | None = None,
    num_steps: int | None = None,
):
  """Draws runs of :func:`optax_guard.fit` from their logs, on one step axis.

  Panels: ``eval_metric`` (when a run logged it: ``fit``'s ``eval_fn``),
  the training loss and the gradient norm (log scales), with the norm a
  clip reduced it to (the ``clip_threshold`` metric, dashed). Skipped steps
  are marked, rollbacks drawn as an arrow back to the restored step and
  the steps they undid faded, resumes from disk drawn as a line, and a run
  whose loss ends non-finite is marked where it turned. ``windows`` shades
  spans of steps (injected faults, a data change) and names them above the
  top panel. One legend sits under the panels, where it covers no mark.

  Examples:
    >>> import pathlib, tempfile
    >>> import jax, optax
    >>> import optax_guard as og
    >>> from optax_guard import testing
    >>> data = og.batches(testing.regression_data(0, 64, dim=4),
    ...                   batch_size=16, seed=0)
    >>> tx = og.guard(optax.adam(1e-2), clip=og.clip_by_global_norm(1.0))
    >>> params = testing.mlp_init(jax.random.key(0), [4, 8, 1])
    >>> state = og.TrainState(0, params, tx.init(params))
    >>> log_dir = pathlib.Path(tempfile.mkdtemp())
    >>> _ = og.fit(og.make_train_step(testing.mse, tx), state, data,
    ...            num_steps=20, log_dir=log_dir, progress=False,
    ...            tensorboard=False)
    >>> figure = og.plot_runs({'adam': log_dir}, windows={'warm-up': (1, 5)})
    >>> figure.savefig(log_dir / 'report.png')
    >>> [ax.get_ylabel() for ax in figure.axes]
    ['training loss (log)', 'grad norm (log)']

  Args:
    runs: a ``log_dir``, or ``{name: log_dir or RunLog}`` for several runs
      (drawn in this order, named in the legend).
    windows: ``{name: (first_step, last_step)}``, shaded (a one-step window
      as a line).
    labels: the legend's text for a run, when not its name.
    colors: a matplotlib color per run name; the default color cycle
      otherwise.
    eval_metric: the evaluation metric of the top panel.
    title: the figure's title.
    num_steps: the last step of the axis (default: the last step logged).

  Returns:
    A ``matplotlib.figure.Figure`` (with an Agg canvas: ``savefig`` writes
    PNG files and no window opens).

  Raises:
    ValueError: a ``log_dir`` with no ``metrics.jsonl``, or no run.
  """
  from matplotlib import figure as figure_lib  # pylint: disable=g-import-not-at-top
  from matplotlib.backends import backend_agg  # pylint: disable=g-import-not-at-top
  from matplotlib.colors import to_hex  # pylint: disable=g-import-not-at-top

  if not isinstance(runs, Mapping):
    runs = {pathlib.Path(runs).name or str(runs): runs}
  if not runs:
    raise ValueError('runs is empty: pass a log_dir or {name: log_dir}.')
  logs = {name: log if isinstance(log, RunLog) else read_run_log(log)
          for name, log in runs.items()}
  windows, labels = dict(windows or {}), dict(labels or {})
  cycle = [to_hex(f'C{i}') for i in range(10)]
  colors = {name: to_hex((colors or {}).get(name, cycle[i % 10]))
            for i, name in enumerate(logs)}
  # The windows take the colors the runs left.
  free = [c for c in cycle if c not in colors.values()] or cycle
  window_colors = {name: free[i % len(free)] for i, name in enumerate(windows)}
  with_eval = any(eval_metric in r for log in logs.values()
                  for r in log.metrics)
  figure = figure_lib.Figure(figsize=(11, 10.5 if with_eval else 7.5),
                             layout='constrained')
  backend_agg.FigureCanvasAgg(figure)
  axes = figure.subplots(2 + with_eval, 1, sharex=True, gridspec_kw={
      'height_ratios': [1.2, 1, 1][-(2 + with_eval):]})
  _shade_windows(axes, windows, window_colors)
  for name, log in logs.items():
    axes[0].plot([], [], color=colors[name], label=labels.get(name, name))
    _plot_log(axes, name, log, colors[name], eval_metric)
  if with_eval:
    axes[0].set_ylabel(eval_metric.replace('_', ' '))
  axes[-2].set_ylabel('training loss (log)')
  axes[-1].set_ylabel('grad norm (log)')
  for ax in axes[-2:]:
    ax.set_yscale('log')
  axes[-1].plot([], [], color='k', linestyle='--', label='clipped to')
  axes[-1].set_xlabel('step')
  last = max((r['step'] for log in logs.values() for r in log.metrics),
             default=1)
  axes[-1].set_xlim(0, (num_steps or last) + 5)
  for ax in axes:
    ax.grid(alpha=0.3)
  handles = [h for ax in axes for h in ax.get_legend_handles_labels()[0]]
  figure.legend(handles=handles, loc='outside lower center', ncol=2,
                fontsize=8, frameon=False)
  figure.draw_without_rendering()  # The final layout, for the names.
  rows = _name_windows(figure, axes[0], windows, window_colors)
  axes[0].set_title(title or '', pad=4 + _ROW_POINTS * rows)
  return figure
