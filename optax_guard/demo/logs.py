"""The demo's logs: ``metrics.jsonl``, ``events.jsonl`` and TensorBoard.

Every step of every run is one JSON line in ``metrics.jsonl``; rollbacks,
preemptions and resumes are lines in ``events.jsonl``. Both carry the run's
``iteration`` (steps executed, counting those a rollback discarded), which
only grows, so a run resumed from a checkpoint first drops the lines written
after that checkpoint and then logs exactly what an uninterrupted run would.
NaN and infinity are written as JSON's ``NaN`` and ``Infinity``.
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
    'loss', 'grad_norm', 'clip_threshold', 'eval_loss', 'total_skips',
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


def forget_run(out_dir: os.PathLike, run: str, after_iteration: int = -1):
  """Drops ``run``'s records with ``iteration > after_iteration``."""
  for name in (METRICS_FILE, EVENTS_FILE):
    path = pathlib.Path(out_dir) / name
    if path.exists():
      kept = [
          r for r in read_jsonl(path)
          if r['run'] != run or r['iteration'] <= after_iteration
      ]
      # A torn last line is dropped too, so that appending starts clean.
      if len(kept) != len(path.read_text().splitlines()):
        _rewrite(path, kept)


class RunLog:
  """Appends one run's steps and events to the logs of ``out_dir``."""

  def __init__(self, out_dir: os.PathLike, run: str, *, resume_iteration=0):
    self.out_dir = pathlib.Path(out_dir)
    self.run = run
    forget_run(self.out_dir, run, after_iteration=resume_iteration)
    self._metrics = open(self.out_dir / METRICS_FILE, 'a')
    self._events = open(self.out_dir / EVENTS_FILE, 'a')
    # purge_step hides from TensorBoard what an earlier process logged past
    # the checkpoint this run resumes from.
    self._writer = SummaryWriter(
        str(self.out_dir / TENSORBOARD_DIR / run),
        purge_step=resume_iteration + 1 if resume_iteration else None,
    )

  def step(self, record: dict[str, Any]) -> None:
    record = {'run': self.run, **record}
    self._metrics.write(json.dumps(record) + '\n')
    self._metrics.flush()
    for name in _TENSORBOARD_SCALARS:
      value = record.get(name)
      if value is not None and math.isfinite(value):
        self._writer.add_scalar(name, value, record['iteration'])

  def event(self, kind: str, **fields: Any) -> None:
    self._events.write(json.dumps({'run': self.run, 'event': kind, **fields}))
    self._events.write('\n')
    self._events.flush()

  def close(self) -> None:
    self._metrics.close()
    self._events.close()
    self._writer.close()


def events(out_dir: os.PathLike, run: Optional[str] = None):
  records = read_jsonl(pathlib.Path(out_dir) / EVENTS_FILE)
  return [r for r in records if run is None or r['run'] == run]
