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
(the part of ``save`` before it returns). Target: ≤ 10 ms. Beside it, the
same for plain Orbax (a ``CheckpointManager`` saving the same arrays, once in
the state's own ``nnx.State`` tree and once as nested dicts), so that what
og adds is told apart from what Orbax's own save costs.
"""

import contextlib
import pathlib
import tempfile
import time
from typing import Any, Callable, Optional

import jax
import orbax.checkpoint as ocp

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


def _median_ms(seconds: list[float]) -> dict[str, float]:
  ordered = sorted(seconds)
  return {'median': 1e3 * ordered[len(ordered) // 2],
          'max': 1e3 * ordered[-1], 'saves': len(ordered)}


def _orbax_blocking(directory: pathlib.Path, tree: Any,
                    saves: int) -> dict[str, float]:
  """One plain Orbax async save of ``tree``: the part before it returns."""
  blocking = []
  with ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
      max_to_keep=2)) as manager:
    for step in range(saves + 1):
      manager.wait_until_finished()
      start = time.perf_counter()
      manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(tree)))
      if step:  # The first save also opens Orbax's machinery.
        blocking.append(time.perf_counter() - start)
    manager.wait_until_finished()
  return _median_ms(blocking)


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
    tree = {'params': hand.state.params, 'opt_state': hand.state.opt_state}
    saves = len(hand.blocking)
    orbax_blocking = {
        'nnx_state': _orbax_blocking(root / 'orbax_nnx', tree, saves),
        'nested_dicts': _orbax_blocking(
            root / 'orbax_dicts',
            ocp.tree.from_flat_dict(ocp.tree.to_flat_dict(tree)), saves),
    }
  return {
      'demo': train_step.describe(setup, lm), 'steps': STEPS,
      'save_every': SAVE_EVERY, 'rows': measured.rows(),
      'async_save_blocking_ms': _median_ms(hand.blocking),
      'orbax_save_blocking_ms': orbax_blocking,
  }
