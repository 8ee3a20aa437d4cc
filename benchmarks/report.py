"""Targets checked against the results, and ``BENCHMARKS.md`` rendered."""

import json
import pathlib
from typing import Any, Iterable, NamedTuple, Optional

from benchmarks import update_cost as uc
from benchmarks import workloads as w

STABILITY_FILE = pathlib.Path(__file__).resolve().parent / 'stability.json'
ATTRIBUTION_FILE = STABILITY_FILE.with_name('attribution.json')
NOTES_FILE = pathlib.Path(__file__).with_name('NOTES.md')
SECTION_TITLES = {
    'update': '1. Update cost',
    'train_step': "2. Whole train step on the demo's language model",
    'memory': '3. Memory',
    'kernels': '3b. Kernels of the compiled update',
    'checkpointing': '4. Checkpointing',
    'fit': "4b. og.fit's own cost",
    'growth': '5. Growth from the smallest to the largest size',
    'faults': '6. Fault campaign, long form',
}


def _ok(results, name) -> Optional[dict[str, Any]]:
  section = results['sections'].get(name)
  return section if section and section['status'] == 'ok' else None


def _row(rows, **match) -> Optional[dict[str, Any]]:
  for row in rows:
    if all(row.get(k) == v for k, v in match.items()):
      return row
  return None


def _ratio_target(item, what, row, limit, strict=False):
  if row is None:
    return None
  ratio = row['ratio']
  met = ratio < limit if strict else ratio <= limit
  return {
      'item': item, 'what': what,
      'target': f'{"<" if strict else "≤"} {limit:g}×',
      'measured': f'{ratio:.3f}× (IQR {row["ratio_q1"]:.3f}–'
                  f'{row["ratio_q3"]:.3f})',
      'met': met,
      'shortfall': None if met else f'{(ratio / limit - 1) * 100:.1f}% over',
  }


# Issue 24's speed targets, per mode (update ÷ bare adamw, fused, donated):
# the default guard, whose exact check of the inner optimizer's output
# reads gradients, moments and params twice (the checked floor measures
# the least that structure costs); the guard with check_updates=False; the
# guard inside optax.chain against the guard alone.
CHECKED_LIMITS = {1_000_000: 1.60, 12_600_000: 1.35}
UNCHECKED_LIMITS = {1_000_000: 1.45, 12_600_000: 1.25}
PURE_OVER_APPLY_IF_FINITE_LIMITS = {1_000_000: 0.85}
CHAINED_OVER_GUARD_LIMIT = 1.1


def _update_targets(section) -> Iterable[dict[str, Any]]:
  rows = section['rows']
  for count in sorted({row['params'] for row in rows}):
    size = w.format_size(count)
    comparisons = section['comparisons'].get(str(count), {})
    yield _ratio_target(
        1, f'{size}: guarded step (og.make_train_step) ÷ bare step',
        _row(rows, params=count, group='train step', name=uc.GUARD_TRAIN),
        1.15)
    for what, name, limits in (
        ('og.guard (default, checked)', uc.GUARD_FUSED, CHECKED_LIMITS),
        ('og.guard(check_updates=False)', uc.UNCHECKED_FUSED,
         UNCHECKED_LIMITS)):
      if count in limits:
        yield _ratio_target(
            24, f'{size}: {what} fused update ÷ bare adamw update',
            _row(rows, params=count, group='headline', name=name),
            limits[count])
    if count in PURE_OVER_APPLY_IF_FINITE_LIMITS:
      yield _ratio_target(
          24, f'{size}: og.guard (pure transformation) ÷ optax'
          ' apply_if_finite(chain(clip, adamw))',
          comparisons.get('guard_pure_over_apply_if_finite'),
          PURE_OVER_APPLY_IF_FINITE_LIMITS[count])
    yield _ratio_target(
        24, f'{size}: optax.chain(og.guard) ÷ og.guard (fused)',
        comparisons.get('chained_guard_over_guard'), CHAINED_OVER_GUARD_LIMIT)


