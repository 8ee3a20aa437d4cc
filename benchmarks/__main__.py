"""Runs optax_guard's benchmarks and writes BENCHMARKS.md and results.json.

    python -m benchmarks                      # everything, ~13 min on 2 cores
    python -m benchmarks --only update,memory --sizes 1M,12.6M
    python -m benchmarks --render benchmarks/results.json   # notes edited
    python -m benchmarks --device --out /tmp/gpu  # headline ratios on a GPU/TPU
    python -m benchmarks --help

Sections: update (item 1), train_step (2), memory (3), kernels (the
compiled update's kernel counts at 17 and 65 leaves), checkpointing (4),
fit (og.fit against a hand-written loop, and an async save's blocking),
growth (5, from update's results), faults (6). A section whose code cannot
be imported is skipped with the reason; one that raises is recorded as
failed and the others still run (the exit status is then 1). Results are
written after every section, so an interrupted run keeps what it measured.
"""

import argparse
import json
import os
import pathlib
import shlex
import sys
import time
import traceback
from typing import Any, Callable, Optional, Sequence

from benchmarks.update_cost import FAMILIES

# What --device runs: the update section's headline group (bare adamw,
# optax's compositions, both guards, the floor) at the two sizes of the speed
# targets, and the kernel counts.
DEVICE_PRESET = ('--only', 'update,kernels', '--groups', 'headline',
                 '--sizes', '1M,12.6M', '--repeats', '9')
SECTIONS = ('update', 'train_step', 'memory', 'kernels', 'checkpointing',
            'fit', 'growth', 'faults')
DEFAULT_SIZES = '1M,12.6M,100M'
REPO = pathlib.Path(__file__).resolve().parent.parent


def _sections(text: str) -> list[str]:
  names = [name.strip() for name in text.split(',') if name.strip()]
  unknown = sorted(set(names) - set(SECTIONS))
  if unknown or not names:
    raise argparse.ArgumentTypeError(
        f'unknown sections {unknown}; choose from {", ".join(SECTIONS)}.')
  return [name for name in SECTIONS if name in names]


def _groups(text: str) -> list[str]:
  names = [name.strip() for name in text.split(',') if name.strip()]
  unknown = sorted(set(names) - set(FAMILIES))
  if unknown or not names:
    raise argparse.ArgumentTypeError(
        f'unknown groups {unknown}; choose from {", ".join(FAMILIES)}.')
  return [name for name in FAMILIES if name in names]


def _sizes(text: str) -> list[int]:
  from benchmarks import workloads  # pylint: disable=g-import-not-at-top

  try:
    return sorted({workloads.parse_size(part) for part in text.split(',')})
  except ValueError as error:
    raise argparse.ArgumentTypeError(str(error)) from None


def _size(text: str) -> int:
  return _sizes(text)[0]


