"""The run log: what :func:`optax_guard.fit` did, for people and for tools.

The typed :class:`Event` records (passed to ``fit``'s callback, counted in
the checkpointed :class:`EventLog`), :class:`RunLogger` (``metrics.jsonl``,
``events.jsonl``, TensorBoard) and the progress line. Nothing here decides
anything about training; the loop calls it, it never calls back.
"""

import collections
import dataclasses
import json
import logging
import math
import os
import sys
import time
from typing import Any, ClassVar, Mapping, Optional

_log = logging.getLogger('optax_guard')


def _json_safe(value: Any) -> Any:
  """``value`` as strict JSON: non-finite floats become ``'nan'``/``'inf'``."""
  if isinstance(value, float) and not math.isfinite(value):
    return 'nan' if math.isnan(value) else ('inf' if value > 0 else '-inf')
  if isinstance(value, Mapping):
    return {key: _json_safe(item) for key, item in value.items()}
  if isinstance(value, (list, tuple)):
    return [_json_safe(item) for item in value]
  return value


def _json_line(record: Mapping[str, Any]) -> str:
  return json.dumps(_json_safe(record), allow_nan=False) + '\n'


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
  """The records of a JSON-lines file og wrote (none if it does not exist).

  A line a kill tore mid-write is skipped with a warning. Values stay as
  written (a non-finite number is the string ``"nan"``, ``"inf"``...).
  """
  if not os.path.exists(path):
    return []
  records = []
  with open(path) as f:
    for line in f:
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError:
        _log.warning('%s: ignoring a torn line %r.', path, line[:80])
  return records


def _truncate_jsonl(path: str, last_step: int) -> None:
  """Keeps the records with ``step <= last_step``; drops a torn line.

  The file is replaced atomically, so a kill leaves the old or the new one.
  """
  if not os.path.exists(path):
    return
  with open(path) as f:
    lines = f.readlines()
  kept = []
  for line in lines:
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      continue  # A kill mid-write leaves a partial last line.
    if record.get('step', 0) <= last_step:
      kept.append(line if line.endswith('\n') else line + '\n')
  if kept != lines:
    with open(path + '.tmp', 'w') as f:
      f.writelines(kept)
    os.replace(path + '.tmp', path)


class RunLogger:
  """Writes per-step metrics and events as JSON lines (and TensorBoard).

  Files in ``log_dir``: ``metrics.jsonl`` (one object per step: ``step``,
  ``time`` and the scalar metrics), ``events.jsonl`` (one object per
  :class:`Event`) and, with ``tensorboard``, a tensorboardX event file.
  Lines are strict JSON: a non-finite number is written as the string
  ``"nan"``, ``"inf"`` or ``"-inf"`` (``float()`` reads them back).
  TensorBoard receives finite scalars only; a non-finite one is counted as
  ``1`` under ``nonfinite/<name>`` at its step.

  A run that starts (or resumes) at ``start_step`` first cuts both files
  back to the records with ``step <= start_step`` and hides later
  TensorBoard points, so a crash-resume leaves each step once.

  Args:
    log_dir: the directory, created if needed.
    tensorboard: also write TensorBoard event files (needs tensorboardX).
    start_step: the step training continues from.
  """

  def __init__(
      self, log_dir: str | os.PathLike, *, tensorboard: bool = True,
      start_step: int = 0,
  ):
    os.makedirs(log_dir, exist_ok=True)
    self.log_dir = os.fspath(log_dir)
    paths = [os.path.join(self.log_dir, name) for name in
             ('metrics.jsonl', 'events.jsonl')]
    for path in paths:
      _truncate_jsonl(path, start_step)
    self._metrics, self._events = (open(path, 'a') for path in paths)
    self._writer = None
    if tensorboard:
      try:
        import tensorboardX  # pylint: disable=g-import-not-at-top
      except ImportError as e:
        raise ImportError(
            'TensorBoard logging needs tensorboardX (pip install tensorboardX)'
            ' or pass tensorboard=False.'
        ) from e
      self._writer = tensorboardX.SummaryWriter(
          self.log_dir, purge_step=start_step + 1 if start_step else None
      )

  def log_metrics(self, step: int, metrics: Mapping[str, Any]) -> None:
    """Appends one step's scalar metrics."""
    self._metrics.write(_json_line({'step': step, 'time': time.time(),
                                    **metrics}))
    # On disk before the next step: a killed run keeps what it logged.
    self._metrics.flush()
    if self._writer is not None:
      for name, value in metrics.items():
        if math.isfinite(value):
          self._writer.add_scalar(f'train/{name}', float(value), step)
        else:
          self._writer.add_scalar(f'nonfinite/{name}', 1.0, step)

  def log_event(self, event: 'Event') -> None:
    """Appends one event."""
    record = {'time': time.time(), **event.to_json()}
    self._events.write(_json_line(record))
    self._events.flush()
    if self._writer is not None:
      self._writer.add_text(f'events/{event.kind}', str(event), event.step)

  def flush(self) -> None:
    self._metrics.flush()
    self._events.flush()
    if self._writer is not None:
      self._writer.flush()

  def close(self) -> None:
    self._metrics.close()
    self._events.close()
    if self._writer is not None:
      self._writer.close()