def _memory_targets(section) -> Iterable[dict[str, Any]]:
  for row in section['rows']:
    if 'within_target' in row and row['name'].startswith('og.'):
      extra = row['extra_peak_bytes'] - row['guard_state_bytes']
      yield {
          'item': 3,
          'what': f'{w.format_size(row["params"])}: {row["name"]} peak ≤ bare'
                  ' + guard state + 1 MiB',
          'target': '≤ 1 MiB beyond guard state',
          'measured': f'{w.format_bytes(extra)} beyond guard state',
          'met': row['within_target'],
          'shortfall': None if row['within_target'] else (
              f'{w.format_bytes(extra - section["slack_bytes"])} over'),
      }
  undonated = [
      f'{w.format_size(r["params"])} {r["name"]}' for r in section['rows']
      if not r['donated'] or r.get('donated_at_run_time') is False
  ]
  yield {
      'item': 3, 'what': 'donation: every step reuses its params and state'
                         ' buffers (all sizes; run-time check at the smallest)',
      'target': 'all donated', 'measured': 'all donated' if not undonated
      else 'not donated: ' + ', '.join(undonated),
      'met': not undonated,
      'shortfall': None if not undonated else f'{len(undonated)} steps',
  }


def _overhead_target(item, what, row, limit):
  if row is None:
    return None
  overhead = row['ratio'] - 1
  met = overhead <= limit
  return {
      'item': item, 'what': what, 'target': f'≤ {limit:.0%}',
      'measured': f'{overhead:+.2%} (IQR {row["ratio_q1"] - 1:+.2%}–'
                  f'{row["ratio_q3"] - 1:+.2%})',
      'met': met,
      'shortfall': None if met else f'{(overhead - limit) * 100:.1f} points over',
  }


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
  """Every target of the issue that the results can check."""
  found = []
  if section := _ok(results, 'update'):
    found += _update_targets(section)
  # Imported only once their section ran: they need the demo and Orbax.
  # pylint: disable=g-import-not-at-top
  if section := _ok(results, 'train_step'):
    from benchmarks import train_step
    found.append(_ratio_target(
        2, 'demo LM: guarded step ÷ unguarded (plain) step',
        _row(section['rows'], name=train_step.GUARDED), 1.03))
  if section := _ok(results, 'memory'):
    found += _memory_targets(section)
  if section := _ok(results, 'checkpointing'):
    from benchmarks import checkpointing
    found.append(_ratio_target(
        4, f'{w.format_size(section["state"]["params"])} state: async save'
        ' blocking ÷ sync save',
        _row(section['save_rows'], name=checkpointing.ASYNC_BLOCKING), 0.10))
    found.append(_overhead_target(
        4, f'demo LM: step-time overhead of an async save every'
        f' {section["save_every"]} steps',
        _row(section['train_rows'], name=checkpointing.TRAIN_SAVING), 0.02))
  if section := _ok(results, 'fit'):
    from benchmarks import fit_overhead
    found.append(_ratio_target(
        7, 'demo LM: og.fit ÷ a hand-written loop (same step, same saves)',
        _row(section['rows'], name=fit_overhead.FIT), 1.03))
    blocking = section['async_save_blocking_ms']['median']
    found.append({
        'item': 7, 'what': 'demo LM: one async save blocks the loop for',
        'target': '≤ 10 ms', 'measured': f'{blocking:.1f} ms (median of'
        f" {section['async_save_blocking_ms']['saves']})",
        'met': blocking <= 10.0,
        'shortfall': None if blocking <= 10.0 else f'{blocking - 10:.1f} ms',
    })
  if section := _ok(results, 'faults'):
    survived = section['survived']
    finite = section.get('params_always_finite', False)
    found.append({
        'item': 6, 'what': f'{section["num_faults"]} faults: run survives',
        'target': 'survives', 'measured': (
            f'survived {section["injected_total"]} injected faults' if survived
            else f'gave up: {section["error"]}'),
        'met': survived, 'shortfall': None if survived else 'diverged',
    })
    if survived:
      found.append({
          'item': 6, 'what': 'non-finite params after any step',
          'target': '0', 'measured': '0' if finite else 'some',
          'met': finite, 'shortfall': None if finite else 'non-finite params',
      })
  return [t for t in found if t is not None]


