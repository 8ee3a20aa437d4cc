"""The demo: one language model trained twice on the same broken data.

``plain``: optax's ``adamw`` after ``optax.clip_by_global_norm``, as most
training loops do. ``guarded``: the same ``adamw`` inside :func:`og.guard`
with ZClip and spike skipping, Orbax checkpoints, rollback to the last good
checkpoint when the guard reports ``diverged`` and resume from the newest
valid checkpoint after a preemption or a crash. Both runs are
:func:`optax_guard.fit` calls over the same batches and faults
(:class:`optax_guard.testing.FaultInjector`); this module adds only the model, the data, the
fault schedule and what to show.
"""

import dataclasses
import functools
import hashlib
import json
import math
import os
import pathlib
import signal
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import optax_guard as og
from optax_guard import testing
from optax_guard.demo import data as data_lib
from optax_guard.demo import faults as faults_lib
from optax_guard.demo import model as model_lib
from optax_guard.demo import report as report_lib

CONFIG_FILE = 'config.json'
SUMMARY_FILE = 'summary.json'
CHECKPOINT_DIR = 'checkpoints'
RUNS = ('plain', 'guarded')
ZCLIP_Z = 2.5


@dataclasses.dataclass(frozen=True)
class DemoConfig:
  """Everything that decides the demo's numbers.

  The defaults train the ~250k-parameter model for 600 steps of 32 x 64
  characters. ``faults=None`` takes :func:`faults.default_specs`.
  """

  steps: int = 600
  seed: int = 0
  faults: Optional[tuple[str, ...]] = None
  batch_size: int = 32
  seq_len: int = 64
  width: int = 96
  depth: int = 2
  heads: int = 4
  learning_rate: float = 3e-3
  weight_decay: float = 0.01
  clip_norm: float = 1.0
  eval_every: int = 25
  eval_batches: int = 4
  max_consecutive_skips: int = 6
  max_rollbacks: int = 3

  def __post_init__(self):
    if self.steps < 20:
      raise ValueError(f'steps must be >= 20, got {self.steps}.')
    specs = self.faults or faults_lib.default_specs(self.steps)
    object.__setattr__(self, 'faults', tuple(specs))
    faults_lib.schedule(self.faults, self.steps)  # Validates the specs.

  @property
  def windows(self) -> dict[str, tuple[int, int]]:
    return faults_lib.schedule(self.faults, self.steps)

  @property
  def checkpoint_every(self) -> int:
    return max(5, min(25, self.steps // 12))

  @property
  def statistics_window(self) -> int:
    """Steps of history for ZClip's warm-up (see :attr:`spike_window`)."""
    return max(8, min(50, self.steps // 6))

  @property
  def spike_window(self) -> int:
    """The spike check's window: at least ``4 * max_consecutive_skips``.

    The rule's default ``shift_after`` is ``window // 4``: from there on a
    burst counts as a level shift and is let in. The corrupt shard must
    raise ``diverged`` first, for a rollback, in the short runs too.
    """
    return max(4 * self.max_consecutive_skips, self.statistics_window)

  @property
  def skip_batches(self) -> int:
    """Batches a rollback skips past the step that diverged (PaLM: 200-500)."""
    return max(8, self.steps // 15)


@dataclasses.dataclass
class Setup:
  """What both runs share: data, model, optimizers, steps, evaluation."""

  config: DemoConfig
  corpus: data_lib.Corpus
  init_params: Callable[[], nnx.State]
  txs: dict[str, optax.GradientTransformation]
  steps: dict[str, Callable[..., Any]]
  heldout_loss: Callable[[nnx.State], jax.Array]

  def init_state(self, tx: optax.GradientTransformation):
    """Fresh ``(params, opt_state)`` for ``tx``."""
    params = self.init_params()
    return params, tx.init(params)

  def batches(self) -> testing.FaultInjector:
    """The training batches with the configured faults, from the start."""
    config = self.config
    return testing.FaultInjector(
        data_lib.train_batches(self.corpus, batch_size=config.batch_size,
                               seq_len=config.seq_len, seed=config.seed),
        faults_lib.plan(config.windows, config.steps),
    )

  def evaluate(self, state: og.TrainState) -> dict[str, jax.Array]:
    return {'eval_loss': self.heldout_loss(state.params)}


def _plain_step(loss_fn, tx):
  """A standard optax step; it also reports the global gradient norm."""

  def step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return params, opt_state, {'loss': loss, 'grad_norm': og.global_norm(grads)}

  return jax.jit(step, donate_argnums=(0, 1))


@functools.lru_cache(maxsize=2)
def make_setup(config: DemoConfig) -> Setup:
  """Builds (once per config in a process: the steps stay compiled) the
  data, model and steps."""
  corpus = data_lib.load_corpus()
  model_config = model_lib.ModelConfig(
      vocab_size=corpus.vocab_size, seq_len=config.seq_len,
      width=config.width, depth=config.depth, heads=config.heads,
  )
  graphdef, _ = nnx.split(nnx.eval_shape(
      lambda: model_lib.TinyTransformer(model_config, rngs=nnx.Rngs(0))))

  @jax.jit  # One compiled initialization instead of one per layer.
  def init_params() -> nnx.State:
    return nnx.state(
        model_lib.TinyTransformer(model_config, rngs=nnx.Rngs(config.seed)))

  schedule = optax.warmup_cosine_decay_schedule(
      0.0, config.learning_rate, max(2, min(30, config.steps // 10)),
      config.steps, end_value=config.learning_rate / 10,
  )
  adamw = lambda: optax.adamw(schedule, weight_decay=config.weight_decay)
  window = config.statistics_window
  txs = {
      'plain': optax.chain(optax.clip_by_global_norm(config.clip_norm),
                           adamw()),
      'guarded': og.guard(
          adamw(),
          clip=og.zclip(z_thresh=ZCLIP_Z, max_norm=config.clip_norm,
                        warmup_steps=window),
          spikes={'window': config.spike_window, 'sigma': 6.0},
          max_consecutive_skips=config.max_consecutive_skips,
      ),
  }
  loss_fn = model_lib.make_loss_fn(graphdef)
  heldout = data_lib.windows(corpus.heldout, config.seq_len)['tokens']
  heldout = jnp.asarray(heldout[:config.eval_batches * config.batch_size])

  @jax.jit
  def heldout_loss(params):
    model = nnx.merge(graphdef, params)
    return jnp.mean(model_lib.token_losses(model, heldout))

  return Setup(
      config=config, corpus=corpus, init_params=init_params, txs=txs,
      steps={'plain': _plain_step(loss_fn, txs['plain']),
             'guarded': og.make_train_step(loss_fn, txs['guarded'])},
      heldout_loss=heldout_loss,
  )


def params_sha256(params: nnx.State) -> str:
  """SHA-256 of the parameters' bytes, leaf by leaf in tree order."""
  digest = hashlib.sha256()
  for leaf in jax.tree.leaves(params):
    digest.update(np.ascontiguousarray(jax.device_get(leaf)).tobytes())
  return digest.hexdigest()


class Listener:
  """Hooks the CLI implements to show a run live; the default is silent."""

  def start(self, run: str, total: int) -> None:
    pass

  def step(self, run: str, step: int, metrics: dict[str, Any],
           counts: dict[str, int]) -> None:
    pass

  def note(self, run: str, message: str) -> None:
    pass


def _outcome(run: str, fault: str, metrics: dict[str, Any]) -> Optional[str]:
  """What ``run`` did with ``fault`` at this step (``None``: not yet told;
  a fault over several steps is told once, when the guard first acts)."""
  if run == 'plain':
    if not math.isfinite(metrics['loss'] + metrics['grad_norm']):
      return 'NaN reached the parameters'
    if fault in faults_lib.MULTI_STEP:
      return 'trained on (plain optax cannot refuse a batch)'
    return f'applied (grad norm {metrics["grad_norm"]:.3g} clipped to 1)'
  if metrics['skipped']:
    return 'skipped, optimizer state held bit for bit'
  return None if fault in faults_lib.MULTI_STEP else 'accepted'


class _Watcher:
  """``fit``'s callback for one run: counts, fault notes, the preemption."""

  def __init__(self, run: str, config: DemoConfig, listener: Listener):
    self.run, self.config, self.listener = run, config, listener
    self.counts = {'skipped_step': 0, 'rollback': 0}
    self.noted: set[str] = set()
    # Steps of each slow fault trained on and skipped (rolled back: neither).
    self.slow: dict[str, list[int]] = {'ramp': [0, 0], 'shift': [0, 0]}
    self.preempted = False

  def __call__(self, state: og.TrainState, metrics: dict[str, Any],
               events: tuple[Any, ...]) -> None:
    step = state.step  # The step whose metrics these are, unless rolled back.
    for event in events:
      if event.kind == 'resumed':
        self.counts.update(event.counts)
        self.listener.note(self.run, str(event))
      elif event.kind == 'rollback':
        step = event.step
      if event.kind in self.counts and event.kind != 'resumed':
        self.counts[event.kind] += 1
    fault = faults_lib.fault_at(self.config.windows, step)
    if fault is not None and fault not in self.noted:
      outcome = _outcome(self.run, fault, metrics)
      if outcome is not None:
        self.noted.add(fault)
        self.listener.note(self.run, f'step {step}: {fault} -> {outcome}')
    rolled_back = any(event.kind == 'rollback' for event in events)
    if self.run == 'guarded' and fault in self.slow and not rolled_back:
      counts = self.slow[fault]
      counts[bool(metrics['skipped'])] += 1
      if step == self.config.windows[fault][1]:
        self.listener.note(
            self.run, f'step {step}: {fault} over -> {counts[0]} of its steps'
            f' trained on, {counts[1]} skipped')
    # A rollback is not noted here: og.fit's recovery logs it, and the CLI
    # prints optax_guard's warnings.
    self.listener.step(self.run, state.step, metrics, dict(self.counts))
    preempt = self.config.windows.get('preempt', (None,))[0]
    # A rollback may jump past the planned step: then it comes right after.
    if self.run == 'guarded' and preempt is not None and (
        step <= preempt <= state.step):
      self.listener.note(self.run, f'step {state.step}: SIGTERM (simulated'
                         ' preemption); the run restarts from disk')
      self.preempted = True
      signal.raise_signal(signal.SIGTERM)


class Interrupted(Exception):
  """A signal stopped the guarded run; its state is saved."""


def _fit(setup: Setup, run: str, out_dir: pathlib.Path, watcher: _Watcher,
         checkpointer: Optional[og.Checkpointer] = None) -> Any:
  config = setup.config
  return og.fit(
      setup.steps[run], og.TrainState(0, *setup.init_state(setup.txs[run])),
      setup.batches(),
      num_steps=config.steps, checkpointer=checkpointer,
      recovery=checkpointer and og.RecoveryPolicy(
          max_rollbacks=config.max_rollbacks,
          skip_extra_batches=config.skip_batches),
      log_dir=out_dir / run, progress=False, exit_on_preemption=False,
      handle_preemption=checkpointer is not None, eval_fn=setup.evaluate,
      eval_every=config.eval_every, callback=watcher,
  )


def _last_logged_step(path: pathlib.Path) -> int:
  """The last step in a metrics log (0 if none); a kill may tear its last
  line, which og.fit drops on the next start."""
  step = 0
  if path.exists():
    for line in path.read_text().splitlines():
      try:
        step = json.loads(line)['step']
      except (ValueError, KeyError):
        break
  return step


def train(setup: Setup, run: str, out_dir: pathlib.Path,
          listener: Listener) -> dict[str, Any]:
  """One run to the end; the guarded one resumes from disk after a signal."""
  listener.start(run, setup.config.steps)
  watcher = _Watcher(run, setup.config, listener)
  best: dict[str, Any] = {}  # The best held-out loss saved, and its step.
  while True:
    if run == 'plain':  # No checkpoints: a rerun starts from scratch.
      lost = _last_logged_step(out_dir / run / 'metrics.jsonl')
      if lost:
        listener.note(run, f'starts again from step 0: plain optax keeps no'
                      f' checkpoint here, so the {lost} steps it trained'
                      ' before it was stopped are lost')
      result = _fit(setup, run, out_dir, watcher)
      break
    with og.Checkpointer(out_dir / CHECKPOINT_DIR, max_to_keep=3,
                         save_interval_steps=setup.config.checkpoint_every,
                         best_metric='eval_loss', best_mode='min'
                         ) as checkpointer:
      watcher.preempted = False
      result = _fit(setup, run, out_dir, watcher, checkpointer)
      best_step = checkpointer.best_step()
      best = {} if best_step is None else {
          'best_step': best_step,
          'best_loss': checkpointer.metrics(best_step).get('eval_loss')}
    if not result.preempted:
      break
    if not watcher.preempted:
      raise Interrupted(f'stopped at step {result.state.step}; its'
                        ' checkpoint is saved')
  params = result.state.params
  final_loss = float(setup.heldout_loss(params))
  return {
      'final_loss': final_loss,
      'finite': math.isfinite(final_loss) and all(
          bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(params)),
      'skips': result.events.counts['skipped_step'],
      'rollbacks': result.events.counts['rollback'],
      'params_sha256': params_sha256(params),
      **best,
  }


def check_out_dir(out_dir: pathlib.Path, config: DemoConfig) -> None:
  """Refuses a directory that holds something else than this demo's run."""
  config_path = out_dir / CONFIG_FILE
  wanted = json.loads(json.dumps(dataclasses.asdict(config)))
  if config_path.exists():
    saved = json.loads(config_path.read_text())
    if saved != wanted:
      changed = sorted(k for k in saved if saved[k] != wanted.get(k))
      raise ValueError(
          f'{out_dir} holds a demo run with other settings ({", ".join(changed)}'
          ' differ); pass the same options to resume it, or another --out.'
      )
  elif out_dir.exists() and any(out_dir.iterdir()):
    raise ValueError(
        f'{out_dir} is not empty and holds no optax-guard demo run; choose'
        ' another --out.'
    )


def run_demo(config: DemoConfig, out_dir: os.PathLike,
             listener: Optional[Listener] = None) -> dict[str, Any]:
  """Runs (or resumes) the demo into ``out_dir``; returns the summary."""
  listener = listener or Listener()
  out_dir = pathlib.Path(out_dir)
  check_out_dir(out_dir, config)
  out_dir.mkdir(parents=True, exist_ok=True)
  report_lib.write_json(out_dir / CONFIG_FILE, dataclasses.asdict(config))
  summary_path = out_dir / SUMMARY_FILE
  summary = report_lib.read_summary(summary_path)
  setup = make_setup(config)
  for run in RUNS:
    if run == 'plain' and run in summary:
      listener.note(run, 'already complete in this directory')
      continue
    summary[run] = train(setup, run, out_dir, listener)
    report_lib.write_json(summary_path, summary)
  return summary
