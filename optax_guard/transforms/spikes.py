"""The spike rule: skip spikes and bursts, let a level shift in, boundedly.

Each signal (the loss and the pre-clip global gradient norm) keeps a ring
buffer of its last ``window`` admitted values. A value is *high* when, once
``min_history`` values are in, it exceeds ``mean + sigma * std``
(Bessel-corrected) of its buffer; a step is a spike when a signal is high.

1. **Only accepted values enter.** A skipped spike never enters the buffer,
   so neither an isolated spike nor a burst widens the bound for the next
   one. Its raw value waits in ``pending`` (read only by rule 2), and
   ``streak`` counts it: the one change a skipped spike makes to the
   window, whose ``values``, ``size`` and ``slot`` stay bit for bit. OLMo-core's ``SkipStepOptimizer`` and MaxText's
   ``skip_step_on_spikes`` admit every value, so a burst's second step is
   often accepted (they catch about ``window / sigma**2`` steps of a large
   burst: 3 to 4 at their defaults).
2. **A level shift is accepted after ``shift_after`` skips.** After
   ``shift_after`` steps in a row skipped as spikes, the next high step is
   accepted as the start of a new level, and the buffer of every signal that
   was high during the run is rebuilt from the run's raw values and this
   one (repeated to fill the window). So the rule never skips more than
   ``shift_after`` spike steps in a row, and a permanent shift costs
   ``shift_after`` skips (more only when the rebuilt buffer, ``shift_after +
   1`` values, underestimates the new spread: keep ``shift_after >= 8``).
   A shift and a burst look alike until then: a burst longer than
   ``shift_after`` steps has its tail accepted (and becomes the buffer's
   level until normal values replace it). The default
   ``min(16, window // 4)`` is longer than the bursts seen in practice (a few
   bad batches) and than what the peers catch, and far below ``window // 2``.
3. **Non-finite values never count.** A step with a NaN/Inf loss or gradient
   (or rejected for any other reason before the spike check) leaves the
   state exactly as it was: one NaN costs one step. The peers admit it, and
   their statistics are NaN for a whole window (``window + 1`` skips).
4. **A downward shift too** (``rebase_down``): values below
   ``mean - sigma * std`` are accepted but wait outside the buffer; after
   ``shift_after + 1`` of them in a row the buffer is rebuilt from them, so a
   drop does not leave a two-level buffer whose wide spread would let spikes
   through for a whole window.

5. **The spread has a floor.** The std is at least ``min_rel_std * |mean| +
   min_abs_std`` (``1e-2`` and ``1e-6``), so that a window of equal values
   (zeros, denormals, a constant loss) does not make the next ordinary value
   a spike: at the default ``sigma`` nothing within 6% of the mean is one.

The check is armed once ``min_history`` values are in; the default
``max(2, window // 2 - 1)`` arms it at the same step as OLMo-core (since
2025) and MaxText, whose rolling lists count the current value.

Measured against ported OLMo-core and MaxText rules in ``docs/spike_rule.md``
(``python -m benchmarks.spikes``).
"""

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from optax_guard.transforms import arguments as _arguments


class SignalWindow(NamedTuple):
  """The recent history of one signal.

  Attributes:
    values: ring buffer of admitted values, ``(window,)`` float32.
    size: how many entries of ``values`` are valid (at most ``window``).
    slot: where the next admitted value is written.
    pending: this signal's raw values during the current run of skipped
      spikes, ``(shift_after,)``.
    high_seen: the signal was high at some step of that run.
    low_streak: admitted values in a row below ``mean - sigma * std``.
  """

  values: jax.Array
  size: jax.Array
  slot: jax.Array
  pending: jax.Array
  high_seen: jax.Array
  low_streak: jax.Array


class SpikeWindow(NamedTuple):
  """The spike rule's state.

  Attributes:
    loss: the loss's :class:`SignalWindow`.
    grad_norm: the gradient norm's :class:`SignalWindow`.
    streak: counted steps in a row skipped as spikes (at most
      ``shift_after``).
  """

  loss: SignalWindow
  grad_norm: SignalWindow
  streak: jax.Array