# ----------------------------------------------------------------------------
# Markdown.


def _table(header: list[str], rows: list[list[Any]]) -> str:
  lines = ['| ' + ' | '.join(header) + ' |',
           '|' + '|'.join('---' for _ in header) + '|']
  lines += ['| ' + ' | '.join(str(c) for c in row) + ' |' for row in rows]
  return '\n'.join(lines)


def _duration(ms: float) -> str:
  """``1930.2 -> '1.93 s'``, ``0.39 -> '0.39 ms'``: three significant digits."""
  if ms >= 1000:
    return f'{ms / 1000:.3g} s'
  return f'{ms:.3g} ms'


def _ms(row) -> str:
  return (f'{_duration(row["median_ms"])} ({_duration(row["q1_ms"])}–'
          f'{_duration(row["q3_ms"])})')


def _ratio(row) -> str:
  if row.get('ratio') is None:
    return 'baseline'
  return f'**{row["ratio"]:.3f}×** ({row["ratio_q1"]:.3f}–{row["ratio_q3"]:.3f})'


def _timing_table(rows, first_column=None) -> str:
  header = ([first_column[0]] if first_column else []) + [
      'candidate', 'median per call (IQR)', 'ratio (IQR)', 'vs', 'rounds × calls']
  body = []
  for row in rows:
    cells = [first_column[1](row)] if first_column else []
    body.append(cells + [
        row['name'], _ms(row), _ratio(row), row['baseline'] or '',
        f'{row["rounds"]} × {row["calls_per_sample"]}'])
  return _table(header, body)




def _update_md(section) -> str:
  parts = []
  for count in sorted({row['params'] for row in section['rows']}):
    rows = [row for row in section['rows'] if row['params'] == count]
    parts.append(f'#### {w.format_size(count)} parameters\n\n'
                 + _timing_table(rows, ('group', lambda r: r['group'])))
    comparisons = section['comparisons'].get(str(count), {})
    if comparisons:
      parts.append(_comparisons_md(comparisons, uc.COMPARISONS))
  return '\n\n'.join(parts)


def _comparisons_md(comparisons, names) -> str:
  """Ratios between two candidates of one measurement, same rounds."""
  return 'Between candidates, same rounds:\n\n' + '\n'.join(
      f'* {names[key][0]} ÷ {names[key][1]}: **{c["ratio"]:.3f}×**'
      f' ({c["ratio_q1"]:.3f}–{c["ratio_q3"]:.3f})'
      for key, c in comparisons.items())


def _train_step_md(section) -> str:
  from benchmarks import train_step  # pylint: disable=g-import-not-at-top

  model = section['model']
  return (
      f'Model: {model["params"]:,} params (width {model["width"]}, depth'
      f' {model["depth"]}, {model["heads"]} heads), batch'
      f' {model["batch_size"]} × {model["seq_len"]} characters.\n\n'
      + _timing_table(section['rows']) + '\n\n'
      + _comparisons_md(section['comparisons'], train_step.COMPARISONS)
  )


