"""The ``optax-guard`` command: ``demo``, ``report`` and ``inspect``.

The benchmarks run from a source checkout as ``python -m benchmarks``.
"""

import argparse
import dataclasses
import json
import logging
import math
import pathlib
import re
import sys
import time
from typing import Any, Optional, Sequence

try:
  from rich import box
  from rich.console import Console
  from rich.logging import RichHandler
  from rich.progress import BarColumn
  from rich.progress import MofNCompleteColumn
  from rich.progress import Progress
  from rich.progress import TextColumn
  from rich.progress import TimeElapsedColumn
  from rich.table import Table
except ImportError as _error:  # rich comes with the [examples] extra.
  _MISSING_DEPENDENCY: Optional[ImportError] = _error
else:
  _MISSING_DEPENDENCY = None

DEFAULT_OUT = 'optax-guard-demo'


def _number(value: Any, digits: int = 4) -> str:
  if value is None:
    return '-'
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)
  return f'{value:.{digits}f}' if isinstance(value, float) else str(value)


def _outcome(run: str, fault: str, metrics: dict[str, Any]) -> str | None:
  """What ``run`` did with ``fault`` (``None``: not yet; a fault over
  several steps is told once, when the guard first acts)."""
  from optax_guard.demo.faults import MULTI_STEP  # pylint: disable=g-import-not-at-top

  if run == 'plain':
    if not math.isfinite(metrics['loss'] + metrics['grad_norm']):
      return 'NaN reached the parameters'
    if fault in MULTI_STEP:
      return 'trained on (plain optax cannot refuse a batch)'
    return f'applied (grad norm {metrics["grad_norm"]:.3g} clipped to 1)'
  if metrics['skipped']:
    return 'skipped, optimizer state held bit for bit'
  return None if fault in MULTI_STEP else 'accepted'


class _RichListener:
  """Shows :func:`run_demo` live: bars on a terminal, lines elsewhere, and a
  note of what each run did with each fault.

  The bar keeps the step count and the elapsed time at 80 columns; output
  to a file or a pipe gets a plain line every ``every`` steps instead.
  Rollbacks are not noted here: ``og.fit``'s recovery warns of them.
  """

  def __init__(self, console: Console, windows=None, every: int = 50):
    self.console = console
    self.windows = windows or {}
    self.every = every
    self.progress = Progress(
        TextColumn('{task.description:<7}'),
        BarColumn(bar_width=12),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn('loss {task.fields[loss]:>6}  skips {task.fields[skips]:>2}'
                   '  rollbacks {task.fields[rollbacks]}'),
        console=console,
        disable=not console.is_terminal,
    )
    self.tasks: dict[str, Any] = {}
    self.counts: dict[str, dict[str, int]] = {}
    self.told: dict[str, set[str]] = {}
    self.slow: dict[str, dict[str, list[int]]] = {}  # Trained on, skipped.

  def start(self, run: str, total: int) -> None:
    if not self.progress.live.is_started:
      self.progress.start()
    self.tasks[run] = self.progress.add_task(
        run, total=total, loss='-', skips=0, rollbacks=0)
    self.counts[run] = {'skipped_step': 0, 'rollback': 0}
    self.told[run], self.slow[run] = set(), {'ramp': [0, 0], 'shift': [0, 0]}

  def _tell(self, run: str, step: int, metrics: dict[str, Any],
            rolled_back: bool) -> None:
    from optax_guard.demo.faults import fault_at  # pylint: disable=g-import-not-at-top

    fault = fault_at(self.windows, step)
    note = lambda text: self.note(run, f'step {step}: {text}')
    if fault not in self.told[run] and (
        outcome := fault and _outcome(run, fault, metrics)):
      self.told[run].add(fault)
      note(f'{fault} -> {outcome}')
    if run == 'guarded' and fault in self.slow[run] and not rolled_back:
      self.slow[run][fault][bool(metrics['skipped'])] += 1
      if step == self.windows[fault][1]:
        note('{} over -> {} of its steps trained on, {} skipped'.format(
            fault, *self.slow[run][fault]))

  def step(self, run: str, state: Any, metrics: dict[str, Any],
           events) -> None:
    counts = self.counts[run]
    for event in events:
      if event.kind == 'resumed':
        counts.update(event.counts)
      elif event.kind in counts:
        counts[event.kind] += 1
    # After a rollback the metrics are those of the step that diverged.
    rollback = next((e for e in events if e.kind == 'rollback'), None)
    self._tell(run, rollback.step if rollback else state.step, metrics,
               rollback is not None)
    task = self.tasks[run]
    fields = {'loss': _number(metrics['loss'], 3),
              'skips': counts['skipped_step'], 'rollbacks': counts['rollback']}
    self.progress.update(task, completed=state.step, **fields)
    total = self.progress.tasks[task].total
    if not self.console.is_terminal and (
        state.step % self.every == 0 or state.step == total):
      elapsed = self.progress.tasks[task].elapsed or 0
      self.console.print(
          f'{run:>8} step {state.step}/{total}  loss {fields["loss"]}  skips'
          f' {fields["skips"]}  rollbacks {fields["rollbacks"]}'
          f'  {elapsed:.0f} s', highlight=False)

  def note(self, run: str, message: str) -> None:
    color = 'red' if run == 'plain' else 'blue'
    self.console.print(f'[{color}]{run:>8}[/] {message}', highlight=False)

  def stop(self) -> None:
    self.progress.stop()


