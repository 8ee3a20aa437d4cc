"""Every public argument is checked when the transformation is built
(issue 23, item 6).

One row per (builder, argument, bad value): a wrong type is a ``TypeError``
and an out-of-range value a ``ValueError``, and the message names the
argument, the value and what is accepted. On main before the fix
``max_consecutive_skips=True``, ``check_updates="no"`` and
``sigma=float('inf')`` were accepted, ``spikes=True`` failed with
"'bool' object is not iterable" and ``og.guard(None)`` only at ``init``.
"""

import dataclasses
import inspect
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_guard as og
from optax_guard.transforms.spikes import spike_config

_SGD = optax.sgd(0.1)
NAN, INF = math.nan, math.inf

# builder(**{argument: value}) for each builder; the other arguments valid.
_BUILDERS = {
    'guard': lambda **kw: og.guard(**{'inner': _SGD, **kw}),
    'spikes': lambda **kw: og.guard(_SGD, spikes=kw),
    'clip_by_global_norm': lambda **kw: og.clip_by_global_norm(
        **{'max_norm': 1.0, **kw}),
    'zclip': og.zclip,
    'autoclip': og.autoclip,
    'agc': lambda **kw: og.agc(**{'clipping': 0.1, **kw}),
    'accumulate': lambda **kw: og.accumulate(
        **{'inner': og.guard(_SGD), 'every_k': 2, **kw}),
    'dynamic_loss_scale': lambda **kw: og.dynamic_loss_scale(
        **{'inner': _SGD, **kw}),
    'RecoveryPolicy': og.RecoveryPolicy,
}

# (builder, argument, value, error, what the message must say it accepts)
_ROWS = [
    ('guard', 'inner', None, TypeError, r'optax GradientTransformation'),
    ('guard', 'inner', 'adam', TypeError, r'optax GradientTransformation'),
    ('guard', 'clip', 1.0, TypeError, r'None or an optax'),
    ('guard', 'spikes', True, TypeError, r'\{\} for the defaults'),
    ('guard', 'spikes', 64, TypeError, r'dict of spike options'),
    ('guard', 'max_consecutive_skips', True, TypeError, r'None or an int >= 1'),
    ('guard', 'max_consecutive_skips', 2.0, TypeError, r'None or an int >= 1'),
    ('guard', 'max_consecutive_skips', 0, ValueError, r'None or an int >= 1'),
    ('guard', 'granularity', 'param', ValueError, r"\('global', 'leaf'\)"),
    ('guard', 'granularity', None, TypeError, r"\('global', 'leaf'\)"),
    ('guard', 'vanishing_ratio', 0.0, ValueError, r'None or a finite float > 0'),
    ('guard', 'vanishing_ratio', NAN, ValueError, r'finite float > 0'),
    ('guard', 'vanishing_ratio', True, TypeError, r'finite float > 0'),
    ('guard', 'check_updates', 'no', TypeError, r'True or False'),
    ('guard', 'check_updates', 1, TypeError, r'True or False'),
    ('spikes', 'window', True, TypeError, r'an int >= 2'),
    ('spikes', 'window', 1, ValueError, r'an int >= 2'),
    ('spikes', 'window', 8.0, TypeError, r'an int >= 2'),
    ('spikes', 'sigma', INF, ValueError, r'a finite float > 0'),
    ('spikes', 'sigma', NAN, ValueError, r'a finite float > 0'),
    ('spikes', 'sigma', -1.0, ValueError, r'a finite float > 0'),
    ('spikes', 'sigma', '6', TypeError, r'a finite float > 0'),
    ('spikes', 'min_history', True, TypeError, r'an int >= 2'),
    ('spikes', 'min_history', 500, ValueError, r'\[2, window=128\]'),
    ('spikes', 'shift_after', False, TypeError, r'an int >= 1'),
    ('spikes', 'shift_after', 0, ValueError, r'an int >= 1'),
    ('spikes', 'rebase_down', 'yes', TypeError, r'True or False'),
    ('spikes', 'winsorize', 0, TypeError, r'True or False'),
    ('spikes', 'min_rel_std', -0.1, ValueError, r'a finite float >= 0'),
    ('spikes', 'min_abs_std', INF, ValueError, r'a finite float >= 0'),
    ('clip_by_global_norm', 'max_norm', INF, ValueError, r'finite float > 0'),
    ('clip_by_global_norm', 'max_norm', 0.0, ValueError, r'finite float > 0'),
    ('clip_by_global_norm', 'max_norm', None, TypeError, r'finite float > 0'),
    ('zclip', 'alpha', 1.0, ValueError, r'> 0 and < 1'),
    ('zclip', 'alpha', NAN, ValueError, r'> 0 and < 1'),
    ('zclip', 'z_thresh', INF, ValueError, r'finite float > 0'),
    ('zclip', 'max_norm', -1.0, ValueError, r'None or a finite float > 0'),
    ('zclip', 'warmup_steps', True, TypeError, r'an int >= 1'),
    ('zclip', 'warmup_steps', 0, ValueError, r'an int >= 1'),
    ('zclip', 'mode', 'z', ValueError, r"\('zscore', 'percentile'\)"),
    ('zclip', 'clip_option', 'median', ValueError, r"'adaptive_scaling'"),
    ('zclip', 'clip_factor', 0.0, ValueError, r'finite float > 0'),
    ('zclip', 'skip_update_on_spike', 'no', TypeError, r'True or False'),
    ('zclip', 'eps', -1e-6, ValueError, r'finite float >= 0'),
    ('zclip', 'eps', NAN, ValueError, r'finite float >= 0'),
    ('autoclip', 'quantile', 0.0, ValueError, r'> 0 and <= 1'),
    ('autoclip', 'quantile', 1.5, ValueError, r'> 0 and <= 1'),
    ('autoclip', 'history_length', True, TypeError, r'an int >= 1'),
    ('autoclip', 'history_length', 0, ValueError, r'an int >= 1'),
    ('agc', 'clipping', INF, ValueError, r'finite float > 0'),
    ('agc', 'eps', -1.0, ValueError, r'finite float >= 0'),
    ('accumulate', 'inner', None, TypeError, r'og.guard\(optax.adam'),
    ('accumulate', 'every_k', True, TypeError, r'an int >= 1'),
    ('accumulate', 'every_k', 0, ValueError, r'MultiSteps'),
    ('accumulate', 'model_state', {'step': 3}, ValueError,
     r'None for a model without state'),
    ('dynamic_loss_scale', 'inner', None, TypeError, r'optax'),
    ('dynamic_loss_scale', 'initial_scale', NAN, ValueError, r'finite float'),
    ('dynamic_loss_scale', 'initial_scale', 2.0**127, ValueError, r'2\*\*126'),
    ('dynamic_loss_scale', 'growth_interval', True, TypeError, r'int >= 1'),
    ('dynamic_loss_scale', 'factor', 1.0, ValueError, r'finite float > 1'),
    ('dynamic_loss_scale', 'factor', INF, ValueError, r'finite float > 1'),
    ('dynamic_loss_scale', 'min_scale', 0.0, ValueError, r'finite float > 0'),
    ('dynamic_loss_scale', 'min_scale', 2.0**20, ValueError,
     r'initial_scale'),
    ('RecoveryPolicy', 'max_rollbacks', True, TypeError, r'an int >= 0'),
    ('RecoveryPolicy', 'max_rollbacks', -1, ValueError, r'an int >= 0'),
    ('RecoveryPolicy', 'loss_factor', 1.0, ValueError, r'None or a finite'),
    ('RecoveryPolicy', 'loss_factor', INF, ValueError, r'None or a finite'),
    ('RecoveryPolicy', 'loss_patience', 0, ValueError, r'an int >= 1'),
    ('RecoveryPolicy', 'loss_ema_decay', 1.0, ValueError, r'> 0 and < 1'),
    ('RecoveryPolicy', 'loss_warmup_steps', 2.5, TypeError, r'an int >= 0'),
    ('RecoveryPolicy', 'lr_backoff', 0.0, ValueError, r'> 0 and <= 1'),
    ('RecoveryPolicy', 'lr_backoff', True, TypeError, r'> 0 and <= 1'),
    ('RecoveryPolicy', 'lr_hyperparam', '', TypeError, r'non-empty str'),
    ('RecoveryPolicy', 'skip_extra_batches', -1, ValueError, r'an int >= 0'),
    ('RecoveryPolicy', 'confirm_steps', None, TypeError, r'an int >= 0'),
    ('RecoveryPolicy', 'rerun', 1, TypeError, r'True or False'),
    ('RecoveryPolicy', 'healthy_loss_sigma', NAN, ValueError,
     r'finite float > 0'),
]