@dataclasses.dataclass(frozen=True)
class Event:
  """Something :func:`fit` did or saw at a loop step.

  The subclasses are the kinds :func:`fit` emits; each is passed to the
  ``callback`` of its step and, except :class:`Saved`, written to
  ``events.jsonl`` and counted in the :class:`EventLog` under its ``kind``.

  Attributes:
    step: the loop step (batches drawn) it belongs to.
  """

  kind: ClassVar[str] = 'event'
  step: int

  def to_json(self) -> dict[str, Any]:
    return {'kind': self.kind, **dataclasses.asdict(self)}


@dataclasses.dataclass(frozen=True)
class SkippedStep(Event):
  """The guard rejected the step (``reason``: ``nonfinite`` or ``spike``)."""

  kind: ClassVar[str] = 'skipped_step'
  reason: str
  loss: float
  grad_norm: Optional[float]

  def __str__(self) -> str:
    return f'step {self.step}: skipped ({self.reason}, loss {self.loss:.4g})'


@dataclasses.dataclass(frozen=True)
class _RerunVerdict(Event):
  """The fields of a verdict on a skipped step that ran twice."""

  reason: str
  first: dict[str, float | None]
  second: dict[str, float | None]


@dataclasses.dataclass(frozen=True)
class TransientFault(_RerunVerdict):
  """The guard skipped the step, and its re-run on the same inputs was clean.

  With ``RecoveryPolicy(rerun=True)`` the re-run's result is applied: the
  batch is not lost. The fault came from the machine (a flipped bit, a
  flaky accelerator, a nondeterministic kernel), not from the data.

  Attributes:
    reason: why the first run was skipped (``nonfinite`` or ``spike``).
    first: the first run's ``loss`` and ``grad_norm``.
    second: the re-run's.
  """

  kind: ClassVar[str] = 'transient_fault'

  def __str__(self) -> str:
    return (f'step {self.step}: transient fault ({self.reason}, loss'
            f' {self.first["loss"]:.4g}); the re-run was clean and applied')


@dataclasses.dataclass(frozen=True)
class BadBatch(Event):
  """The re-run of a skipped step repeated its metrics bit for bit: the batch
  is at fault. It is appended to ``bad_batches.jsonl`` beside the checkpoints
  and dropped whenever a restart draws it again.

  Attributes:
    reason: why the step was skipped (``nonfinite`` or ``spike``).
    index: the batch's position in the data stream (batches drawn before
      it: step ``s`` draws index ``s - 1``).
    digest: SHA-256 of the batch's content (every process's part, agreed).
    data_state: the data iterator's ``get_state()`` right after drawing it
      (``None`` for an iterator without one).
    loss: the step's loss.
    grad_norm: the step's gradient norm (``None`` without a guard metric).
  """

  kind: ClassVar[str] = 'bad_batch'
  reason: str
  index: int
  digest: str
  data_state: Any
  loss: float
  grad_norm: float | None

  def __str__(self) -> str:
    return (f'step {self.step}: bad batch {self.index} ({self.reason}, loss'
            f' {self.loss:.4g}, repeated bit for bit on re-run; recorded)')


@dataclasses.dataclass(frozen=True)
class NondeterministicFault(_RerunVerdict):
  """The guard skipped the step and so did its re-run, with other values.

  Neither the data alone (it would repeat bit for bit) nor a one-off fault
  (the re-run would be clean): a step that does not reproduce, e.g. a
  nondeterministic kernel near overflow or a machine that keeps corrupting.
  The re-run's (skipped) result is kept.

  Attributes:
    reason: why the re-run was skipped (``nonfinite`` or ``spike``).
    first: the first run's ``loss`` and ``grad_norm``.
    second: the re-run's.
  """

  kind: ClassVar[str] = 'nondeterministic_fault'

  def __str__(self) -> str:
    return (f'step {self.step}: nondeterministic fault ({self.reason}); the'
            ' re-run failed differently')


@dataclasses.dataclass(frozen=True)
class DroppedBadBatch(Event):
  """A batch recorded in ``bad_batches.jsonl`` was drawn again (after a
  restart) and dropped without a train step; ``step`` counts it as drawn.

  Attributes:
    index: the batch's position in the data stream.
    digest: its content hash, the recorded one.
  """

  kind: ClassVar[str] = 'dropped_bad_batch'
  index: int
  digest: str

  def __str__(self) -> str:
    return f'step {self.step}: dropped recorded bad batch {self.index}'