def _summary_table(summary: dict[str, Any]) -> Table:
  table = Table(title='optax-guard demo', box=box.SIMPLE_HEAVY, pad_edge=False)
  table.add_column('run')
  table.add_column('final held-out loss', justify='right')
  table.add_column('finite', justify='center')
  table.add_column('skips', justify='right')
  table.add_column('rollbacks', justify='right')
  table.add_column('params sha256')
  for run in ('plain', 'guarded'):
    if run in summary:
      row = summary[run]
      table.add_row(
          run, _number(row['final_loss']), 'yes' if row['finite'] else 'NO',
          str(row['skips']), str(row['rollbacks']),
          row.get('params_sha256', '-')[:16],
      )
  return table


_SPEC = re.compile(r'^(?P<name>[a-z]+)(@(?P<start>\d+)(-(?P<end>\d+))?)?$')


def parse_faults(specs: Sequence[str], steps: int) -> tuple[str, ...]:
  """``--faults``: each ``NAME``, ``NAME@STEP`` or ``NAME@START-END``
  checked and written out in full (``['none']``: no faults).

  Examples:
    >>> from optax_guard.cli import parse_faults
    >>> parse_faults(['nan', 'poison@10', 'shift@40'], steps=50)
    ('nan@40', 'poison@10-21', 'shift@40')
  """
  from optax_guard.demo import faults as faults_lib  # pylint: disable=g-import-not-at-top

  if list(specs) == ['none']:
    return ('none',)
  defaults = {spec.split('@')[0]: spec
              for spec in faults_lib.default_specs(steps)}
  windows, names = [], set()
  for spec in specs:
    match = _SPEC.match(spec)
    if match is None or match['name'] not in defaults:
      raise ValueError(
          f'bad fault {spec!r}: expected NAME, NAME@STEP or NAME@START-END'
          f' ({" or ".join(faults_lib.WINDOWS)}) with NAME in'
          f' {sorted(defaults)}, or "none".')
    name = match['name']
    if match['start'] is None:  # A bare NAME takes its default step.
      match = _SPEC.match(defaults[name])
    start = int(match['start'])
    end = int(match['end'] or start)
    if name in faults_lib.WINDOWS and match['end'] is None:
      end = start + faults_lib.window_length(name, steps) - 1
    if name not in faults_lib.WINDOWS and end != start:
      raise ValueError(f'only {" and ".join(faults_lib.WINDOWS)} take a'
                       f' window, got {spec!r}.')
    if end < start:
      raise ValueError(f'empty {name} window in {spec!r}.')
    if not 1 <= start <= steps:
      raise ValueError(f'fault {spec!r} is outside the run (steps={steps}).')
    if name in names:
      raise ValueError(f'fault {name!r} is given twice.')
    names.add(name)
    windows.append(f'{name}@{start}' + (f'-{end}' if end > start else ''))
  return tuple(windows)


