"""What ``og.fit`` costs beside the jitted step, against a hand-written loop.

Both candidates train the demo's language model with its guarded step
(``og.make_train_step``) from a checkpoint directory of their own, one round
being what a restarted job does: resume from the newest checkpoint (state
and data position), ``STEPS`` steps with an async save every ``SAVE_EVERY``,
and wait for the last save to land. The hand-written loop does exactly that
and nothing more; ``og.fit`` adds what it is for: the metrics read on the
host every step, the recovery watch, the event log, the preemption check
(no progress bar, no log files). Target: ``og.fit`` ≤ 1.03x the hand loop.
Also measured: how long one async save of the demo's state blocks the loop
(the part of ``save`` before it returns). Target: ≤ 10 ms.
"""

import contextlib
import pathlib
import tempfile
import time
from typing import Any, Callable, Optional

import jax

import optax_guard as og
from benchmarks import timing
from benchmarks import train_step

STEPS = 100
SAVE_EVERY = 50
HAND = f'hand-written loop: resume, {STEPS} steps, save every {SAVE_EVERY}'
FIT = f'og.fit: resume, {STEPS} steps, save every {SAVE_EVERY}'


class _Run:
  """One candidate's own state, data iterator and checkpoint directory."""

  def __init__(self, setup, directory: pathlib.Path, exits):
    self.step = train_step.guarded_step(setup)
    self.data = setup.batches()
    self.checkpointer = exits.enter_context(og.Checkpointer(
        directory, save_interval_steps=SAVE_EVERY, max_to_keep=2))
    self.state = og.TrainState(
        0, *train_step.params_state(setup, setup.txs['guarded']))
    self.blocking: list[float] = []

  def hand_loop(self):
    state, _ = self.checkpointer.restore_or_init(self.state,
                                                 data_iter=self.data)
    params, opt_state, step = state.params, state.opt_state, state.step
    if self.checkpointer.latest_step() is None:
      self.checkpointer.save(state, data_iter=self.data, force=True)
    for _ in range(STEPS):
      params, opt_state, metrics = self.step(params, opt_state,
                                             next(self.data))
      step += 1
      if self.checkpointer.should_save(step):
        # The steps dispatched so far must finish first: the save copies
        # their result. What is timed is the save's own blocking part.
        jax.block_until_ready((params, opt_state))
        start = time.perf_counter()
        self.checkpointer.save(og.TrainState(step, params, opt_state),
                               data_iter=self.data)
        self.blocking.append(time.perf_counter() - start)
    self.checkpointer.wait_until_finished()
    self.state = og.TrainState(step, params, opt_state)
    return metrics

  def fit(self):
    result = og.fit(self.step, self.state, self.data,
                    num_steps=self.state.step + STEPS,
                    checkpointer=self.checkpointer, progress=False,
                    handle_preemption=False)
    self.state = result.state
    return result.state.params


def run(*, lm: str, rounds: int, warmup: int, directory: Optional[str],
        say: Callable[[str], None]) -> dict[str, Any]:
  setup, _ = train_step.demo_setup(lm)
  with contextlib.ExitStack() as exits:
    root = pathlib.Path(
        directory or exits.enter_context(tempfile.TemporaryDirectory()))
    hand, fit = _Run(setup, root / 'hand', exits), _Run(setup, root / 'fit',
                                                        exits)
    measured = timing.measure(
        [timing.Candidate(HAND, hand.hand_loop),
         timing.Candidate(FIT, fit.fit, HAND)],
        rounds=rounds, warmup=warmup, min_sample_s=0.0,
        progress=lambda line: say(f'{lm} LM: {line}'))
    jax.block_until_ready(fit.state.params)
  blocking = sorted(hand.blocking)
  return {
      'demo': train_step.describe(setup, lm), 'steps': STEPS,
      'save_every': SAVE_EVERY, 'rows': measured.rows(),
      'async_save_blocking_ms': {
          'median': 1e3 * blocking[len(blocking) // 2],
          'max': 1e3 * blocking[-1], 'saves': len(blocking)},
  }