def _memory_md(section) -> str:
  body = []
  for row in section['rows']:
    extra = ('' if 'extra_peak_bytes' not in row
             else w.format_bytes(row['extra_peak_bytes']))
    donated = 'yes' if row['donated'] else 'NO'
    if 'donated_at_run_time' in row:
      donated += ', run: ' + ('yes' if row['donated_at_run_time'] else 'NO')
    body.append([
        w.format_size(row['params']), row['name'], w.format_bytes(row['temp_bytes']),
        w.format_bytes(row['peak_bytes']), extra,
        w.format_bytes(row['guard_state_bytes']) if 'guard_state_bytes' in row
        else '', donated,
        {True: 'yes', False: '**no**', None: ''}[row.get('within_target')],
    ])
  return (
      'From `jax.jit(step, donate_argnums=(0, 1)).lower(...).compile()'
      '.memory_analysis()`: peak = arguments + outputs − aliased + temp;'
      ' extra = peak − the bare step\'s peak; guard state = its optimizer'
      ' state − the bare one\'s.\n\n'
      + _table(['params', 'step', 'temp', 'peak', 'extra vs bare',
                'guard state', 'donated', 'within target'], body))


class SaveCost(NamedTuple):
  """What one async save costs the training loop of the demo."""

  milliseconds: float  # Median ratio − 1, times a chunk of steps.
  share_measured: float  # Of step time, saving every `save_every` steps.
  share_default: float  # Of step time, at og.Checkpointer's default interval.


def save_cost(section) -> SaveCost:
  """:class:`SaveCost` from the checkpointing section's results."""
  from benchmarks import checkpointing  # pylint: disable=g-import-not-at-top

  chunk = _row(section['train_rows'], name=checkpointing.TRAIN)
  saving = _row(section['train_rows'], name=checkpointing.TRAIN_SAVING)
  overhead = saving['ratio'] - 1
  return SaveCost(
      milliseconds=overhead * chunk['median_ms'],
      share_measured=overhead,
      share_default=overhead * section['save_every']
      / section['default_interval'],
  )


def _checkpointing_md(section) -> str:
  state = section['state']
  every, default = section['save_every'], section['default_interval']
  cost = save_cost(section)
  return (
      f'State: {w.format_size(state["params"])} params with og.guard(adamw)'
      f' state, {w.format_bytes(state["bytes"])}.\n\n'
      + _timing_table(section['save_rows'])
      + f'\n\nDemo LM ({section["demo"]["params"]:,} params), chunks of'
        f' {every} guarded steps:\n\n'
      + _timing_table(section['train_rows'])
      + f'\n\nOne save costs the training loop {_duration(cost.milliseconds)}'
        f' (median ratio − 1, times a chunk): {cost.share_measured:+.2%} of'
        f' step time when saving every {every} steps,'
        f' {cost.share_default:+.2%} at og.Checkpointer\'s'
        f' default interval of {default} steps.')


def _growth_md(section) -> str:
  sizes = section['sizes']
  header = ['candidate', 'vs'] + [w.format_size(s) for s in sizes] + [
      'change']
  body = []
  for row in section['rows']:
    cells = [f'{r:.3f}×' if r is not None else '' for r in row['ratios']]
    change = ('' if row['change'] is None else f'{row["change"]:+.3f}')
    body.append([row['name'], row['baseline']] + cells + [change])
  times = ', '.join(f'{w.format_size(s)}: {_duration(t)}'
                    for s, t in zip(sizes, section['bare_ms'])
                    if t is not None)
  return (_table(header, body)
          + f'\n\nBare adamw update, median: {times}.')


def _faults_md(section) -> str:
  if not section['survived']:
    return (f'{section["num_faults"]} faults over {section["num_steps"]}'
            f' steps: the run gave up: {section["error"]}')
  injected = ', '.join(f'{k} {v}' for k, v in section['injected'].items())
  return _table(['measure', 'value'], [
      ['faults injected', f'{section["injected_total"]} ({injected});'
                          f' {section["bursts"]} bursts of NaN gradients'
                          ' count as nan_grad'],
      ['steps (each run)', section['num_steps']],
      ['steps skipped by the guard', section['skipped_steps']],
      ['rollbacks to the last good checkpoint', section['rollbacks']],
      ['batches skipped by rollbacks', section['skipped_batches']],
      ['params finite after every step', section['params_always_finite']],
      ['held-out loss, faulty vs clean run',
       f'{section["final_loss"]:.4f} vs {section["clean_final_loss"]:.4f}'
       f' ({section["relative_gap"]:.1%} apart)'],
      ['wall time (both runs)', f'{section["seconds"]:.0f} s'],
  ])


