"""Item 4: what checkpointing with :class:`og.Checkpointer` costs training.

Two measurements, each interleaved:

* a large state (``og.guard(adamw)`` params and optimizer state, 100M
  parameters by default): how long ``save`` blocks the training loop when
  synchronous and when asynchronous (the async write then finishes untimed,
  before the next candidate), the same without the integrity fingerprints
  (``verify=False``), the whole async save until on disk, and a restore.
  Target: async blocking <= 10% of a sync save.
* the demo's language model trained by its guarded step, in chunks of
  ``SAVE_EVERY`` steps, without and with an async save at the start of each
  chunk; the chunk with the save includes waiting for that save to land, so
  any write the steps did not hide is counted. Target: <= 2% per step.
"""

import contextlib
import inspect
import itertools
import pathlib
import tempfile
from typing import Any, Callable, Optional


import optax_guard as og
from benchmarks import timing
from benchmarks import train_step
from benchmarks import workloads as w

SYNC = 'sync save'
ASYNC_BLOCKING = 'async save (blocking part)'
ASYNC_TOTAL = 'async save (until on disk)'
ASYNC_UNVERIFIED = 'async save, verify=False (blocking part)'
RESTORE = 'restore'
SAVE_EVERY = 100
TRAIN = f'{SAVE_EVERY} guarded demo steps'
TRAIN_SAVING = f'{SAVE_EVERY} guarded demo steps + one async save'


def _large_state(count: int, layers: int) -> og.TrainState:
  _, init, _ = w.compiled(w.FUSED, w.recommended_guard)
  params = w.random_tree(0, 1.0, count=count, layers=layers)
  return og.TrainState(0, params, init(params))


def _save_candidates(state: og.TrainState, root: pathlib.Path, exits):
  steps = itertools.count(1)

  def open_checkpointer(name, async_save, verify=True):
    return exits.enter_context(og.Checkpointer(
        root / name, save_interval_steps=1, max_to_keep=1,
        async_save=async_save, verify=verify,
    ))

  sync = open_checkpointer('sync', False)
  asynchronous = open_checkpointer('async', True)
  # Without the integrity fingerprints, to show their share of the blocking.
  unverified = open_checkpointer('unverified', True, verify=False)
  sync.save(state._replace(step=next(steps)))  # Something to restore.

  def save(checkpointer):
    return lambda: checkpointer.save(state._replace(step=next(steps)))

  def save_and_wait():
    asynchronous.save(state._replace(step=next(steps)))
    asynchronous.wait_until_finished()

  def restore():
    return sync.restore(sync.latest_step(), state)[0]

  return [
      timing.Candidate(SYNC, save(sync)),
      timing.Candidate(ASYNC_BLOCKING, save(asynchronous), SYNC,
                       settle=asynchronous.wait_until_finished),
      timing.Candidate(ASYNC_TOTAL, save_and_wait, SYNC),
      timing.Candidate(ASYNC_UNVERIFIED, save(unverified), SYNC,
                       settle=unverified.wait_until_finished),
      timing.Candidate(RESTORE, restore, SYNC),
  ]


class _Chunk:
  """``SAVE_EVERY`` guarded demo steps, optionally after an async save."""

  def __init__(self, setup, batch, checkpointer: Optional[og.Checkpointer]):
    self.setup = setup
    self.batch = batch
    self.checkpointer = checkpointer
    self.state = og.TrainState(
        0, *train_step.params_state(setup, setup.txs['guarded']))
    self.step = train_step.guarded_step(setup)

  def __call__(self):
    if self.checkpointer is not None:
      self.checkpointer.save(self.state)
    params, opt_state = self.state.params, self.state.opt_state
    for _ in range(SAVE_EVERY):
      params, opt_state, metrics = self.step(
          params, opt_state, self.batch
      )
    self.state = og.TrainState(self.state.step + SAVE_EVERY, params, opt_state)
    if self.checkpointer is not None:
      self.checkpointer.wait_until_finished()
    return metrics


def run(*, count: int, layers: int, lm: str, rounds: int, warmup: int,
        directory: Optional[str], say: Callable[[str], None]) -> dict[str, Any]:
  with contextlib.ExitStack() as exits:
    root = pathlib.Path(
        directory or exits.enter_context(tempfile.TemporaryDirectory())
    )
    state = _large_state(count, layers)
    state_bytes = w.tree_bytes((state.params, state.opt_state))
    say(f'{w.format_size(count)} state: {w.format_bytes(state_bytes)} in'
        f' {root}')
    saves = timing.measure(
        _save_candidates(state, root / 'large', exits), rounds=rounds,
        warmup=warmup, min_sample_s=0.0,
        progress=lambda line: say(f'{w.format_size(count)} state: {line}'),
    )
    del state

    setup, batch = train_step.demo_setup(lm)
    checkpointer = exits.enter_context(og.Checkpointer(
        root / 'demo', save_interval_steps=SAVE_EVERY, max_to_keep=2,
    ))
    training = timing.measure(
        [timing.Candidate(TRAIN, _Chunk(setup, batch, None)),
         timing.Candidate(TRAIN_SAVING, _Chunk(setup, batch, checkpointer),
                          TRAIN)],
        rounds=rounds, warmup=warmup, min_sample_s=0.0,
        progress=lambda line: say(f'{lm} LM every {SAVE_EVERY}: {line}'),
    )
  return {
      'state': {'params': count, 'bytes': state_bytes},
      'save_rows': saves.rows(),
      'demo': train_step.describe(setup, lm),
      'save_every': SAVE_EVERY,
      'default_interval': inspect.signature(og.Checkpointer).parameters[
          'save_interval_steps'].default,
      'train_rows': training.rows(),
  }
