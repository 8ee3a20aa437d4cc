"""Item 2: the whole train step of the demo's language model, guarded vs not.

The model and data are the demo's (:mod:`optax_guard.demo`): the char-level
NNX transformer on ``pydoc_data`` text. The forward and backward pass
dominate the step, so a guard that costs one read of the gradients should
vanish in it: the target is guarded / unguarded <= 1.03.
"""

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import optax_guard as og
from benchmarks import timing
from benchmarks import workloads as w
from optax_guard.demo import data as data_lib
from optax_guard.demo import model as model_lib

UNGUARDED = 'adamw (unguarded)'
OPTAX_CLIP = 'optax chain(clip_by_global_norm, adamw)'
GUARDED = 'og.guard via og.make_train_step'

# The demo's defaults, and a tiny model for the smoke test.
LM_CONFIGS = {
    'demo': dict(batch_size=32, seq_len=64, width=96, depth=2, heads=4),
    'tiny': dict(batch_size=4, seq_len=16, width=16, depth=1, heads=2),
}
LEARNING_RATE = 3e-3
WEIGHT_DECAY = 0.01


def _adamw() -> optax.GradientTransformation:
  return optax.adamw(LEARNING_RATE, weight_decay=WEIGHT_DECAY)


def _candidates(loss_fn, params, batch) -> list[timing.Candidate]:
  guarded_tx = og.guard(
      _adamw(), clip=og.zclip(max_norm=1.0), spikes={'window': 50},
      max_consecutive_skips=6,
  )
  plain_tx = optax.chain(optax.clip_by_global_norm(1.0), _adamw())
  steps = [
      (UNGUARDED, w.make_bare_train_step(loss_fn, _adamw()), _adamw(), None),
      (OPTAX_CLIP, w.make_bare_train_step(loss_fn, plain_tx), plain_tx,
       UNGUARDED),
      (GUARDED, og.make_train_step(loss_fn, guarded_tx), guarded_tx,
       UNGUARDED),
  ]
  candidates = []
  for name, step, tx, baseline in steps:
    own_params = jax.tree.map(jnp.copy, params)
    opt_state = jax.jit(tx.init)(own_params)
    candidates.append(timing.Candidate(
        name, w.Stepper(step, own_params, opt_state, batch), baseline
    ))
  return candidates


def run(*, lm: str, rounds: int, warmup: int, min_sample_s: float,
        say: Callable[[str], None]) -> dict[str, Any]:
  config = LM_CONFIGS[lm]
  corpus = data_lib.load_corpus()
  model = model_lib.TinyTransformer(
      model_lib.ModelConfig(
          vocab_size=corpus.vocab_size, seq_len=config['seq_len'],
          width=config['width'], depth=config['depth'], heads=config['heads'],
      ),
      rngs=nnx.Rngs(0),
  )
  graphdef, params = nnx.split(model)
  batch = jax.device_put(next(data_lib.BatchIterator(
      corpus.train, batch_size=config['batch_size'],
      seq_len=config['seq_len'], seed=0,
  )))
  timings = timing.measure(
      _candidates(model_lib.make_loss_fn(graphdef), params, batch),
      rounds=rounds, warmup=warmup, min_sample_s=min_sample_s,
      progress=lambda line: say(f'{lm} LM: {line}'),
  )
  return {
      'model': {
          'lm': lm,
          'params': sum(x.size for x in jax.tree.leaves(params)),
          **config,
      },
      'rows': timings.rows(),
  }
