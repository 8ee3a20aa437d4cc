"""The demo's logs: ``metrics.jsonl``, ``events.jsonl`` and TensorBoard.

Every step of every run is one JSON line in ``metrics.jsonl`` (``run``,
``step`` and the step's metrics); rollbacks and preemptions are lines in
``events.jsonl``. A run resumed from a checkpoint first drops the lines an
interrupted process wrote past that checkpoint, so the logs end up exactly as
an uninterrupted run writes them. NaN and infinity are written as JSON's
``NaN`` and ``Infinity``.
"""

import json
import math
import os
import pathlib
from typing import Any, Optional

from tensorboardX import SummaryWriter

METRICS_FILE = 'metrics.jsonl'
EVENTS_FILE = 'events.jsonl'
TENSORBOARD_DIR = 'tensorboard'

_TENSORBOARD_SCALARS = (
    'loss', 'grad_norm', 'clip_bound', 'eval_loss', 'total_skips',
)


def read_jsonl(path: os.PathLike) -> list[dict[str, Any]]:
  """The records of a JSON-lines file; a torn last line (a kill mid-write)
  is left out."""
  path = pathlib.Path(path)
  if not path.exists():
    return []
  records = []
  lines = path.read_text().splitlines()
  for number, line in enumerate(lines):
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError:
      if number != len(lines) - 1:
        raise ValueError(f'{path}: line {number + 1} is not JSON.') from None
  return records


def _rewrite(path: pathlib.Path, records: list[dict[str, Any]]) -> None:
  """Replaces ``path`` atomically, so a kill leaves the old or new file."""
  temporary = path.with_suffix(path.suffix + '.tmp')
  temporary.write_text(''.join(json.dumps(r) + '\n' for r in records))
  os.replace(temporary, path)


def forget(out_dir: os.PathLike, run: str, from_step: int = 0) -> None:
  """Drops ``run``'s lines with ``step >= from_step``, and any torn line."""
  for name in (METRICS_FILE, EVENTS_FILE):
    path = pathlib.Path(out_dir) / name
    if path.exists():
      kept = [
          r for r in read_jsonl(path)
          if r['run'] != run or r['step'] < from_step
      ]
      if len(kept) != len(path.read_text().splitlines()):
        _rewrite(path, kept)


def events(out_dir: os.PathLike, run: Optional[str] = None):
  """The events of ``out_dir`` (of one ``run`` if given)."""
  records = read_jsonl(pathlib.Path(out_dir) / EVENTS_FILE)
  return [r for r in records if run is None or r['run'] == run]


class RunLog:
  """Appends one run's steps and events to the logs of ``out_dir``.

  :meth:`start` opens the files from a step on, dropping what a previous
  process logged from that step on.
  """

  def __init__(self, out_dir: os.PathLike, run: str):
    self.out_dir = pathlib.Path(out_dir)
    self.run = run
    self._metrics = self._events = self._writer = None

  def start(self, first_step: int) -> None:
    self.close()
    forget(self.out_dir, self.run, from_step=first_step)
    self._metrics = open(self.out_dir / METRICS_FILE, 'a')
    self._events = open(self.out_dir / EVENTS_FILE, 'a')
    # purge_step hides from TensorBoard what an earlier process logged from
    # this step on.
    self._writer = SummaryWriter(
        str(self.out_dir / TENSORBOARD_DIR / self.run),
        purge_step=first_step if first_step > 1 else None,
    )

  def records(self) -> list[dict[str, Any]]:
    """This run's step records so far."""
    return [
        r for r in read_jsonl(self.out_dir / METRICS_FILE)
        if r['run'] == self.run
    ]

  @property
  def started(self) -> bool:
    return self._metrics is not None

  def step(self, record: dict[str, Any]) -> None:
    record = {'run': self.run, **record}
    self._metrics.write(json.dumps(record) + '\n')
    self._metrics.flush()
    for name in _TENSORBOARD_SCALARS:
      value = record.get(name)
      if value is not None and math.isfinite(value):
        self._writer.add_scalar(name, value, record['step'])

  def event(self, kind: str, step: int, **fields: Any) -> None:
    record = {'run': self.run, 'event': kind, 'step': step, **fields}
    self._events.write(json.dumps(record) + '\n')
    self._events.flush()
    self._writer.add_text(f'events/{kind}', json.dumps(record), step)

  def close(self) -> None:
    for handle in (self._metrics, self._events, self._writer):
      if handle is not None:
        handle.close()
    self._metrics = self._events = self._writer = None