def _kernels_md(section) -> str:
  rows = [[row['leaves'], row['name'], row['per_call'],
           f"+{row['added_per_call']}" if row['added_per_call'] else '-',
           row['total'], row['branches']]
          for row in section['rows']]
  return (
      f"The fused update at {section['params']:,} parameters, compiled for"
      f" {section.get('backend', 'cpu')}; kernels counted in its optimised"
      ' HLO (`benchmarks/kernels.py`'
      ' says what counts). *Per call*: the most kernels one call runs (each'
      ' `conditional` by its largest branch); *all*: every kernel of every'
      ' branch.\n\n'
      + _table(['leaves', 'candidate', 'per call', 'vs bare', 'all',
                'conditionals / loops'], rows))


def _fit_md(section) -> str:
  blocking = section['async_save_blocking_ms']
  return (
      f"The demo's LM ({section['demo']['params']:,} parameters), its guarded"
      f" step; one sample is a resume plus {section['steps']} steps with an"
      f" async save every {section['save_every']} (`benchmarks/fit_overhead.py`)."
      f" One async save blocked the hand loop for {blocking['median']:.1f} ms"
      f" (median; at most {blocking['max']:.1f} ms, {blocking['saves']}"
      ' saves)' + _orbax_blocking_md(section.get('orbax_save_blocking_ms'))
      + '.\n\n' + _timing_table(section['rows']))


def _orbax_blocking_md(orbax) -> str:
  """Plain Orbax's own save of the same arrays, when the run measured it."""
  if not orbax:
    return ''
  return (
      "; plain Orbax's CheckpointManager.save of the same arrays blocked for"
      f" {orbax['nnx_state']['median']:.1f} ms in the nnx.State tree and"
      f" {orbax['nested_dicts']['median']:.1f} ms as nested dicts")


_RENDERERS = {
    'update': _update_md, 'train_step': _train_step_md, 'memory': _memory_md,
    'kernels': _kernels_md, 'fit': _fit_md,
    'checkpointing': _checkpointing_md, 'growth': _growth_md,
    'faults': _faults_md,
}


def _stability_md() -> str:
  """The learning-rate study of ``benchmarks/stability.json``, if run."""
  if not STABILITY_FILE.exists():
    return ('*Not run: `python -m benchmarks.stability` writes'
            ' `benchmarks/stability.json`.*')
  study = json.loads(STABILITY_FILE.read_text())
  rates = study['settings']['learning_rates']
  seeds = len(study['settings']['seeds'])
  rows = []
  for method, largest in study['largest_stable_learning_rate'].items():
    row = [method, largest if largest is not None else 'none']
    for lr in rates:
      cell = next(c for c in study['cells']
                  if c['method'] == method and c['learning_rate'] == lr)
      loss = cell['mean_final_heldout_loss']
      row.append(('-' if loss is None else f'{loss:.3f}')
                 + f" ({cell['diverged_runs']}/{seeds} div,"
                 f" {cell['spikes']} spikes)")
    rows.append(row)
  return (
      f"`{study['command'].strip()}` on {study['machine']['cpu']}, in"
      f" {study['seconds'] / 60:.1f} minutes: the demo's transformer,"
      f" {study['settings']['steps']} steps per run, {seeds} seeds per cell;"
      ' each cell is the mean final held-out loss of the seeds that did not'
      ' diverge, the diverged runs and the loss spikes of all seeds'
      ' (definitions in `benchmarks/stability.py`; plot: `docs/stability.png`).'
      '\n\n' + _table(['method', 'largest stable lr',
                        *[f'lr {lr:g}' for lr in rates]], rows))


# The verdicts of benchmarks/attribution.py, in the table's column order.
_VERDICT_COLUMNS = ('transient_fault', 'bad_batch', 'nondeterministic_fault',
                    'not skipped')


