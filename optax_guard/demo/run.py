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
import json
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
ZCLIP_Z = 2.5


@dataclasses.dataclass(frozen=True)
class DemoConfig:
  """Everything that decides the demo's numbers (``faults=None``: one of
  each kind, :func:`faults.default_specs`)."""

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
  def statistics_window(self) -> int:
    """Steps of history for ZClip's warm-up."""
    return max(8, min(50, self.steps // 6))

  @property
  def spike_window(self) -> int:
    """At least ``4 * max_consecutive_skips``: from ``window // 4`` on, the
    spike rule lets a burst in as a level shift, and the corrupt shard must
    raise ``diverged`` first, for a rollback, in the short runs too."""
    return max(4 * self.max_consecutive_skips, self.statistics_window)


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
    self.txs = {
        'plain': optax.chain(optax.clip_by_global_norm(config.clip_norm),
                             adamw()),
        'guarded': og.guard(
            adamw(),
            clip=og.zclip(z_thresh=ZCLIP_Z, max_norm=config.clip_norm,
                          warmup_steps=config.statistics_window),
            spikes={'window': config.spike_window, 'sigma': 6.0},
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
    fresh model, and ``finish(state) -> params`` for the state it returns.
    The guarded run is the library's NNX path; the plain one a params-only
    optax step, as most loops are."""
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

  def evaluate(self, state: og.TrainState) -> dict[str, jax.Array]:
    return {'eval_loss': self.heldout_loss(state.params)}


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

  def step(self, run: str, step: int, metrics: dict[str, Any],
           counts: dict[str, int]) -> None:
    """``step`` is done; ``counts``: skips and rollbacks so far."""

  def note(self, run: str, message: str) -> None:
    """Something worth a line."""


def _outcome(run: str, fault: str, metrics: dict[str, Any]) -> Optional[str]:
  """What ``run`` did with ``fault`` (``None``: not yet; a fault over
  several steps is told once, when the guard first acts)."""
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
  """``og.fit``'s callback for one run: counts, fault notes, the preemption
  (rollbacks are not noted here: ``og.fit``'s recovery warns of them)."""

  def __init__(self, run: str, config: DemoConfig, listener: Listener):
    self.run, self.windows, self.listener = run, config.windows, listener
    self.counts = {'skipped_step': 0, 'rollback': 0}
    self.noted: set[str] = set()
    # Steps of each slow fault trained on and skipped (rolled back: neither).
    self.slow = {'ramp': [0, 0], 'shift': [0, 0]}
    self.preempted = False

  def __call__(self, state: og.TrainState, metrics: dict[str, Any],
               events: tuple[Any, ...]) -> None:
    step = state.step  # The step whose metrics these are, unless rolled back.
    for event in events:
      if event.kind == 'resumed':
        self.counts.update(event.counts)
        self.listener.note(self.run, str(event))
      elif event.kind in self.counts:
        self.counts[event.kind] += 1
      step = event.step if event.kind == 'rollback' else step
    note = lambda text: self.listener.note(self.run, f'step {step}: {text}')
    fault = faults_lib.fault_at(self.windows, step)
    outcome = fault and _outcome(self.run, fault, metrics)
    if outcome and fault not in self.noted:
      self.noted.add(fault)
      note(f'{fault} -> {outcome}')
    guarded = self.run == 'guarded'
    rolled_back = any(event.kind == 'rollback' for event in events)
    if guarded and fault in self.slow and not rolled_back:
      self.slow[fault][bool(metrics['skipped'])] += 1
      if step == self.windows[fault][1]:
        trained, skipped = self.slow[fault]
        note(f'{fault} over -> {trained} of its steps trained on, {skipped}'
             ' skipped')
    self.listener.step(self.run, state.step, metrics, dict(self.counts))
    # A rollback may jump past the planned step: then it comes right after.
    if guarded and step <= self.windows.get('preempt', (-1,))[0] <= state.step:
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
      exit_on_preemption=False, eval_fn=setup.evaluate,
      eval_every=config.eval_every, callback=watcher)
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
  """Runs (or resumes) the demo into ``out_dir``; returns the summary.
  A directory that holds something else than this demo's run is refused."""
  listener, out_dir = listener or Listener(), pathlib.Path(out_dir)
  wanted = json.loads(json.dumps(dataclasses.asdict(config)))
  if (out_dir / CONFIG_FILE).exists():
    saved = json.loads((out_dir / CONFIG_FILE).read_text())
    if saved != wanted:
      changed = sorted(k for k in saved if saved[k] != wanted.get(k))
      raise ValueError(
          f'{out_dir} holds a demo run with other settings ({", ".join(changed)}'
          ' differ); pass the same options to resume it, or another --out.')
  elif out_dir.exists() and any(out_dir.iterdir()):
    raise ValueError(f'{out_dir} is not empty and holds no optax-guard demo'
                     ' run; choose another --out.')
  out_dir.mkdir(parents=True, exist_ok=True)
  report_lib.write_json(out_dir / CONFIG_FILE, wanted)
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