def describe_fault(name: str, window: tuple[int, int]) -> str:
  """``'steps 10-19: corrupt data shard ...'``."""
  from optax_guard.demo.faults import DESCRIPTIONS  # pylint: disable=g-import-not-at-top

  start, end = window
  where = {'preempt': f'after step {start}', 'shift': f'steps {start}-'}.get(
      name, f'steps {start}-{end}' if end > start else f'step {start}')
  return f'{where}: {DESCRIPTIONS[name]}'


def _check_out_dir(out_dir: pathlib.Path, config: Any) -> None:
  """Refuses a directory that holds something else than this demo's run."""
  config_path = out_dir / 'config.json'
  wanted = json.loads(json.dumps(dataclasses.asdict(config)))
  if config_path.exists():
    saved = json.loads(config_path.read_text())
    if saved != wanted:
      changed = sorted(k for k in saved if saved[k] != wanted.get(k))
      raise ValueError(
          f'{out_dir} holds a demo run with other settings ({", ".join(changed)}'
          ' differ); pass the same options to resume it, or another --out.')
  elif out_dir.exists() and any(out_dir.iterdir()):
    raise ValueError(f'{out_dir} is not empty and holds no optax-guard demo'
                     ' run; choose another --out.')


def _demo(args: argparse.Namespace, console: Console) -> int:
  # Imported here: JAX and Flax take seconds to load, `inspect --help` none.
  from optax_guard.demo import report as report_lib  # pylint: disable=g-import-not-at-top
  from optax_guard.demo import run as run_lib  # pylint: disable=g-import-not-at-top

  faults = None if args.faults is None else parse_faults(args.faults,
                                                         args.steps)
  config = run_lib.DemoConfig(steps=args.steps, seed=args.seed, faults=faults)
  out_dir = pathlib.Path(args.out)
  _check_out_dir(out_dir, config)
  console.print(
      f'Training a {config.depth}-layer character transformer on Python\'s'
      f' pydoc_data text, {config.steps} steps, twice: plain optax and'
      ' optax_guard.'
  )
  console.print('Faults, at the same steps of both runs:')
  for name, window in config.windows.items():
    console.print(f'  {describe_fault(name, window)}', highlight=False)
  listener = _RichListener(console, config.windows)
  started = time.perf_counter()
  try:
    summary = run_lib.run_demo(config, out_dir, listener)
  except (run_lib.Interrupted, KeyboardInterrupt) as error:
    listener.stop()
    console.print(
        f'[yellow]Interrupted{f" ({error})" if str(error) else ""}. Run the'
        ' same command again to resume: the guarded run continues from its'
        ' newest valid checkpoint; the plain run, which has none, starts'
        ' over.[/]'
    )
    return 130
  finally:
    listener.stop()
  report = report_lib.render(out_dir)
  console.print(_summary_table(summary))
  guarded = summary.get('guarded', {})
  if guarded.get('best_step') is not None:
    console.print(
        f'Best checkpoint: step {guarded["best_step"]}, held-out loss'
        f' {_number(guarded["best_loss"])} (og.Checkpointer.restore_best()).'
    )
  console.print(
      f'{time.perf_counter() - started:.0f} s. Wrote {out_dir}/: plain/ and'
      ' guarded/ (metrics.jsonl, events.jsonl, TensorBoard files),'
      f' checkpoints/, config.json, summary.json and {report}'
  )
  return 0


