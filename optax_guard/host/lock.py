"""Who may write a checkpoint directory, and whether it takes writes.

One writer, checked before each write; and a probe before each save
(:func:`check_writable`), so that an unwritable directory raises
:class:`CheckpointSaveError` before Orbax starts its background threads.

:class:`WriterLock` takes an exclusive lock on ``<directory>/.writer.lock``
(``filelock``; the kernel drops it when the process dies, even by SIGKILL)
and records its holder in ``.writer.json`` (marked ``released`` when it
closes). A lock file can be deleted or
replaced while its holder runs (a clean-up script, a user); the lock then
protects nothing. So the holder checks, before every save and every
deletion (:meth:`WriterLock.check`), that the file on disk is still the one
it locked, and takes it again if it was only deleted; and a new writer that
got a lock refuses to start while ``.writer.json`` names a live writer on
this host that did not release it, before it deletes anything (Orbax removes unfinished
saves when a writer opens, and the unfinished save may be the holder's
save in flight). A lock left by a SIGKILLed process names a dead process
and does not block the restart.

Under ``jax.distributed``, process 0 holds the lock and every process gets
the same answer. Remote paths (``gs://``) are not locked.
"""

import datetime
import json
import os
import socket
from typing import Any, Optional

import filelock
import jax
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

LOCK_FILE = '.writer.lock'
HOLDER_FILE = '.writer.json'


class CheckpointLockedError(RuntimeError):
  """Another writer holds the checkpoint directory; the message names it."""


class CheckpointSaveError(RuntimeError):
  """Saving a step failed (unwritable directory, full disk, ...).

  Attributes:
    step: the step whose save failed (``None`` if unknown).
    directory: the checkpoint directory.
  """

  def __init__(self, step: Optional[int], directory: Any, error: Any):
    which = 'a checkpoint' if step is None else f'step {step}'
    super().__init__(
        f'Saving {which} to {directory} failed: {error}. Nothing of that'
        ' step was committed; the steps saved before are intact.')
    self.step = step
    self.directory = directory


def check_writable(directory: epath.Path, step: int) -> None:
  """Raises :class:`CheckpointSaveError` unless ``directory`` takes a new
  entry, alike on every process.

  Orbax creates the step directory in a background thread; when that fails,
  its other threads wait 300 s for the directory and the process cannot exit
  meanwhile. A directory made and removed here fails first.
  """
  error: Any = None
  if '://' not in str(directory):
    probe = directory / f'.og-write-probe-{jax.process_index()}-{os.getpid()}'
    try:
      probe.mkdir()
      probe.rmdir()
    except OSError as e:
      error = e
  failed = error is not None
  if jax.process_count() > 1:
    failed = bool(np.any(multihost_utils.process_allgather(np.int32(failed))))
  if failed:
    raise CheckpointSaveError(
        step, directory, error or 'not writable on another process')


def _holder_record(directory: epath.Path) -> Optional[dict[str, Any]]:
  try:
    return json.loads((directory / HOLDER_FILE).read_text())
  except Exception:  # pylint: disable=broad-except
    return None


def _describe(record: Optional[dict[str, Any]]) -> str:
  if record is None:
    return f'holder unknown: no readable {HOLDER_FILE}'
  return (f'host {record.get("host")}, pid {record.get("pid")}, since'
          f' {record.get("since")}')


def _is_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # Alive, another user's.
    return True
  return True


def _refusal(directory: epath.Path, holder: str) -> CheckpointLockedError:
  return CheckpointLockedError(
      f'{directory} is being written by another Checkpointer ({holder}).'
      ' Close that one (or let its process end), use another directory,'
      ' or pass read_only=True to restore without writing.'
  )


def _agree(problem: str) -> str:
  """The same answer on every process: a lone failure would leave the
  others waiting in a collective."""
  if jax.process_count() > 1 and multihost_utils.broadcast_one_to_all(
      np.int32(bool(problem))):
    return problem or 'see process 0'
  return problem


class WriterLock:
  """The one-writer lock of ``directory``; raises if another writer holds it.

  Args:
    directory: the checkpoint directory (created if missing).
    is_open_here: says whether a writer of this process holds ``directory``
      (its lock file may be gone, so the file lock cannot say).

  Raises:
    CheckpointLockedError: naming the holder.
  """

  def __init__(self, directory: epath.Path, is_open_here=lambda: False):
    self._directory = directory
    self._lock: Optional[filelock.BaseFileLock] = None
    self._identity: Optional[tuple[int, int]] = None
    problem = ''
    if jax.process_index() == 0 and '://' not in str(directory):
      directory.mkdir(parents=True, exist_ok=True)
      problem = self._take(is_open_here)
    problem = _agree(problem)
    if problem:
      raise _refusal(directory, problem)

  def _take(self, is_open_here) -> str:
    """Locks the file and records this process; ``''`` or the holder."""
    path = os.fspath(self._directory / LOCK_FILE)
    # Not thread-local: close() may run on another thread than __init__.
    lock = filelock.FileLock(path, timeout=0, thread_local=False)
    try:
      lock.acquire()
    except filelock.Timeout:
      return _describe(_holder_record(self._directory))
    record = _holder_record(self._directory)
    if (record is not None and not record.get('released')
        and record.get('host') == socket.gethostname()):
      pid = record.get('pid')
      if pid == os.getpid() and is_open_here() or (
          pid != os.getpid() and isinstance(pid, int) and _is_alive(pid)):
        # The lock file of a live writer was deleted: refuse before
        # anything (Orbax's clean-up of unfinished saves) runs.
        lock.release()
        return f'{_describe(record)}; its lock file was deleted or replaced'
    self._lock = lock
    stat = os.stat(path)
    self._identity = (stat.st_dev, stat.st_ino)
    since = datetime.datetime.now(datetime.timezone.utc).isoformat(
        timespec='seconds')
    (self._directory / HOLDER_FILE).write_text(json.dumps(
        {'host': socket.gethostname(), 'pid': os.getpid(), 'since': since}))
    return ''

  def check(self) -> None:
    """Before a save or a deletion: the lock on disk is still this one.

    A deleted lock file is taken again; one replaced by another writer's
    raises.

    Raises:
      CheckpointLockedError: when another writer holds the directory now.
    """
    problem = ''
    if self._lock is not None:
      path = self._directory / LOCK_FILE
      try:
        stat = os.stat(path)
        same = (stat.st_dev, stat.st_ino) == self._identity
      except FileNotFoundError:
        same = False
      if not same:
        self._lock.release()
        self._lock = None
        problem = self._take(lambda: False)
    problem = _agree(problem)
    if problem:
      raise _refusal(self._directory, problem)

  def release(self) -> None:
    """Lets the directory go; ``.writer.json`` says it was released."""
    if self._lock is None:
      return
    try:
      record = _holder_record(self._directory)
      if record is not None and record.get('pid') == os.getpid():
        (self._directory / HOLDER_FILE).write_text(json.dumps(
            {**record, 'released': True}))
    finally:
      self._lock.release()
      self._lock = None