def _natural_skips(verdicts: dict[str, str]) -> str:
  """The verdicts on clean steps (skips of the guard's own), in words."""
  if not verdicts:
    return '0'
  return f'{len(verdicts)} (natural skips: ' + ', '.join(
      f'step {step} {kind}' for step, kind in verdicts.items()) + ')'


def attribution_table(results: dict[str, Any]) -> str:
  """The campaign's confusion table and summary lines, as markdown."""
  lines = ['| true kind | faults | ' + ' | '.join(_VERDICT_COLUMNS) + ' |',
           '|---|---:|' + '---:|' * len(_VERDICT_COLUMNS)]
  for kind, row in results['table'].items():
    lines.append(f'| {kind} | {sum(row.values())} | '
                 + ' | '.join(str(row.get(c, 0)) for c in _VERDICT_COLUMNS)
                 + ' |')
  loss = results['heldout_loss']
  faults = sum(results['settings']['faults'].values())
  extra = results['fault_free_step_calls'] - results['fault_free_steps']
  lines += [
      '',
      (f'{faults} faults in {results["settings"]["steps"]} steps;'
       f' misclassified: {len(results["misclassified_steps"])}; verdicts on'
       f' clean steps: {_natural_skips(results["verdicts_on_clean_steps"])};'
       ' clean'
       ' batches lost to transient faults:'
       f' {results["clean_batches_lost_to_transient_faults"]}; rollbacks:'
       f' {results["rollbacks"]}.'),
      '',
      (f'Train-step calls: {results["fault_free_step_calls"]} for the'
       f' {results["fault_free_steps"]} steps of the fault-free run ({extra}'
       f' extra), {results["faulty_step_calls"]} for the'
       f' {results["faulty_steps"]} steps of the faulty run (its stream has'
       ' the corrupt batches inserted among the same clean ones). Updates'
       f' applied: {results["fault_free_updates"]} without faults,'
       f' {results["faulty_updates"]} with them (the clean batches of'
       ' nondeterministic faults are skipped).'),
      '',
      (f'Held-out loss: {loss["faulty"]:.4f} with the faults,'
       f' {loss["fault_free"]:.4f} without'
       f' ({100 * loss["relative_gap"]:+.2f} %; goal within 0.5 %:'
       f' {"met" if results["within_half_a_percent"] else "missed"}).'),
  ]
  return '\n'.join(lines)


def _attribution_md() -> str:
  """The re-run campaign of ``benchmarks/attribution.json``, if run."""
  if not ATTRIBUTION_FILE.exists():
    return ('*Not run: `python -m benchmarks.attribution` writes'
            ' `benchmarks/attribution.json`.*')
  results = json.loads(ATTRIBUTION_FILE.read_text())
  settings, machine = results['settings'], results['machine']
  load = machine['load_average_at_start']
  return (
      f"`{results['command'].strip()}` on {machine['cpu']}"
      f" ({machine['usable_cores']} cores, load average"
      f" {f'{load[0]:.1f}' if load else 'unknown'} at the start),"
      f" in {results['seconds'] / 60:.1f} minutes: the demo's transformer"
      f" (width {settings['width']}, depth {settings['depth']}, context"
      f" {settings['seq_len']}, batch {settings['batch_size']}) trained"
      f" {settings['steps']} steps under `og.fit` with"
      ' `RecoveryPolicy(rerun=True)`, faults of known kind on seeded steps,'
      ' against the same run without faults (the corrupt batches are records'
      ' inserted among the clean ones, so the reference trains on the same'
      ' clean batches). Rows: the true kind; columns:'
      ' the event `og.fit` recorded at that step (definitions in'
      ' `benchmarks/attribution.py`).\n\n' + attribution_table(results))