def _report(args: argparse.Namespace, console: Console) -> int:
  import optax_guard as og  # pylint: disable=g-import-not-at-top
  from optax_guard.demo import report as report_lib  # pylint: disable=g-import-not-at-top

  run_dir = pathlib.Path(args.run_dir)
  if (run_dir / 'metrics.jsonl').exists():  # Any og.fit(log_dir=...).
    path = pathlib.Path(args.output or run_dir / report_lib.REPORT_FILE)
    og.plot_runs(run_dir).savefig(path, dpi=110)
  else:
    path = report_lib.render(run_dir, args.output)
  console.print(f'Wrote {path}')
  return 0


def _positions(data: dict[str, Any]) -> dict[str, Any]:
  """The numbers of an iterator state, nested states first; a wrapper's own
  count that repeats one of the state it wraps is left out (a
  ``FaultInjector``'s ``index`` over ``og.batches``' ``next_index``)."""
  inner = {key: value for nested in data.values() if isinstance(nested, dict)
           for key, value in _positions(nested).items()}
  return {**inner, **{key: value for key, value in data.items()
                      if not isinstance(value, dict)
                      and value not in inner.values()}}


def _data_position(data: Any) -> str:
  """``next_index=550``: the saved iterator state, one position once."""
  if isinstance(data, dict):
    return ' '.join(f'{key}={value}' for key, value in _positions(data).items())
  return _number(data)


def _inspect(args: argparse.Namespace, console: Console) -> int:
  import optax_guard as og  # pylint: disable=g-import-not-at-top

  records = og.Checkpointer.describe(args.checkpoint_dir)
  table = Table(title=f'checkpoints in {args.checkpoint_dir}',
                box=box.SIMPLE_HEAVY)
  for column in ('step', 'valid', 'healthy', 'skips', 'rollbacks', 'MB'):
    table.add_column(column, justify='right', no_wrap=True)
  table.add_column('data position', overflow='fold')
  for r in records:
    saved = r['events'] or {}
    counts = saved.get('log', {}).get('counts')
    rollbacks = saved.get('recovery', {}).get('rollbacks')
    table.add_row(
        f'{r["step"]}{" *" if r["last_good"] else ""}',
        'yes' if r['valid'] else '[red]NO[/]',
        'yes' if r['healthy'] else 'no',
        _number(None if counts is None else counts.get('skipped_step', 0)),
        _number(None if rollbacks is None else len(rollbacks)),
        f'{r["bytes"] / 1e6:.1f}', _data_position(r['data']),
    )
  console.print(table)
  for r in records:
    if r['problem']:
      console.print(f'step {r["step"]}: {r["problem"]}', highlight=False,
                    soft_wrap=True)
  console.print(
      '* last good: the newest valid checkpoint saved while training was'
      ' healthy, the target of a rollback. skips and rollbacks count the'
      ' guard events up to each checkpoint.'
  )
  _print_attribution(args.checkpoint_dir, records, console)
  return 0