def _positive(kind):
  def parse(text: str):
    value = kind(text)
    if value <= 0:
      raise argparse.ArgumentTypeError(f'must be > 0, got {text}.')
    return value
  return parse


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog='python -m benchmarks',
      description='Measures what optax_guard costs: update cost, train step,'
      ' memory, checkpointing, growth with size, and a long fault campaign.'
      ' Candidates are interleaved in one process; medians and ratios are'
      ' reported.',
  )
  parser.add_argument(
      '--only', type=_sections, default=list(SECTIONS),
      help=f'comma-separated sections to run (default: all of'
      f' {",".join(SECTIONS)})')
  parser.add_argument(
      '--sizes', type=_sizes, default=_sizes(DEFAULT_SIZES),
      help=f'parameter counts for update, memory and growth (default:'
      f' {DEFAULT_SIZES})')
  parser.add_argument(
      '--groups', type=_groups, default=list(FAMILIES),
      help=f'candidate groups of update (and memory): comma-separated of'
      f' {",".join(FAMILIES)} (default: all)')
  parser.add_argument(
      '--repeats', type=_positive(int), default=15,
      help='timed rounds of each update comparison (default: 15)')
  parser.add_argument(
      '--step-rounds', type=_positive(int), default=60,
      help='timed rounds of the whole train step on the demo LM, whose target'
      ' (1.03) is within the noise of fewer (default: 60)')
  parser.add_argument(
      '--warmup', type=_positive(int), default=2,
      help='untimed calls of each candidate first (default: 2)')
  parser.add_argument(
      '--min-sample-ms', type=_positive(float), default=50.0,
      help='a timed sample repeats a fast step for about this long'
      ' (default: 50)')
  parser.add_argument(
      '--layers', type=_positive(int), default=8,
      help='blocks of the synthetic parameter tree, 8 leaves each'
      ' (default: 8)')
  parser.add_argument(
      '--lm', choices=('demo', 'tiny'), default='demo',
      help="language model of train_step and checkpointing: the demo's, or a"
      ' tiny one for smoke tests (default: demo)')
  parser.add_argument(
      '--checkpoint-size', type=_size, default=_size('100M'),
      help='parameters of the state saved by checkpointing (default: 100M)')
  parser.add_argument(
      '--checkpoint-rounds', type=_positive(int), default=10,
      help='timed rounds of the checkpointing comparisons (default: 10)')
  parser.add_argument(
      '--checkpoint-dir',
      help='where checkpointing writes (default: a temporary directory)')
  parser.add_argument(
      '--faults', type=_positive(int), default=1000,
      help='faults injected by the fault campaign (default: 1000)')
  parser.add_argument(
      '--seed', type=int, default=0, help='seed of the fault campaign')
  parser.add_argument(
      '--device', action='store_true',
      help='the headline ratios on whatever accelerator JAX sees, in a few'
      f' minutes: {" ".join(DEVICE_PRESET)} (explicit options after it'
      ' win); writes the same tables')
  parser.add_argument(
      '--render', type=pathlib.Path, metavar='RESULTS_JSON',
      help='measure nothing: rewrite BENCHMARKS.md from a results.json (and'
      ' the current benchmarks/NOTES.md), e.g. after editing the notes')
  parser.add_argument(
      '--out', type=pathlib.Path,
      help='directory for BENCHMARKS.md and results.json (default:'
      ' BENCHMARKS.md at the repository root, benchmarks/results.json)')
  return parser


def _section_runners(args) -> dict[str, Callable[[Callable], dict[str, Any]]]:
  """Each section as ``run(say) -> results``; imports happen when it runs."""

  def update(say):
    from benchmarks import update_cost  # pylint: disable=g-import-not-at-top
    return update_cost.run(
        args.sizes, families=args.groups, layers=args.layers, rounds=args.repeats,
        warmup=args.warmup, min_sample_s=args.min_sample_ms / 1e3, say=say)

  def train_step(say):
    from benchmarks import train_step as section  # pylint: disable=g-import-not-at-top
    return section.run(lm=args.lm, rounds=args.step_rounds, warmup=args.warmup,
                       min_sample_s=args.min_sample_ms / 1e3, say=say)

  def memory(say):
    from benchmarks import memory as section  # pylint: disable=g-import-not-at-top
    return section.run(args.sizes, families=args.groups, layers=args.layers,
                       say=say)

  def kernels(say):
    from benchmarks import kernels as section  # pylint: disable=g-import-not-at-top
    return section.run(min(args.sizes), say=say)

  def checkpointing(say):
    from benchmarks import checkpointing as section  # pylint: disable=g-import-not-at-top
    return section.run(
        count=args.checkpoint_size, layers=args.layers, lm=args.lm,
        rounds=args.checkpoint_rounds, warmup=1,
        directory=args.checkpoint_dir, say=say)

  def fit(say):
    from benchmarks import fit_overhead as section  # pylint: disable=g-import-not-at-top
    return section.run(lm=args.lm, rounds=args.checkpoint_rounds,
                       warmup=1, directory=args.checkpoint_dir, say=say)

  def faults(say):
    from benchmarks import faults as section  # pylint: disable=g-import-not-at-top
    return section.run(num_faults=args.faults, seed=args.seed, say=say)

  return {'update': update, 'train_step': train_step, 'memory': memory,
          'kernels': kernels, 'checkpointing': checkpointing, 'fit': fit,
          'faults': faults}