def _machine_md(machine) -> str:
  versions = ', '.join(f'{k} {v}' for k, v in machine['versions'].items())
  load = machine['load_average_at_start']
  return _table(['', ''], [
      ['CPU', f'{machine["cpu"]}, {machine["usable_cores"]} usable of'
              f' {machine["cores"]} cores'],
      ['memory', f'{machine["memory_gib"]:.1f} GiB'
                 if machine['memory_gib'] else 'unknown'],
      ['backend', f'{machine["backend"]}: {", ".join(machine["devices"])}'],
      ['software', f'Python {machine["python"]}, {versions}'],
      ['platform', machine['platform']],
      ['XLA_FLAGS', f'`{machine["xla_flags"]}`' if machine['xla_flags']
       else '(none)'],
      ['load average at start', ', '.join(f'{x:.2f}' for x in load)
       if load else 'unknown'],
      ['code', f'{machine["git_commit"]}'
               + (' with uncommitted changes' if machine['git_dirty'] else '')],
      ['date', machine['date']],
  ])


def _targets_md(found) -> str:
  body = [[t['item'], t['what'], t['target'], t['measured'],
           'met' if t['met'] else f'**missed** ({t["shortfall"]})']
          for t in found]
  return _table(['item', 'what', 'target', 'measured', 'result'], body)


def markdown(results: dict[str, Any], json_name: str = 'results.json') -> str:
  """``BENCHMARKS.md`` for ``results``, saved as ``json_name`` (relative to
  the markdown file)."""
  parts = [
      '# Benchmarks',
      'Generated by `' + results['command'] + '` in'
      f' {results["total_seconds"] / 60:.1f} minutes; the numbers are also in'
      f' `{json_name}`. Do not edit by hand: rerun, and write notes in'
      ' `benchmarks/NOTES.md`.',
      '## Machine', _machine_md(results['machine']),
      '## Targets', _targets_md(results['targets']) if results['targets']
      else 'No section that checks a target ran.',
  ]
  for name, title in SECTION_TITLES.items():
    section = results['sections'].get(name)
    parts.append(f'## {title}')
    if section is None:
      parts.append('*Not run (not selected with `--only`).*')
    elif section['status'] == 'skipped':
      parts.append(f'*Skipped: {section["reason"]}.*')
    elif section['status'] == 'failed':
      parts.append(f'*Failed: `{section["error"]}`* (traceback in {json_name}).')
    else:
      parts.append(_RENDERERS[name](section))
  parts += ['## 7. Stability across learning rates', _stability_md()]
  parts += ['## 8. Attribution by re-run: machine or batch?',
            _attribution_md()]
  parts += ['## How these numbers are taken',
            _METHOD.format(layers=results['settings']['layers'])]
  if NOTES_FILE.exists():
    parts += ['## Notes', NOTES_FILE.read_text().strip()]
  return '\n\n'.join(parts) + '\n'


_METHOD = '''\
* Every table compares candidates measured in **one process, interleaved**:
  each candidate is warmed up (compilation included), then every round
  runs one sample of each candidate, in an order rotated from round to round.
  A sample repeats a fast call until it lasts about `--min-sample-ms`, then
  blocks on the result; its time is divided by the calls.
* Times are medians with the inter-quartile range in brackets. A **ratio** is
  the median of the per-round ratios to the baseline named in the `vs`
  column, measured in the same rounds: that is what to quote, not the
  absolute times, which move with the machine's load.
* Update cost: params are a transformer-like tree ({layers} blocks of attention and
  MLP matrices, biases and norm scales, plus an embedding) of the given
  total size in fp32; gradients are fixed; every step is one `jax.jit` with
  params and optimizer state donated. Candidates run in groups of at most
  six so that at 100M no more than six copies of the state are alive;
  each group has its own baseline. The floor candidate is bare adamw
  under a `lax.cond` on one finiteness check of the gradients: what any
  guard that decides before updating must pay.
* Memory is XLA's own accounting of the compiled step (no run needed);
  donation is checked on the compiled step and, at the smallest size, by
  running it and checking that the arrays passed in were consumed.'''