@pytest.mark.parametrize(
    ('builder', 'argument', 'value', 'error', 'accepted'), _ROWS,
    ids=[f'{b}-{a}-{v!r}' for b, a, v, _, _ in _ROWS])
def test_a_bad_argument_names_itself_its_value_and_what_is_accepted(
    builder, argument, value, error, accepted):
  with pytest.raises(error) as raised:
    _BUILDERS[builder](**{argument: value})
  message = str(raised.value)
  assert message.startswith(argument) or f' {argument}' in message, message
  assert repr(value) in message or repr(float(value)) in message, message
  assert re.search(accepted, message), message


def test_every_argument_has_a_row():
  # A new argument of a builder must get a row here.
  covered = {(b, a) for b, a, *_ in _ROWS}
  signatures = {
      'guard': og.guard, 'clip_by_global_norm': og.clip_by_global_norm,
      'zclip': og.zclip, 'autoclip': og.autoclip, 'agc': og.agc,
      'accumulate': og.accumulate,
      'dynamic_loss_scale': og.dynamic_loss_scale,
  }
  expected = {(b, a) for b, fn in signatures.items()
              for a in inspect.signature(fn).parameters}
  expected |= {('spikes', a) for a in inspect.signature(spike_config).parameters}
  expected |= {('RecoveryPolicy', f.name)
               for f in dataclasses.fields(og.RecoveryPolicy)}
  assert expected - covered == set()


def test_valid_values_still_pass():
  og.guard(_SGD, clip=og.zclip(), spikes={}, max_consecutive_skips=20,
           granularity='leaf', vanishing_ratio=1e-3, check_updates=False)
  og.RecoveryPolicy(loss_factor=None, lr_backoff=1.0)
  og.autoclip(quantile=1.0)
  og.zclip(eps=0.0, max_norm=None)
  # 0-d arrays count as numbers, and a hyperparameter injected under jit (a
  # tracer) cannot be checked, so it passes.
  og.zclip(max_norm=jnp.array(1.0), warmup_steps=np.int64(5))
  tx = optax.inject_hyperparams(og.clip_by_global_norm)(max_norm=1.0)
  updates, _ = jax.jit(tx.update)({'w': jnp.full(2, 3.0)},
                                  tx.init({'w': jnp.ones(2)}))
  assert float(og.global_norm(updates)) == pytest.approx(1.0)
