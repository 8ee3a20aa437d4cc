"""Item 2: the whole train step of the demo's language model, guarded vs not.

The model, data and optimizers are the demo's own
(:func:`optax_guard.demo.run.make_setup`): the char-level NNX transformer on
``pydoc_data`` text, trained by the demo's plain step (optax
``chain(clip_by_global_norm, adamw)``) and by its guarded step
(``og.guard(adamw, clip=og.zclip(...), spikes=...)`` through
:func:`og.make_train_step`). The forward and backward pass dominate the
step, so a guard that costs one read of the gradients should vanish in it:
the target is guarded / unguarded <= 1.03. Measured in the same rounds: a
bare ``adamw`` step, and the same guard in the two NNX forms, fused
(:func:`og.make_nnx_train_step`) and as a pure transformation
(``nnx.Optimizer.update`` under ``nnx.jit``, the path of most Flax code),
which pay the same ``nnx.jit`` overhead and are compared with each other.
"""

import functools
from typing import Any, Callable

import jax
import optax
from flax import nnx

import optax_guard as og
from benchmarks import timing
from benchmarks import workloads as w
from optax_guard.demo import model as model_lib
from optax_guard.demo import run as demo_run

PLAIN = "demo's plain step: optax chain(clip_by_global_norm, adamw)"
GUARDED = "demo's guarded step: og.guard via og.make_train_step"
GUARDED_NNX = 'the same guard via og.make_nnx_train_step'
GUARDED_NNX_OPTIMIZER = 'the same guard via nnx.Optimizer.update (pure)'
BARE = 'bare adamw step'

# Ratios between two candidates, same rounds: (numerator, denominator).
COMPARISONS = {
    'guarded_over_bare': (GUARDED, BARE),
    'nnx_pure_over_nnx_fused': (GUARDED_NNX_OPTIMIZER, GUARDED_NNX),
}

# The demo's defaults, and a tiny model for the smoke test.
LM_CONFIGS = {
    'demo': demo_run.DemoConfig(),
    'tiny': demo_run.DemoConfig(
        steps=20, batch_size=4, seq_len=16, width=16, depth=1, heads=2
    ),
}


@functools.cache
def demo_setup(lm: str) -> tuple[demo_run.Setup, dict[str, jax.Array]]:
  """The demo's setup for ``LM_CONFIGS[lm]`` and its first clean batch
  (memoised, so that checkpointing reuses the steps compiled here)."""
  setup = demo_run.make_setup(LM_CONFIGS[lm])
  # Not committed to a device, like the initial states: a committed batch
  # made each step's second call compile again (its state then committed
  # too), in the warm-up call that sizes the timed samples.
  return setup, jax.device_put(next(setup.batches()))


def _graphdef(setup: demo_run.Setup) -> nnx.GraphDef:
  """The demo model's structure."""
  return nnx.graphdef(nnx.eval_shape(setup.new_model))


def params_state(setup: demo_run.Setup, tx: optax.GradientTransformation):
  """A fresh ``(params, opt_state)`` of the demo model for a params-only
  step."""
  params = nnx.state(setup.new_model())
  return params, tx.init(params)


@functools.lru_cache(maxsize=2)
def guarded_step(setup: demo_run.Setup):
  """The guarded demo step in params-only form (``og.make_train_step``),
  compiled once per setup; the demo itself trains through
  ``og.nnx_fit_step``."""
  return og.make_train_step(model_lib.make_loss_fn(_graphdef(setup)),
                            setup.txs['guarded'])


def describe(setup: demo_run.Setup, lm: str) -> dict[str, Any]:
  config = setup.config
  return {
      'lm': lm,
      'params': sum(x.size for x in jax.tree.leaves(
          nnx.state(setup.new_model()))),
      'batch_size': config.batch_size, 'seq_len': config.seq_len,
      'width': config.width, 'depth': config.depth, 'heads': config.heads,
  }


@functools.partial(nnx.jit, donate_argnums=(0, 1))
def _nnx_optimizer_step(model, optimizer, batch) -> jax.Array:
  """The textbook NNX step: ``nnx.Optimizer.update`` with the loss."""
  loss, grads = nnx.value_and_grad(model_lib.loss_fn)(model, batch)
  optimizer.update(model, grads, value=loss)
  return loss


class _NnxStepper:
  """Runs an NNX step on its own model and ``nnx.Optimizer``."""

  def __init__(self, setup: demo_run.Setup, batch, step):
    self.model = setup.new_model()
    self.optimizer = nnx.Optimizer(self.model, setup.txs['guarded'],
                                   wrt=nnx.Param)
    self.step = step
    self.batch = batch

  def __call__(self):
    return self.step(self.model, self.optimizer, self.batch)


def _candidates(setup: demo_run.Setup, batch) -> list[timing.Candidate]:
  loss_fn = model_lib.make_loss_fn(_graphdef(setup))
  config = setup.config
  bare_tx = optax.adamw(config.learning_rate, weight_decay=config.weight_decay)
  steps = [
      (PLAIN, setup.steps['plain'], setup.txs['plain'], None),
      (GUARDED, guarded_step(setup), setup.txs['guarded'], PLAIN),
      (BARE, w.make_bare_train_step(loss_fn, bare_tx), bare_tx, PLAIN),
  ]
  candidates = []
  for name, step, tx, baseline in steps:
    params, opt_state = params_state(setup, tx)
    candidates.append(timing.Candidate(
        name, w.Stepper(step, params, opt_state, batch), baseline
    ))
  for name, step in ((GUARDED_NNX, og.make_nnx_train_step(model_lib.loss_fn)),
                     (GUARDED_NNX_OPTIMIZER, _nnx_optimizer_step)):
    candidates.append(
        timing.Candidate(name, _NnxStepper(setup, batch, step), PLAIN)
    )
  return candidates


def run(*, lm: str, rounds: int, warmup: int, min_sample_s: float,
        say: Callable[[str], None]) -> dict[str, Any]:
  setup, batch = demo_setup(lm)
  timings = timing.measure(
      _candidates(setup, batch), rounds=rounds, warmup=warmup,
      min_sample_s=min_sample_s, progress=lambda line: say(f'{lm} LM: {line}'),
  )
  return {
      'model': describe(setup, lm),
      'rows': timings.rows(),
      'comparisons': timings.comparisons(COMPARISONS),
  }