class SpikeConfig(NamedTuple):
  """Validated options of the spike rule (see :func:`spike_config`)."""

  window: int
  sigma: float
  min_history: int
  shift_after: int
  rebase_down: bool
  winsorize: bool
  min_rel_std: float
  min_abs_std: float


def spike_config(
    window: int = 128,
    sigma: float = 6.0,
    min_history: Optional[int] = None,
    shift_after: Optional[int] = None,
    rebase_down: bool = True,
    winsorize: bool = False,
    min_rel_std: float = 1e-2,
    min_abs_std: float = 1e-6,
) -> SpikeConfig:
  """Checks the spike options and fills in the defaults.

  Examples:
    >>> from optax_guard.transforms.spikes import spike_config
    >>> config = spike_config()
    >>> config.min_history, config.shift_after, config.rebase_down
    (63, 16, True)
    >>> spike_config(window=32).shift_after
    8

  Args:
    window: how many recent values the statistics cover (``>= 2``).
    sigma: how many standard deviations above the mean is a spike (``> 0``).
    min_history: values needed before the check is armed; default
      ``max(2, window // 2 - 1)``.
    shift_after: spike skips in a row after which the next high step is
      accepted as the start of a new level (the longest burst caught whole);
      default ``max(1, min(16, window // 4))``. The guard's
      :func:`~optax_guard.guard` refuses a ``max_consecutive_skips`` that is
      not larger, since a level shift would then raise ``diverged``. A
      shift and a burst look alike for ``shift_after`` steps: a larger value
      catches longer bursts whole but drops more batches when the data really
      changed for good; a smaller one follows a shift sooner but lets the
      tail of a longer burst in. Keep it ``>= 8``: the rebuilt buffer's
      spread comes from ``shift_after + 1`` values.
    rebase_down: also rebuild a signal's buffer after ``shift_after + 1``
      values in a row below ``mean - sigma * std``, so that a drop does not
      leave a two-level buffer whose spread lets spikes through.
    winsorize: admit a skipped step's high value as the threshold it crossed
      (as ZClip does) instead of keeping it out. Off by default: measured, it
      adapts to a widening spread with fewer skips but lets a quarter of the
      injected spike steps through (``docs/spike_rule.md``).
    min_rel_std: floor on the std relative to the mean (``>= 0``): the
      std used is at least ``min_rel_std * |mean| + min_abs_std``, so that a
      window of equal values (a constant loss, a fixed batch) does not make
      the next ordinary value, a hair above them, a spike. With the
      defaults nothing within ``sigma`` percent of the mean is a spike.
    min_abs_std: absolute floor on the std (``>= 0``), for a window of zeros
      or denormals, whose mean gives no scale: values up to ``sigma *
      min_abs_std`` above it pass. Lower it for a loss or gradient norm
      that is ordinarily below ``1e-6``.

  Returns:
    A :class:`SpikeConfig`.

  Raises:
    TypeError: for an option of the wrong type (the message names it).
    ValueError: for an option out of range (the message names it).
  """
  _arguments.count('window', window, 2)
  _arguments.real('sigma', sigma, low=0)
  if min_history is None:
    min_history = max(2, window // 2 - 1)
  _arguments.count('min_history', min_history, 2)
  if min_history > window:
    raise ValueError(
        f'min_history must be an int in [2, window={window}], got'
        f' {min_history!r}.'
    )
  if shift_after is None:
    shift_after = max(1, min(16, window // 4))
  _arguments.count('shift_after', shift_after, 1)
  if shift_after > window:
    raise ValueError(
        f'shift_after must be an int in [1, window={window}], got'
        f' {shift_after!r}; a larger window allows a longer one.'
    )
  _arguments.flag('rebase_down', rebase_down)
  _arguments.flag('winsorize', winsorize)
  _arguments.real('min_rel_std', min_rel_std, low=0, low_open=False)
  _arguments.real('min_abs_std', min_abs_std, low=0, low_open=False)
  return SpikeConfig(window, float(sigma), min_history, shift_after,
                     bool(rebase_down), bool(winsorize), float(min_rel_std),
                     float(min_abs_std))


def init_window(config: SpikeConfig) -> SpikeWindow:
  """An empty :class:`SpikeWindow` (fresh buffers: each can be donated)."""

  def signal():
    return SignalWindow(
        values=jnp.zeros((config.window,), jnp.float32),
        size=jnp.zeros((), jnp.int32),
        slot=jnp.zeros((), jnp.int32),
        pending=jnp.zeros((config.shift_after,), jnp.float32),
        high_seen=jnp.zeros((), jnp.bool_),
        low_streak=jnp.zeros((), jnp.int32),
    )

  return SpikeWindow(loss=signal(), grad_norm=signal(),
                     streak=jnp.zeros((), jnp.int32))


class SignalCheck(NamedTuple):
  """How one signal's value compares with its history.

  Attributes:
    threshold: ``mean + sigma * std`` (``inf`` before the check is armed).
    high: the value exceeds ``threshold``.
    low: the value is below ``mean - sigma * std`` (always ``False``
      without ``rebase_down``).
  """

  threshold: jax.Array
  high: jax.Array
  low: jax.Array


class SpikeCheck(NamedTuple):
  """The spike rule's verdict on one step, before anything is recorded.

  Attributes:
    loss: the loss's :class:`SignalCheck` (never high without a loss).
    grad_norm: the gradient norm's :class:`SignalCheck`.
    release: a signal is high after ``shift_after`` skips in a row: the
      step is accepted as the start of a new level.
    spike: a signal is high and this is no release: skip the step.
  """

  loss: SignalCheck
  grad_norm: SignalCheck
  release: jax.Array
  spike: jax.Array


def _mean_std(signal: SignalWindow,
              config: SpikeConfig) -> tuple[jax.Array, jax.Array]:
  """Mean and Bessel-corrected std of the valid entries, std floored."""
  valid = jnp.arange(signal.values.shape[0]) < signal.size
  count = jnp.maximum(signal.size, 1).astype(jnp.float32)
  mean = jnp.sum(jnp.where(valid, signal.values, 0)) / count
  # The deviations in units of the largest one, so that their squares
  # neither overflow (a level of 1e20 rounds to deviations of 1e13) nor
  # underflow; a window is at most a few hundred values.
  deviations = jnp.where(valid, signal.values - mean, 0)
  unit = jnp.max(jnp.abs(deviations))
  unit = jnp.where(unit > 0, unit, 1)
  squares = jnp.sum(jnp.square(deviations / unit))
  std = unit * jnp.sqrt(squares / jnp.maximum(count - 1, 1))
  floor = config.min_rel_std * jnp.abs(mean) + config.min_abs_std
  return mean, jnp.maximum(std, floor)


def _check_signal(signal: SignalWindow, config: SpikeConfig,
                  value: Optional[jax.Array]) -> SignalCheck:
  no = jnp.zeros((), jnp.bool_)
  if value is None:
    return SignalCheck(jnp.full((), jnp.inf, jnp.float32), no, no)
  ready = signal.size >= config.min_history
  mean, std = _mean_std(signal, config)
  threshold = jnp.where(ready, mean + config.sigma * std, jnp.inf)
  low = ready & (value < mean - config.sigma * std)
  return SignalCheck(threshold, ready & (value > threshold),
                     low if config.rebase_down else no)


def is_spike(window: SpikeWindow, config: SpikeConfig,
             loss: Optional[jax.Array], grad_norm: jax.Array) -> SpikeCheck:
  """Judges one step's loss (``None`` if not given) and gradient norm.

  Args:
    window: the rule's state.
    config: its options.
    loss: the step's loss as float32, or ``None``.
    grad_norm: the step's pre-clip global gradient norm as float32.

  Returns:
    A :class:`SpikeCheck`; ``spike`` says whether to skip the step. It is
    meaningless for a non-finite step, which the caller skips anyway.
  """
  loss_check = _check_signal(window.loss, config, loss)
  norm_check = _check_signal(window.grad_norm, config, grad_norm)
  high = loss_check.high | norm_check.high
  release = high & (window.streak >= config.shift_after)
  return SpikeCheck(loss_check, norm_check, release, high & ~release)


def _where(condition: jax.Array, new: SignalWindow, old: SignalWindow):
  return jax.tree.map(lambda n, o: jnp.where(condition, n, o), new, old)


def _rebuilt(signal: SignalWindow, config: SpikeConfig,
             values: jax.Array) -> SignalWindow:
  """``signal`` holding only ``values``, repeated to fill the window."""
  return signal._replace(
      values=jnp.resize(values, (config.window,)),
      size=jnp.asarray(config.window, jnp.int32),
      slot=jnp.zeros((), jnp.int32),
  )


def _record_signal(signal: SignalWindow, config: SpikeConfig,
                   value: Optional[jax.Array], check: SignalCheck,
                   spike: jax.Array, release: jax.Array,
                   accepted: jax.Array, streak: jax.Array) -> SignalWindow:
  """The signal after a counted step (see :func:`record`)."""
  if value is None:
    return signal
  # With winsorize, a high value of a skipped step enters as the threshold it
  # crossed; an in-range value of a skipped step never enters. A low value
  # (rebase_down) waits in `pending` until its run ends or makes a new level.
  flagged = spike & check.high
  if not config.winsorize:
    flagged = jnp.zeros((), jnp.bool_)
  low_held = accepted & check.low
  admitted = signal._replace(
      values=signal.values.at[signal.slot].set(
          jnp.where(flagged, check.threshold, value)),
      size=jnp.minimum(signal.size + 1, config.window),
      slot=(signal.slot + 1) % config.window,
  )
  new = _where((accepted & ~low_held) | flagged, admitted, signal)
  index = jnp.where(spike, streak, signal.low_streak)
  new = new._replace(
      pending=jnp.where(spike | low_held, signal.pending.at[index].set(value),
                        signal.pending),
      high_seen=spike & (signal.high_seen | check.high),
      low_streak=jnp.where(low_held, signal.low_streak + 1, 0),
  )
  shifted = (release & (check.high | signal.high_seen)) | (
      low_held & (signal.low_streak >= config.shift_after))
  rebuilt = _rebuilt(new, config, jnp.append(signal.pending, value))
  return _where(shifted, rebuilt._replace(low_streak=jnp.zeros_like(
      signal.low_streak)), new)


def record(window: SpikeWindow, config: SpikeConfig,
           loss: Optional[jax.Array], grad_norm: jax.Array, check: SpikeCheck,
           *, counted: jax.Array, accepted: jax.Array) -> SpikeWindow:
  """The state after a step: admissions, the skip streak, rebuilt levels.

  Args:
    window: the state the step was judged against.
    config: the rule's options.
    loss: the step's loss as float32, or ``None``.
    grad_norm: the step's gradient norm as float32.
    check: :func:`is_spike`'s verdict on these values.
    counted: the step was finite and not rejected before the spike check;
      an uncounted step leaves the state exactly as it was.
    accepted: the step updated the parameters.

  Returns:
    The new :class:`SpikeWindow`.
  """
  spike = counted & check.spike
  release = counted & check.release
  accepted = counted & accepted

  def signal(old, value, signal_check):
    new = _record_signal(old, config, value, signal_check, spike, release,
                         accepted, window.streak)
    return _where(counted, new, old)

  return SpikeWindow(
      loss=signal(window.loss, loss, check.loss),
      grad_norm=signal(window.grad_norm, grad_norm, check.grad_norm),
      streak=jnp.where(counted, jnp.where(spike, window.streak + 1, 0),
                       window.streak),
  )