@dataclasses.dataclass(frozen=True)
class Rollback(Event):
  """Step ``step`` diverged; training went back to checkpoint ``to_step``.

  The loop continues at ``resume_step``: the batches drawn at steps
  ``to_step + 1`` to ``resume_step`` (batch indices ``to_step`` to
  ``resume_step - 1``) never count; :attr:`dropped_steps` is that window.
  """

  kind: ClassVar[str] = 'rollback'
  to_step: int
  resume_step: int
  reason: str
  skipped_batches: int = 0
  worst_leaves: tuple[tuple[str, float], ...] = ()
  nonfinite_params: tuple[str, ...] = ()

  @property
  def dropped_steps(self) -> range:
    return range(self.to_step + 1, self.resume_step + 1)

  def __str__(self) -> str:
    # Worded as the recovery's own warning: batch indices, then steps.
    return (
        f'step {self.step}: {self.reason} -> rolled back to step'
        f' {self.to_step}, skipping batches {self.to_step}..'
        f'{self.resume_step - 1} (steps {self.to_step + 1}-{self.resume_step})'
    )


@dataclasses.dataclass(frozen=True)
class Diverged(Event):
  """The guard reported ``diverged`` and no recovery is configured."""

  kind: ClassVar[str] = 'diverged'
  reason: str

  def __str__(self) -> str:
    return f'step {self.step}: diverged ({self.reason})'


@dataclasses.dataclass(frozen=True)
class GaveUp(Event):
  """Recovery gave up (:class:`optax_guard.TrainingDiverged`); ``reason``
  says why. A restart raises it again instead of resuming."""

  kind: ClassVar[str] = 'gave_up'
  reason: str

  def __str__(self) -> str:
    return f'step {self.step}: recovery gave up ({self.reason})'


@dataclasses.dataclass(frozen=True)
class Saved(Event):
  """The checkpoint of ``step`` is committed to disk (``healthy``: a rollback
  target).

  An async save is announced at the first step whose callback finds it
  committed (the same step for a synchronous one): a run killed after this
  event resumes from ``step`` or a newer one.
  """

  kind: ClassVar[str] = 'saved'
  healthy: bool

  def __str__(self) -> str:
    health = 'healthy' if self.healthy else 'not healthy'
    return f'step {self.step}: saved ({health})'


@dataclasses.dataclass(frozen=True)
class Preempted(Event):
  """A signal asked to stop; the state of ``step`` is saved."""

  kind: ClassVar[str] = 'preempted'
  signal: str

  def __str__(self) -> str:
    return f'step {self.step}: {self.signal}, saving and stopping'


@dataclasses.dataclass(frozen=True)
class Resumed(Event):
  """The run continued from the checkpoint of ``step``.

  Attributes:
    counts: the event counts restored with it (``{kind: count}``).
  """

  kind: ClassVar[str] = 'resumed'
  counts: dict[str, int]

  def __str__(self) -> str:
    return f'resumed from the checkpoint of step {self.step}'


class EventLog:
  """Counts of events and the most recent ones, small enough to checkpoint.

  The recent events are kept as strict JSON, as :class:`RunLogger` writes
  them (a NaN loss as ``"nan"``), so that their part of the checkpoint's
  ``events`` item is strict JSON too; a checkpoint that holds a raw NaN
  there still loads.

  Args:
    keep: how many recent events to keep.
  """

  def __init__(self, keep: int = 100):
    self.counts: collections.Counter[str] = collections.Counter()
    self.recent: collections.deque[dict[str, Any]] = collections.deque(
        maxlen=keep
    )

  def add(self, event: Event) -> Event:
    self.counts[event.kind] += 1
    self.recent.append(_json_safe(event.to_json()))
    return event

  def state_dict(self) -> dict[str, Any]:
    return {'counts': dict(self.counts), 'recent': list(self.recent)}

  def load_state_dict(self, saved: Mapping[str, Any]) -> None:
    self.counts = collections.Counter(saved['counts'])
    self.recent.clear()
    self.recent.extend(_json_safe(saved['recent']))


class Progress:
  """A tqdm bar on a terminal; elsewhere a plain line every ``every`` seconds.

  Output to a file or a pipe gets no carriage-return redraws, only lines
  such as ``step 120/600 (20%)  loss 2.31  skips 3  rollbacks 0  42 s``.
  """

  def __init__(self, total: int, initial: int, every: float):
    self._total = total
    self._every = every
    self._started = self._shown = time.monotonic()
    self._bar = None
    if sys.stderr.isatty():
      from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
      self._bar = tqdm(total=total, initial=initial, unit='step',
                       dynamic_ncols=True)

  def update(self, step: int, loss: float, counts: Mapping[str, int]) -> None:
    skips, rollbacks = counts['skipped_step'], counts['rollback']
    if self._bar is not None:
      self._bar.update(step - self._bar.n)
      self._bar.set_postfix(loss=f'{loss:.4g}', skips=skips,
                            rollbacks=rollbacks, refresh=False)
      return
    now = time.monotonic()
    if now - self._shown >= self._every or step == self._total:
      self._shown = now
      print(
          f'step {step}/{self._total} ({100 * step // max(self._total, 1)}%)'
          f'  loss {loss:.4g}  skips {skips}  rollbacks {rollbacks}'
          f'  {now - self._started:.0f} s',
          file=sys.stderr, flush=True,
      )

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
