"""The demo: one language model trained twice on the same broken data.

``plain``: optax's ``adamw`` after ``optax.clip_by_global_norm``, as most
training loops do. ``guarded``: the same ``adamw`` inside :func:`og.guard`
with ZClip and spike skipping, trained through the library's NNX path
(:func:`og.nnx_fit_step`, :func:`og.fit`, :func:`og.nnx_update`) with Orbax
checkpoints, rollback to the last good checkpoint when the guard reports
``diverged`` and resume from disk after a preemption. Both runs read the
same batches and faults (:class:`optax_guard.testing.FaultInjector`).
"""

import dataclasses
import functools
import hashlib
import math
import os
import pathlib
import signal
from typing import Any, Optional

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


@dataclasses.dataclass(frozen=True)
class DemoConfig:
  """Everything that decides the demo's numbers (``faults``: checked specs,
  as ``optax_guard.cli.parse_faults`` writes them; ``None``: one of each
  kind, :func:`faults.default_specs`)."""

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

  @property
  def windows(self) -> dict[str, tuple[int, int]]:
    return faults_lib.schedule(self.faults, self.steps)


class Setup:
  """What both runs share: data, model, optimizers and compiled steps."""

  def __init__(self, config: DemoConfig):
    self.config = config
    self.corpus = corpus = data_lib.load_corpus()
    model_config = model_lib.ModelConfig(
        vocab_size=corpus.vocab_size, seq_len=config.seq_len,
        width=config.width, depth=config.depth, heads=config.heads)
    # One compiled initialization instead of one per layer.
    self.new_model = nnx.jit(lambda: model_lib.TinyTransformer(
        model_config, rngs=nnx.Rngs(config.seed)))
    graphdef = nnx.graphdef(nnx.eval_shape(self.new_model))
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, config.learning_rate, max(2, min(30, config.steps // 10)),
        config.steps, end_value=config.learning_rate / 10)
    adamw = lambda: optax.adamw(schedule, weight_decay=config.weight_decay)
    warmup = max(8, min(50, config.steps // 6))  # ZClip's, in steps.
    # From window // 4 on, the spike rule lets a burst in as a level shift:
    # the corrupt shard must raise `diverged` first, in short runs too.
    window = max(4 * config.max_consecutive_skips, warmup)
    self.txs = {
        'plain': optax.chain(optax.clip_by_global_norm(config.clip_norm),
                             adamw()),
        'guarded': og.guard(
            adamw(),
            clip=og.zclip(z_thresh=2.5, max_norm=config.clip_norm,
                          warmup_steps=warmup),
            spikes={'window': window, 'sigma': 6.0},
            max_consecutive_skips=config.max_consecutive_skips),
    }
    heldout = data_lib.windows(corpus.heldout, config.seq_len)['tokens']
    heldout = jnp.asarray(heldout[:config.eval_batches * config.batch_size])
    self.heldout_loss = jax.jit(lambda params: jnp.mean(
        model_lib.token_losses(nnx.merge(graphdef, params), heldout)))
    # The steps compile once and serve every fresh state of their run.
    self.steps = {'plain': _plain_step(graphdef, self.txs['plain'],
                                       config.clip_norm)}
    self.steps['guarded'] = self.start('guarded')[0]

  def start(self, run: str):
    """``(step, state, finish)``: ``og.fit``'s step and step-0 state of a
    fresh model, ``finish(state) -> params``. The guarded run takes the
    library's NNX path; the plain one a params-only optax step, as most do."""
    model = self.new_model()
    if run == 'plain':
      params = nnx.state(model)
      state = og.TrainState(0, params, self.txs[run].init(params))
      return self.steps.get(run), state, lambda state: state.params
    optimizer = nnx.Optimizer(model, self.txs[run], wrt=nnx.Param)
    step, state = og.nnx_fit_step(model_lib.loss_fn, model, optimizer)

    def finish(state):  # The trained model, as a user would take it.
      og.nnx_update(model, optimizer, state)
      return nnx.state(model, nnx.Param)

    return self.steps.get(run, step), state, finish

  def batches(self) -> testing.FaultInjector:
    """The training batches with the configured faults, from the start."""
    config = self.config
    return testing.FaultInjector(
        data_lib.train_batches(self.corpus, batch_size=config.batch_size,
                               seq_len=config.seq_len, seed=config.seed),
        faults_lib.plan(config.windows), keys='step')


def _plain_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                clip_norm: float):
  """A standard optax step; it also reports the global gradient norm and,
  as ``og.metrics`` names it, the norm it was clipped to (``inf``: none)."""
  loss_fn = model_lib.make_loss_fn(graphdef)

  def step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    norm = og.global_norm(grads)
    return optax.apply_updates(params, updates), opt_state, {
        'loss': loss, 'grad_norm': norm,
        'clip_threshold': jnp.where(norm > clip_norm, clip_norm, jnp.inf)}

  return jax.jit(step, donate_argnums=(0, 1))


make_setup = functools.lru_cache(maxsize=2)(Setup)  # The steps stay compiled.


def params_sha256(params: nnx.State) -> str:
  """SHA-256 of the parameters' bytes, leaf by leaf in tree order."""
  digest = hashlib.sha256()
  for leaf in jax.tree.leaves(params):
    digest.update(np.ascontiguousarray(jax.device_get(leaf)).tobytes())
  return digest.hexdigest()


class Listener:
  """Hooks the CLI implements to show a run live; the default is silent."""

  def start(self, run: str, total: int) -> None:
    """``run`` starts, for ``total`` steps."""

  def step(self, run: str, state: og.TrainState, metrics: dict[str, Any],
           events: tuple[Any, ...]) -> None:
    """What ``og.fit`` passed its callback for one loop step."""

  def note(self, run: str, message: str) -> None:
    """Something worth a line."""


class _Watcher:
  """``og.fit``'s callback for one run: shows it, and preempts the guarded
  run with a real SIGTERM at the planned step."""

  def __init__(self, run: str, config: DemoConfig, listener: Listener):
    self.run, self.listener = run, listener
    self.preempt = config.windows.get('preempt', (-1,))[0]
    self.preempted = False

  def __call__(self, state: og.TrainState, metrics: dict[str, Any],
               events: tuple[Any, ...]) -> None:
    for event in events:
      if event.kind == 'resumed':
        self.listener.note(self.run, str(event))
    self.listener.step(self.run, state, metrics, events)
    # A rollback may jump past the planned step: then it comes right after.
    step = next((e.step for e in events if e.kind == 'rollback'), state.step)
    if self.run == 'guarded' and step <= self.preempt <= state.step:
      self.listener.note(self.run, f'step {state.step}: SIGTERM (simulated'
                         ' preemption); the run restarts from disk')
      self.preempted = True
      signal.raise_signal(signal.SIGTERM)


class Interrupted(Exception):
  """A signal stopped the guarded run; its state is saved."""


def train(setup: Setup, run: str, out_dir: pathlib.Path,
          listener: Listener) -> dict[str, Any]:
  """One run to the end; the guarded one resumes from disk after a signal."""
  config = setup.config
  listener.start(run, config.steps)
  watcher = _Watcher(run, config, listener)
  fit = functools.partial(
      og.fit, num_steps=config.steps, log_dir=out_dir / run, progress=False,
      exit_on_preemption=False, eval_every=config.eval_every, callback=watcher,
      eval_fn=lambda state: {'eval_loss': setup.heldout_loss(state.params)})
  logged = (out_dir / run / 'metrics.jsonl').exists() and (
      og.read_run_log(out_dir / run).metrics)
  if run == 'plain' and logged:  # No checkpoints: it starts from scratch.
    listener.note(run, 'starts again from step 0: plain optax keeps no'
                  f' checkpoint here, so the {logged[-1]["step"]} steps it'
                  ' trained before it was stopped are lost')
  best: dict[str, Any] = {}  # The best held-out loss saved, and its step.
  while True:
    step, state, finish = setup.start(run)
    if run == 'plain':
      result = fit(step, state, setup.batches(), handle_preemption=False)
      break
    with og.Checkpointer(out_dir / CHECKPOINT_DIR, max_to_keep=3,
                         save_interval_steps=max(5, min(25, config.steps // 12)),
                         best_metric='eval_loss', best_mode='min') as ckpt:
      watcher.preempted = False
      # A rollback skips past the step that diverged (PaLM: 200-500 batches).
      result = fit(step, state, setup.batches(), checkpointer=ckpt,
                   recovery=og.RecoveryPolicy(
                       max_rollbacks=config.max_rollbacks,
                       skip_extra_batches=max(8, config.steps // 15)))
      if (best_step := ckpt.best_step()) is not None:
        best = {'best_step': best_step,
                'best_loss': ckpt.metrics(best_step).get('eval_loss')}
    if not result.preempted:
      break
    if not watcher.preempted:
      raise Interrupted(f'stopped at step {result.state.step}; its'
                        ' checkpoint is saved')
  params = finish(result.state)
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


def run_demo(config: DemoConfig, out_dir: os.PathLike,
             listener: Optional[Listener] = None) -> dict[str, Any]:
  """Runs (or resumes) the demo into ``out_dir``; returns the summary."""
  listener, out_dir = listener or Listener(), pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  report_lib.write_json(out_dir / CONFIG_FILE, dataclasses.asdict(config))
  summary = report_lib.read_summary(out_dir / SUMMARY_FILE)
  setup = make_setup(config)
  for run in RUNS:
    if run == 'plain' and run in summary:
      listener.note(run, 'already complete in this directory')
      continue
    summary[run] = train(setup, run, out_dir, listener)
    report_lib.write_json(out_dir / SUMMARY_FILE, summary)
  return summary