def _say(section: str, start: float) -> Callable[[str], None]:
  def say(line: str) -> None:
    print(f'[{time.perf_counter() - start:7.1f}s] {section}: {line}',
          flush=True)
  return say


def _write(results: dict[str, Any], markdown_path: pathlib.Path,
           json_path: pathlib.Path) -> None:
  from benchmarks import report  # pylint: disable=g-import-not-at-top

  results['targets'] = report.targets(results)
  json_path.parent.mkdir(parents=True, exist_ok=True)
  markdown_path.parent.mkdir(parents=True, exist_ok=True)
  # Strict JSON: a NaN or an infinity here is a benchmark's bug, and no
  # strict parser (jq, JSON.parse) would read the file.
  json_path.write_text(json.dumps(results, indent=1, allow_nan=False) + '\n')
  markdown_path.write_text(report.markdown(
      results, os.path.relpath(json_path, markdown_path.parent)))


def main(argv: Optional[Sequence[str]] = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if '--device' in argv:
    argv = [*DEVICE_PRESET, *argv]
  args = build_parser().parse_args(argv)
  from benchmarks import machine  # pylint: disable=g-import-not-at-top

  if args.out is None:
    markdown_path = REPO / 'BENCHMARKS.md'
    json_path = REPO / 'benchmarks' / 'results.json'
  else:
    markdown_path = args.out / 'BENCHMARKS.md'
    json_path = args.out / 'results.json'
  if args.render is not None:
    _write(json.loads(args.render.read_text()), markdown_path, json_path)
    print(f'benchmarks: rendered {markdown_path} from {args.render}')
    return 0
  start = time.perf_counter()
  results = {
      'command': shlex.join(['python', '-m', 'benchmarks', *argv]),
      'machine': machine.describe(),
      'settings': {
          key: (str(value) if isinstance(value, pathlib.Path) else value)
          for key, value in vars(args).items()
      },
      'sections': {},
      'total_seconds': 0.0,
  }
  print(f'benchmarks: {", ".join(args.only)} on {results["machine"]["cpu"]}'
        f' ({results["machine"]["backend"]}); writing {markdown_path} and'
        f' {json_path}', flush=True)
  runners = _section_runners(args)
  failed = False
  for name in args.only:
    say = _say(name, start)
    section_start = time.perf_counter()
    if name == 'growth':
      from benchmarks import update_cost  # pylint: disable=g-import-not-at-top
      update = results['sections'].get('update', {})
      if update.get('status') != 'ok':
        section = {'status': 'skipped',
                   'reason': 'it is computed from the update section, which'
                             ' did not run or did not finish'}
      else:
        section = {'status': 'ok', **update_cost.growth(update)}
    else:
      try:
        section = {'status': 'ok', **runners[name](say)}
      except ImportError as error:
        section = {'status': 'skipped',
                   'reason': f'its code could not be imported ({error})'}
      except Exception as error:  # pylint: disable=broad-except
        failed = True
        section = {'status': 'failed',
                   'error': f'{type(error).__name__}: {error}',
                   'traceback': traceback.format_exc()}
        print(section['traceback'], file=sys.stderr, flush=True)
    section['seconds'] = time.perf_counter() - section_start
    say(f'{section["status"]} in {section["seconds"]:.0f} s'
        + (f': {section.get("reason") or section.get("error")}'
           if section['status'] != 'ok' else ''))
    results['sections'][name] = section
    results['total_seconds'] = time.perf_counter() - start
    _write(results, markdown_path, json_path)
  print(f'benchmarks: done in {results["total_seconds"] / 60:.1f} min; wrote'
        f' {markdown_path} and {json_path}', flush=True)
  return 1 if failed else 0


if __name__ == '__main__':
  sys.exit(main())
