"""The demo: one language model trained twice on the same broken data.

``plain``: optax's ``adamw`` after ``optax.clip_by_global_norm``, as most
training loops do. ``guarded``: the same ``adamw`` inside :func:`og.guard`
with ZClip and spike skipping, Orbax checkpoints every few steps, rollback
to the last good checkpoint when the guard reports ``diverged`` and resume
from the newest valid checkpoint after a preemption or a crash.
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
from optax_guard.host.fit import FitResult
from optax_guard.demo import data as data_lib
from optax_guard.demo import faults as faults_lib
from optax_guard.demo import logs as logs_lib
from optax_guard.demo import model as model_lib

CONFIG_FILE = 'config.json'
SUMMARY_FILE = 'summary.json'
CHECKPOINT_DIR = 'checkpoints'
ZCLIP_Z = 2.5


@dataclasses.dataclass(frozen=True)
class DemoConfig:
  """Everything that decides the demo's numbers.

  The defaults train the ~250k-parameter model for 600 steps of 32 x 64
  characters. ``faults=None`` takes :func:`faults.default_faults`.
  """

  steps: int = 600
  seed: int = 0
  faults: Optional[tuple[faults_lib.Fault, ...]] = None
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
    if self.faults is None:
      object.__setattr__(
          self, 'faults', faults_lib.default_faults(self.steps)
      )

  @property
  def checkpoint_every(self) -> int:
    return max(5, min(25, self.steps // 12))

  @property
  def warmup_steps(self) -> int:
    return max(2, min(30, self.steps // 10))

  @property
  def statistics_window(self) -> int:
    """Steps of history for ZClip's warm-up and the spike check."""
    return max(8, min(50, self.steps // 6))

  @property
  def skip_batches(self) -> int:
    """Batches a rollback skips past the step that diverged (PaLM: 200-500)."""
    return max(8, self.steps // 15)

  def to_json(self) -> dict[str, Any]:
    fields = dataclasses.asdict(self)
    fields['faults'] = [dataclasses.asdict(f) for f in self.faults]
    return fields


# ----------------------------------------------------------------------------
# The model, its optimizers and its steps.


@dataclasses.dataclass
class Setup:
  """What both runs share: data, model definition, steps, evaluation."""

  config: DemoConfig
  corpus: data_lib.Corpus
  init_params: Callable[[], nnx.State]
  plain_tx: optax.GradientTransformation
  guarded_tx: optax.GradientTransformation
  plain_step: Callable[..., Any]
  guarded_step: Callable[..., Any]
  heldout_loss: Callable[[nnx.State], float]

  def init_state(self, tx: optax.GradientTransformation):
    """Fresh ``(params, opt_state)``, committed to the device.

    Arrays restored from a checkpoint are committed too; the same placement
    lets the train step compiled for one serve the other.
    """
    params = self.init_params()
    return jax.device_put((params, tx.init(params)), jax.devices()[0])

  def batches(self) -> faults_lib.FaultyBatches:
    """The training batches, with the configured faults, from the start."""
    return faults_lib.FaultyBatches(
        data_lib.BatchIterator(
            self.corpus.train, batch_size=self.config.batch_size,
            seq_len=self.config.seq_len, seed=self.config.seed,
        ),
        self.config.faults, vocab_size=self.corpus.vocab_size,
        seed=self.config.seed,
    )


def _plain_step(loss_fn, tx):
  """A standard optax step; it also reports the global gradient norm."""

  def step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return params, opt_state, {'loss': loss, 'grad_norm': optax.tree.norm(grads)}

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
  graphdef, _ = nnx.split(
      nnx.eval_shape(
          lambda: model_lib.TinyTransformer(model_config, rngs=nnx.Rngs(0))
      )
  )

  # One compiled initialization instead of one small compile per layer.
  @jax.jit
  def init_params() -> nnx.State:
    model = model_lib.TinyTransformer(
        model_config, rngs=nnx.Rngs(config.seed)
    )
    return nnx.state(model)

  schedule = optax.warmup_cosine_decay_schedule(
      0.0, config.learning_rate, config.warmup_steps, config.steps,
      end_value=config.learning_rate / 10,
  )
  adamw = lambda: optax.adamw(schedule, weight_decay=config.weight_decay)
  plain_tx = optax.chain(optax.clip_by_global_norm(config.clip_norm), adamw())
  window = config.statistics_window
  guarded_tx = og.guard(
      adamw(),
      clip=og.zclip(
          z_thresh=ZCLIP_Z, max_norm=config.clip_norm, warmup_steps=window
      ),
      spikes={'window': window, 'sigma': 6.0},
      max_consecutive_skips=config.max_consecutive_skips,
  )
  loss_fn = model_lib.make_loss_fn(graphdef)

  heldout = [
      data_lib.batch_at(
          corpus.heldout, i, batch_size=config.batch_size,
          seq_len=config.seq_len, seed=config.seed,
      )['tokens']
      for i in range(config.eval_batches)
  ]
  heldout = jnp.asarray(np.concatenate(heldout))

  @jax.jit
  def heldout_loss_fn(params):
    model = nnx.merge(graphdef, params)
    return jnp.mean(model_lib.token_losses(model, heldout))

  return Setup(
      config=config,
      corpus=corpus,
      init_params=init_params,
      plain_tx=plain_tx,
      guarded_tx=guarded_tx,
      plain_step=_plain_step(loss_fn, plain_tx),
      guarded_step=og.make_train_step(loss_fn, guarded_tx),
      heldout_loss=lambda params: float(heldout_loss_fn(params)),
  )


def params_sha256(params: nnx.State) -> str:
  """SHA-256 of the parameters' bytes, leaf by leaf in tree order."""
  digest = hashlib.sha256()
  for leaf in jax.tree.leaves(params):
    digest.update(np.ascontiguousarray(jax.device_get(leaf)).tobytes())
  return digest.hexdigest()


def _all_finite(params: nnx.State, loss: float) -> bool:
  leaves = jax.device_get(jax.tree.leaves(params))
  return math.isfinite(loss) and all(np.isfinite(x).all() for x in leaves)


def _scalars(metrics: dict[str, jax.Array]) -> dict[str, Any]:
  """Host copies of a step's metrics as plain JSON-able numbers."""
  out = {}
  for name, value in jax.device_get(metrics).items():
    value = np.asarray(value)
    if value.dtype == np.bool_:
      out[name] = bool(value)
    elif np.issubdtype(value.dtype, np.integer):
      out[name] = int(value)
    else:
      out[name] = float(value)
  return out


# ----------------------------------------------------------------------------
# Reporting progress to the caller.


class Listener:
  """Hooks the CLI implements to show a run live; the default is silent."""

  def start(self, run: str, total: int, done: int) -> None:
    pass

  def step(self, run: str, record: dict[str, Any]) -> None:
    pass

  def note(self, run: str, message: str) -> None:
    pass


def _fault_note(run: str, fault: faults_lib.Fault, m: dict[str, Any]):
  """One line on what a run did with a fault, or ``None`` if not yet."""
  if run == 'plain':
    if not math.isfinite(m['loss']) or not math.isfinite(m['grad_norm']):
      outcome = 'NaN reached the parameters'
    elif fault.name == 'poison':
      outcome = 'trained on (plain optax has no way to refuse a batch)'
    else:
      outcome = (f'applied (grad norm {m["grad_norm"]:.3g} clipped to'
                 f' {m["clip_bound"]:g})')
  elif m['skipped']:
    outcome = 'skipped, optimizer state held bit for bit'
    if fault.name == 'poison':
      outcome = f'loss {m["loss"]:.2f} is a spike: ' + outcome
  elif fault.name == 'poison':
    return None  # Mildly poisoned batches pass until the loss spikes.
  else:
    outcome = 'accepted'
  return f'step {m["step"]}: {faults_lib.DESCRIPTIONS[fault.name]} -> {outcome}'


def _note_fault(listener, run, fault, record, noted: set[str]) -> None:
  """Tells ``listener`` once per fault what ``run`` did with it."""
  if fault is not None and fault.name not in noted:
    note = _fault_note(run, fault, record)
    if note is not None:
      noted.add(fault.name)
      listener.note(run, note)


# ----------------------------------------------------------------------------
# The plain run.


def run_plain(setup: Setup, out_dir: pathlib.Path, listener: Listener):
  """Trains with plain optax; with no checkpoints it starts from scratch."""
  config = setup.config
  log = logs_lib.RunLog(out_dir, 'plain')
  log.start(first_step=1)
  params, opt_state = setup.init_state(setup.plain_tx)
  batches = setup.batches()
  listener.start('plain', config.steps, 0)
  noted = set()
  try:
    for step in range(1, config.steps + 1):
      params, opt_state, metrics = setup.plain_step(
          params, opt_state, next(batches)
      )
      fault = batches.fault_at(step)
      record = {
          'step': step, 'fault': None if fault is None else fault.name,
          'clip_bound': config.clip_norm, **_scalars(metrics),
      }
      if step % config.eval_every == 0 or step == config.steps:
        record['eval_loss'] = setup.heldout_loss(params)
      log.step(record)
      listener.step('plain', record)
      _note_fault(listener, 'plain', fault, record, noted)
  finally:
    log.close()
  final_loss = setup.heldout_loss(params)
  return {
      'final_loss': final_loss,
      'finite': _all_finite(params, final_loss),
      'skips': 0,
      'rollbacks': 0,
  }


# ----------------------------------------------------------------------------
# The guarded run.


class Interrupted(Exception):
  """A signal stopped the guarded run; its state is saved."""


class GuardedRun:
  """The guarded run: :func:`optax_guard.fit` with checkpoints and recovery.

  Each :func:`optax_guard.fit` call resumes from the newest valid checkpoint
  (or starts fresh). The simulated preemption is a real SIGTERM to this
  process: ``fit`` finishes the step, saves and returns; the run then
  starts over from what is on disk, as a restarted job would.
  """

  def __init__(self, setup: Setup, out_dir: pathlib.Path, listener: Listener):
    self.setup = setup
    self.config = setup.config
    self.listener = listener
    self.directory = out_dir / CHECKPOINT_DIR
    self.log = logs_lib.RunLog(out_dir, 'guarded')
    self.checkpointer: Optional[og.Checkpointer] = None
    self.preempting = False
    self.noted: set[str] = set()
    self.skips = self.rollbacks = 0  # For the progress display.

  def _clip_bound(self, metrics: dict[str, Any]) -> float:
    """The norm above which ZClip clips the next step."""
    bound = self.config.clip_norm
    if metrics['zclip_mean'] > 0:  # Zero until ZClip's warm-up is over.
      z_bound = metrics['zclip_mean'] + ZCLIP_Z * metrics['zclip_std']
      bound = min(bound, z_bound)
    return bound

  def _on_step(self, state: og.TrainState, metrics: dict[str, Any]) -> None:
    """``fit``'s callback: log, show, and inject the preemption."""
    config = self.config
    diverged = bool(metrics['diverged'])
    # A rollback has already moved state.step past the skipped batches.
    step = state.step - config.skip_batches if diverged else state.step
    if not self.log.started:
      self.log.start(first_step=step)
      # Counts for the progress display, from what is logged before `step`.
      self.skips = sum(r['skipped'] for r in self.log.records())
      self.rollbacks = sum(
          e['event'] == 'rollback' for e in logs_lib.events(
              self.log.out_dir, 'guarded')
      )
      if step > 1:
        self.log.event('resume', step - 1)
        self.listener.note(
            'guarded', f'resumed from the checkpoint of step {step - 1}'
        )
    fault = self.batches.fault_at(step)
    self.skips += metrics['skipped']
    self.rollbacks += diverged
    record = {
        'step': step, 'fault': None if fault is None else fault.name,
        'clip_bound': self._clip_bound(metrics), 'skips': self.skips,
        'rollbacks': self.rollbacks, **metrics,
    }
    if step % config.eval_every == 0 or step == config.steps:
      record['eval_loss'] = self.setup.heldout_loss(state.params)
    self.log.step(record)
    self.listener.step('guarded', record)
    _note_fault(self.listener, 'guarded', fault, record, self.noted)
    if diverged:
      to_step = self.checkpointer.last_good_step()
      self.log.event(
          'rollback', step, to_step=to_step, resume_step=state.step
      )
      self.listener.note(
          'guarded',
          f'step {step}: {metrics["consecutive_skips"]} skips in a row ->'
          f' rolled back to the last good checkpoint (step {to_step}),'
          f' skipping batches {step + 1}-{state.step}',
      )
    preempt_step = self.batches.preempt_step
    # A rollback may skip past the planned step: then it comes right after.
    if preempt_step is not None and step <= preempt_step <= state.step:
      self.log.event('preempt', state.step)
      self.listener.note(
          'guarded', f'step {state.step}: SIGTERM (simulated preemption)'
      )
      self.preempting = True
      signal.raise_signal(signal.SIGTERM)

  def _fit_once(self) -> FitResult:
    """One process lifetime: resume from disk, train until done or signal."""
    setup = self.setup
    self.batches = setup.batches()
    self.log.close()
    init = og.TrainState(0, *setup.init_state(setup.guarded_tx))
    with og.Checkpointer(
        self.directory, save_interval_steps=self.config.checkpoint_every,
        max_to_keep=3,
    ) as self.checkpointer:
      return og.fit(
          setup.guarded_step, init, self.batches,
          num_steps=self.config.steps, checkpointer=self.checkpointer,
          recovery=og.RecoveryPolicy(
              max_rollbacks=self.config.max_rollbacks,
              skip_extra_batches=self.config.skip_batches,
          ),
          progress=False, exit_on_preemption=False, callback=self._on_step,
      )

  def train(self) -> dict[str, Any]:
    self.listener.start('guarded', self.config.steps, 0)
    try:
      while True:
        self.preempting = False
        result = self._fit_once()
        if not result.preempted:
          break
        if not self.preempting:
          raise Interrupted(
              f'stopped at step {result.state.step}; its checkpoint is saved'
          )
        self.listener.note(
            'guarded',
            f'step {result.state.step}: checkpoint saved; the training state'
            ' is dropped and restored from disk',
        )
    finally:
      self.log.close()
    final_loss = self.setup.heldout_loss(result.state.params)
    return {
        'final_loss': final_loss,
        'finite': _all_finite(result.state.params, final_loss),
        'skips': result.events.counts['skipped_step'],
        'rollbacks': len(result.recovery.rollbacks),
        'params_sha256': params_sha256(result.state.params),
    }


# ----------------------------------------------------------------------------
# The whole demo.


def check_out_dir(out_dir: pathlib.Path, config: DemoConfig) -> None:
  """Refuses a directory that holds something else than this demo's run."""
  config_path = out_dir / CONFIG_FILE
  if config_path.exists():
    saved = json.loads(config_path.read_text())
    if saved != config.to_json():
      changed = sorted(k for k in saved if saved[k] != config.to_json().get(k))
      raise ValueError(
          f'{out_dir} holds a demo run with other settings ({", ".join(changed)}'
          ' differ); pass the same options to resume it, or another --out.'
      )
  elif out_dir.exists() and any(out_dir.iterdir()):
    raise ValueError(
        f'{out_dir} is not empty and holds no optax-guard demo run; choose'
        ' another --out.'
    )


def run_demo(
    config: DemoConfig,
    out_dir: os.PathLike,
    listener: Optional[Listener] = None,
) -> dict[str, Any]:
  """Runs (or resumes) the demo into ``out_dir``; returns the summary."""
  listener = listener or Listener()
  out_dir = pathlib.Path(out_dir)
  check_out_dir(out_dir, config)
  out_dir.mkdir(parents=True, exist_ok=True)
  _write_json(out_dir / CONFIG_FILE, config.to_json())
  summary_path = out_dir / SUMMARY_FILE
  summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
  setup = make_setup(config)
  if 'plain' in summary:
    listener.note('plain', 'already complete in this directory')
  else:
    summary['plain'] = run_plain(setup, out_dir, listener)
    _write_json(summary_path, summary)
  summary['guarded'] = GuardedRun(setup, out_dir, listener).train()
  _write_json(summary_path, summary)
  return summary


def _write_json(path: pathlib.Path, value: Any) -> None:
  temporary = path.with_suffix('.tmp')
  temporary.write_text(json.dumps(value, indent=1))
  os.replace(temporary, path)