def _print_attribution(directory: str, records: list[dict[str, Any]],
                       console: Console) -> None:
  """The re-run verdicts (``RecoveryPolicy(rerun=True)``): their counts up
  to the newest checkpoint, and the batches in ``bad_batches.jsonl``."""
  from optax_guard.host import attribution  # pylint: disable=g-import-not-at-top
  from optax_guard.host import runlog  # pylint: disable=g-import-not-at-top

  newest = next((r for r in reversed(records) if r['events']), None)
  counts = {} if newest is None else newest['events'].get('log', {}).get(
      'counts', {})
  kinds = {runlog.TransientFault.kind: 'transient',
           runlog.BadBatch.kind: 'bad batch',
           runlog.NondeterministicFault.kind: 'nondeterministic'}
  bad = attribution.read(pathlib.Path(directory) / attribution.BAD_BATCHES)
  if not bad and not any(counts.get(kind) for kind in kinds):
    return
  if newest is not None:
    console.print(
        f'Re-run verdicts up to step {newest["step"]}: '
        + ', '.join(f'{label} {counts.get(kind, 0)}'
                    for kind, label in kinds.items()), highlight=False)
  if bad:
    console.print(f'Bad batches ({attribution.BAD_BATCHES}, dropped when a'
                  ' restart draws them):', highlight=False)
  for record in bad:
    console.print(
        f'  batch {record["index"]} (step {record["step"]},'
        f' {record["reason"]}) sha256 {record["digest"][:16]}',
        highlight=False)


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog='optax-guard',
      description='Keep JAX/Optax training alive: see it break and recover.',
  )
  commands = parser.add_subparsers(dest='command', required=True)

  demo = commands.add_parser(
      'demo',
      help='train a small LM twice with faults injected: plain optax vs'
      ' optax_guard',
      description='Trains a character-level transformer on Python\'s own'
      ' pydoc text with plain optax and with optax_guard on the same batches,'
      ' injects faults, and writes logs, checkpoints and report.png. Run it'
      ' again with the same --out to resume an interrupted run.',
  )
  demo.add_argument('--steps', type=int, default=600,
                    help='training steps per run (default: 600)')
  demo.add_argument('--seed', type=int, default=0,
                    help='seed of the model and the data (default: 0)')
  demo.add_argument('--out', default=DEFAULT_OUT,
                    help=f'output directory (default: ./{DEFAULT_OUT})')
  demo.add_argument(
      '--faults', nargs='+', metavar='FAULT',
      help='faults to inject: NAME or NAME@STEP (poison@START-END and'
      ' ramp@START-END for a window; a shift lasts to the end) with NAME in'
      ' spike, ramp, poison, preempt, nan, shift; "none" for none (default:'
      ' all six, at 30%%, 33%%, 45%%, 70%%, 80%% and 88%% of the run)',
  )
  demo.set_defaults(handler=_demo)

  report = commands.add_parser(
      'report', help='draw report.png from the logs of a demo directory or'
      ' of og.fit(log_dir=...)'
  )
  report.add_argument('run_dir', help='a directory written by `demo --out`,'
                      ' or a log_dir of og.fit')
  report.add_argument('--output', help='PNG path (default: RUN_DIR/report.png)')
  report.set_defaults(handler=_report)

  inspect = commands.add_parser(
      'inspect',
      help='list the checkpoints of a directory: step, valid, last good,'
      ' guard counters',
  )
  inspect.add_argument(
      'checkpoint_dir', help='a checkpoint directory (e.g. DIR/checkpoints)'
  )
  inspect.set_defaults(handler=_inspect)

  return parser


def _missing_extra(error: ImportError) -> int:
  print(
      f'optax-guard: {error.name or error} is not installed; the command needs'
      " the examples extra: pip install -e '.[examples]' in the clone",
      file=sys.stderr,
  )
  return 1


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Entry point of the ``optax-guard`` console script."""
  args = build_parser().parse_args(argv)
  if _MISSING_DEPENDENCY is not None:
    return _missing_extra(_MISSING_DEPENDENCY)
  console = Console()
  # optax_guard's own warnings (a preemption signal, a skipped checkpoint,
  # a rollback) print above the progress bars.
  logger = logging.getLogger('optax_guard')
  handler = RichHandler(console=console, show_time=False, show_path=False)
  logger.addHandler(handler)
  propagate, logger.propagate = logger.propagate, False
  try:
    return args.handler(args, console)
  except ModuleNotFoundError as error:
    if error.name in ('matplotlib', 'tensorboardX'):
      return _missing_extra(error)
    raise
  except ValueError as error:  # Bad options or a foreign directory.
    console.print(f'[red]optax-guard {args.command}: {error}[/]',
                  highlight=False, soft_wrap=True)
    return 2
  finally:
    logger.removeHandler(handler)
    logger.propagate = propagate


if __name__ == '__main__':
  sys.exit(main())
