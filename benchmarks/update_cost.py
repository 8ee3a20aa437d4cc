"""Cost of one optimizer update (gradients given), guarded vs bare adamw.

Every variant is one ``jax.jit`` with params and optimizer state donated,
on a 13M-parameter fp32 model (12 x 1024^2 weights + biases) with fixed
gradients. Rounds are interleaved (each variant runs ``--steps`` updates per
round) so that load from other processes hits all variants alike. The report
gives, per variant, the median time per update over all rounds, the median
over rounds of its ratio to bare adamw *in the same round* (the robust
figure on a shared machine), the fastest update, and XLA's temporary buffer
size (``memory_analysis().temp_size_in_bytes``: what a variant materialises
beyond params and state).

    python -m benchmarks.update_cost            # all variants, 30 rounds
    python -m benchmarks.update_cost --rounds 60 bare og_fused og_pure
    python -m benchmarks.update_cost --train-step 16   # whole train steps

With ``--train-step BATCH`` each variant is a whole train step instead: a
12-layer tanh MLP on a batch of BATCH rows, gradients computed inside the
step (there a guard, like any global-norm clip, must hold every gradient
before the first update, which XLA writes to a fresh temporary buffer; on CPU
glibc maps and page-faults such a buffer anew every step).

Variants:
  bare             optax.adamw + optax.apply_updates
  optax_clip       chain(optax.clip_by_global_norm(1), adamw)
  optax_if_finite  optax.apply_if_finite(chain(clip, adamw), 10)
  og_pure          og.guard(adamw, clip=og.zclip(), spikes={}): tx.update +
                   apply_updates, the pure-transformation path that
                   nnx.Optimizer.update takes
  og_fused         the same guard in the form og.make_train_step uses
  og_fused_nonfinite og.skip_nonfinite(adamw), fused
  og_loss_scale    og.dynamic_loss_scale(the guard), fused
  og_leaf          og.guard(adamw, clip=og.zclip(), granularity='leaf'), fused
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_guard as og
from optax_guard import _apply

LAYERS, WIDTH = 12, 1024


def _params():
  keys = jax.random.split(jax.random.PRNGKey(0), LAYERS)
  return {
      f'layer{i}': {
          'w': jax.random.normal(key, (WIDTH, WIDTH)) / WIDTH**0.5,
          'b': jnp.zeros(WIDTH),
      }
      for i, key in enumerate(keys)
  }


def _guard():
  return og.guard(optax.adamw(1e-3), clip=og.zclip(), spikes={})


def _pure(tx):
  def update(params, opt_state, grads, loss):
    updates, opt_state = tx.update(grads, opt_state, params, value=loss)
    return optax.apply_updates(params, updates), opt_state
  return tx, update


def _fused(tx):
  apply = _apply.update_and_apply(tx)
  return tx, lambda params, opt_state, grads, loss: apply(
      grads, opt_state, params, value=loss)


def _mlp_loss(params, batch):
  hidden = batch['x']
  for i in range(LAYERS):
    layer = params[f'layer{i}']
    hidden = jnp.tanh(hidden @ layer['w'] + layer['b'])
  return jnp.mean((hidden - batch['y']) ** 2)


def _as_train_step(update):
  """``update`` fed with the gradients of the MLP loss, inside one step."""

  def step(params, opt_state, batch, loss):
    del loss
    loss, grads = jax.value_and_grad(_mlp_loss)(params, batch)
    return update(params, opt_state, grads, loss)

  return step


VARIANTS = {
    'bare': lambda: _pure(optax.adamw(1e-3)),
    'optax_clip': lambda: _pure(
        optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))),
    'optax_if_finite': lambda: _pure(optax.apply_if_finite(
        optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3)), 10)),
    'og_pure': lambda: _pure(_guard()),
    'og_fused': lambda: _fused(_guard()),
    'og_fused_nonfinite': lambda: _fused(og.skip_nonfinite(optax.adamw(1e-3))),
    'og_loss_scale': lambda: _fused(og.dynamic_loss_scale(_guard())),
    'og_leaf': lambda: _fused(og.guard(optax.adamw(1e-3), clip=og.zclip(),
                                       granularity='leaf')),
}


class _Runner:
  """One compiled variant with its own donated params and state."""

  def __init__(self, name, grads, loss, train_step):
    tx, update = VARIANTS[name]()
    if train_step:
      update = _as_train_step(update)
    self.params = _params()
    self.opt_state = tx.init(self.params)
    self.grads, self.loss = grads, loss
    self.compiled = jax.jit(update, donate_argnums=(0, 1)).lower(
        self.params, self.opt_state, grads, loss).compile()
    self.temp_bytes = self.compiled.memory_analysis().temp_size_in_bytes
    self.rounds = []  # per round, the times of its updates

  def run(self, steps):
    times = []
    for _ in range(steps):
      start = time.perf_counter()
      self.params, self.opt_state = self.compiled(
          self.params, self.opt_state, self.grads, self.loss)
      jax.block_until_ready((self.params, self.opt_state))
      times.append(time.perf_counter() - start)
    self.rounds.append(times)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('variants', nargs='*', default=list(VARIANTS))
  parser.add_argument('--rounds', type=int, default=30)
  parser.add_argument('--steps', type=int, default=3,
                      help='timed updates per variant and round')
  parser.add_argument('--train-step', type=int, default=0, metavar='BATCH',
                      help='time whole train steps on batches of BATCH rows')
  args = parser.parse_args()
  names = ['bare'] + [n for n in args.variants if n != 'bare']
  if args.train_step:
    rng = np.random.default_rng(0)
    grads = {  # the batch, in the gradients' place
        'x': jnp.asarray(rng.normal(size=(args.train_step, WIDTH)),
                         jnp.float32),
        'y': jnp.zeros((args.train_step, WIDTH), jnp.float32)}
  else:
    grads = jax.tree.map(lambda p: 1e-3 * jnp.ones_like(p) + 1e-2 * p,
                         _params())
  loss = jnp.float32(1.0)
  runners = {name: _Runner(name, grads, loss, args.train_step)
             for name in names}
  for runner in runners.values():
    runner.run(3)  # warm-up: first calls allocate and page in
    runner.rounds.clear()
  for _ in range(args.rounds):
    for runner in runners.values():
      runner.run(args.steps)
  bare_rounds = [np.median(times) for times in runners['bare'].rounds]
  what = (f'train steps, batch {args.train_step}' if args.train_step
          else 'updates')
  print(f'{jax.devices()[0].platform}, {LAYERS} x {WIDTH}^2 fp32 params,'
        f' {args.rounds} rounds x {args.steps} {what}')
  print(f'{"variant":20s} {"median ms":>9s} {"ratio":>6s} {"min ms":>7s}'
        f' {"temp MB":>8s}')
  for name, runner in runners.items():
    times = np.concatenate(runner.rounds)
    ratio = np.median([np.median(times) / bare for times, bare
                       in zip(runner.rounds, bare_rounds)])
    print(f'{name:20s} {np.median(times) * 1e3:9.2f} {ratio:6.2f}'
          f' {times.min() * 1e3:7.2f} {runner.temp_bytes / 1e6:8.1f}')


if __name__ == '__main__':
  main()
